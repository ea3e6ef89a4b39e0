"""The throughput benchmark: the engine (in-process and over HTTP) against reference loops,
on one corpus and one device, in one invocation. Prints one JSON document.

    python -m bench.run --device cpu --model minilm --corpus passages
    python -m bench.run --device cuda --model bge-m3-large --corpus passages \\
        --outputs dense,sparse --outputs dense,sparse,multivector
    python -m bench.run --device cuda --model bge-m3-large --corpus queries --outputs dense,sparse
    python -m bench.run --device cuda --model bge-m3-large --paths lora --adapters 8
    python -m bench.run --quick ...        # a CI-sized run (seconds)

Paths (``--paths``): ``inprocess`` (Engine.submit from N client threads), ``http`` (a separate
`sie-server serve` process, N SDK clients in client processes), ``fp32`` (a second in-process
engine in float32, beside a default-dtype one that is bf16 on CPUs with native bf16),
``int8`` / ``http_int8`` (the engine with ``--dtype int8``, in-process / over HTTP),
``naive``, ``flag``, ``st`` (reference loops, bench/reference.py), ``ort``, ``fastembed``,
``ort_int8``, ``openvino``, ``openvino_int8`` (the CPU peers, bench/cpu_peers.py;
all-MiniLM-L6-v2 only), ``lora`` (bench/lora.py; needs ``--adapters K``). Dense outputs of the
engine and the CPU peers are checked against sentence-transformers fp32 (cosine >= 0.999;
>= 0.9 for the int8 paths, whose minimum is reported) before anything is timed. On CPU the
run also measures the GEMM roofline (bench/roofline.py) and reports every path's fraction.
See bench/README.md for what every number means.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from . import corpus as corpus_mod
from . import stats
from .load import chunk, closed_loop_threads, default_procs, engine_call, http_closed_loop, \
    http_sequential
from .models import DENSE_ONLY, MODELS, REPO, corpus_flops, flops_per_token, model_folder
from .roofline import remeasure, roofline

ENGINE_PATHS = ("inprocess", "http", "fp32", "int8", "http_int8")
REF_PATHS = ("naive", "flag", "st", "ort", "fastembed", "ort_int8", "openvino", "openvino_int8")
CPU_PEERS = ("ort", "fastembed", "fp32")  # default on CPU with minilm
INT8_PATHS = ("int8", "http_int8", "ort_int8", "openvino_int8")  # opt-in (--paths)
ALL_PATHS = (*ENGINE_PATHS, *REF_PATHS, "lora")
KEYS = {"inprocess": "engine_inprocess", "http": "engine_http", "fp32": "engine_inprocess_fp32",
        "int8": "engine_inprocess_int8", "http_int8": "engine_http_int8",
        "naive": "naive_transformers", "flag": "flag_style", "st": "sentence_transformers",
        "ort": "onnxruntime", "fastembed": "fastembed", "ort_int8": "onnxruntime_int8",
        "openvino": "openvino", "openvino_int8": "openvino_int8"}
ENGINE_KEYS = ("engine_inprocess", "engine_http", "engine_inprocess_fp32",
               "engine_inprocess_int8", "engine_http_int8")
REF_KEYS = ("naive_transformers", "flag_style", "sentence_transformers", "onnxruntime",
            "fastembed", "onnxruntime_int8", "openvino", "openvino_int8")
INT8_KEYS = tuple(KEYS[p] for p in INT8_PATHS)
AGREE_COS = 0.999  # dense cosine against sentence-transformers, checked before timing
AGREE_COS_INT8 = 0.9  # the int8 paths: the same model, within int8 error (reported beside)

# (device, corpus) -> default number of texts; quick mode overrides
DEFAULT_N = {("cpu", "passages"): 128, ("cpu", "queries"): 2048, ("cpu", "long"): 8,
             ("cuda", "passages"): 4096, ("cuda", "queries"): 65536, ("cuda", "long"): 256}
QUICK_N = {"passages": 16, "queries": 64, "long": 2}
# (device, corpus) -> (clients, items per request)
LOAD_SHAPE = {("cpu", "passages"): (8, 16), ("cuda", "passages"): (8, 32),
              ("cpu", "queries"): (64, 16), ("cuda", "queries"): (64, 16),
              ("cpu", "long"): (8, 2), ("cuda", "long"): (8, 2)}

_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[bench {time.perf_counter() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ helpers

def versions() -> dict:
    out = {"python": platform.python_version()}
    for mod in ("torch", "transformers", "sentence_transformers", "tokenizers", "peft",
                "onnxruntime", "fastembed"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - absent or broken: say so
            out[mod] = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True,
                                capture_output=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO, text=True, capture_output=True, timeout=10).stdout.strip()
        out["git"] = commit + ("+dirty" if dirty else "") if commit else None
    except Exception:  # noqa: BLE001 - not a checkout
        out["git"] = None
    return out


def device_info(device: str) -> dict:
    import torch

    info = {"device": device, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine()}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return info


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def matmul_peak_tflops(n: int = 8192, reps: int = 10) -> float:
    """bf16 n^3 matmul rate on the current GPU (the card's practical matmul peak)."""
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    del a, b
    torch.cuda.empty_cache()
    return 2.0 * n**3 * reps / dt / 1e12


def free_device_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001
        pass


def model_limit(folder: Path) -> int:
    """Longest input the model takes (what the engine and the references truncate to)."""
    cfg = json.loads((folder / "config.json").read_text())
    roberta = cfg.get("model_type") in ("xlm-roberta", "roberta", "camembert")
    limit = cfg["max_position_embeddings"] - (cfg.get("pad_token_id", 1) + 1 if roberta else 0)
    sbert = folder / "sentence_bert_config.json"
    if (folder / "modules.json").exists() and sbert.exists():
        limit = min(limit, json.loads(sbert.read_text()).get("max_seq_length") or limit)
    return limit


def warm_slice(reqs: list, clients: int, quick: bool) -> list:
    if quick:
        return reqs[:1]
    return reqs[: max(1, min(len(reqs), max(2 * clients, len(reqs) // 8)))]


def median_run(runs: list[dict]) -> dict:
    """The run with the median tokens/s; with several rounds, all rounds' figures beside it."""
    ok = [r for r in runs if "tokens_per_s" in r]
    if not ok:
        return runs[-1] if runs else {}
    best = dict(sorted(ok, key=lambda r: r["tokens_per_s"])[(len(ok) - 1) // 2])
    if len(runs) > 1:
        best["rounds_tokens_per_s"] = [r.get("tokens_per_s") for r in runs]
    return best


def cosine_min(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float(np.min(np.sum(a * b, axis=1)))


def cpu_note(s: dict) -> str:
    """', server 1.20 ms CPU/request (0.9 cores), clients 3.1 cores over 8 processes' for
    an HTTP summary, else ''."""
    parts = []
    if "server_cpu_ms_per_request" in s:
        cores = s.get("engine_stats", {}).get("server_cpu_cores")
        parts.append(f"server {s['server_cpu_ms_per_request']:.2f} ms CPU/request"
                     + (f" ({cores} cores)" if cores is not None else ""))
    if "client_cpu_cores" in s:
        parts.append(f"clients {s['client_cpu_cores']} cores over {s.get('client_procs', '?')} "
                     "processes")
    return "".join(f", {p}" for p in parts)


# ------------------------------------------------------------------ the phases


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.a = args
        self.folder: Path = args.folder
        self.limit = model_limit(self.folder)
        self.tok = corpus_mod.load_tokenizer(self.folder / "tokenizer.json")
        self.runs: dict[str, dict] = {}  # "kind:outputs" -> path -> summary
        self.corpora: dict[str, corpus_mod.Corpus] = {}
        self.lengths: dict[str, np.ndarray] = {}
        self.engine_dense: dict[str, np.ndarray] = {}
        self.extra: dict = {}
        self.engine = self.engine32 = self.server = self.ref = self.st = None
        self.ort = self.fastembed = self.engine8 = self.server8 = None
        self.peers: dict = {}  # ort_int8 / openvino / openvino_int8 -> cpu_peers.OnnxPeer
        self.fastembed_tokens: dict[str, int] = {}  # per corpus, counted by its tokenizer
        self.flag_bs: dict = {}
        self.roof: dict | None = None  # CPU: the GEMM roofline, measured again between rounds
        for kind in args.corpus:
            n = args.n or (QUICK_N[kind] if args.quick else DEFAULT_N[(args.devtype, kind)])
            c = corpus_mod.make_corpus(kind, n, self.tok, args.seed)
            self.corpora[kind] = c
            self.lengths[kind] = c.token_lengths(self.tok, self.limit)

    def shape(self, kind: str) -> tuple[int, int]:
        clients, size = LOAD_SHAPE[(self.a.devtype, kind)]
        if self.a.quick:
            clients, size = min(clients, 4), min(size, 4)
        return self.a.clients or clients, self.a.request_size or size

    def key(self, kind: str, outputs: list[str]) -> str:
        return f"{kind}:{'+'.join(outputs)}"

    def record(self, kind: str, outputs: list[str], path: str, summary: dict) -> None:
        run = self.runs.setdefault(self.key(kind, outputs), {})
        expected = int(self.lengths[kind].sum())
        if "tokens" in summary and summary["tokens"] != expected:
            summary["token_check"] = f"MISMATCH: counted {summary['tokens']}, corpus has {expected}"
        run[KEYS.get(path, path)] = summary

    # -------------------------------------------------------------- setting up the paths

    def settings(self, dtype: str | None = None):
        from sie_server.config import Settings

        s = Settings(models={self.a.name: str(self.folder)}, default_models=[self.a.name],
                     device=self.a.device, dtype=dtype or self.a.dtype)
        if self.a.max_batch_tokens:
            s.max_batch_tokens = self.a.max_batch_tokens
        if self.a.adapter_root:
            s.adapter_roots = [Path(self.a.adapter_root)]
        return s

    def open_paths(self, stack: contextlib.ExitStack) -> dict:
        """Load everything the asked-for paths need, all at once (so they can be interleaved);
        `stack` closes them. Returns {path: measure(kind, outputs, warm) -> summary}. A path
        that cannot be set up is reported in `errors` and left out; the others still run."""
        paths: dict = {}
        peers = [p for p in ("ort", "fastembed", "fp32", "int8", "ort_int8", "openvino",
                             "openvino_int8") if p in self.a.paths]
        for path, setup in (("inprocess", self.setup_engine), ("http", self.setup_http),
                            ("fp32", self.setup_fp32), ("int8", self.setup_int8),
                            ("http_int8", self.setup_http_int8),
                            ("naive", self.setup_reference),
                            ("flag", self.setup_reference), ("st", self.setup_st),
                            ("ort", self.setup_ort), ("fastembed", self.setup_fastembed),
                            ("ort_int8", self.setup_peer), ("openvino", self.setup_peer),
                            ("openvino_int8", self.setup_peer)):
            # the CPU peers' agreement check needs the engine and sentence-transformers
            needed = (path == "inprocess" and ("lora" in self.a.paths or peers)) or \
                (path == "st" and peers)
            if path not in self.a.paths and not needed:
                continue
            try:
                if (setup(stack, path) if setup == self.setup_peer else setup(stack)) \
                        and path in self.a.paths:
                    paths[path] = getattr(self, f"measure_{path}")
            except Exception as exc:  # noqa: BLE001 - report it, run the rest
                self.error(f"setting up {path}", exc)
        return paths

    def error(self, what: str, exc: BaseException) -> None:
        msg = f"{type(exc).__name__}: {exc}"
        log(f"!! {what} failed: {msg}")
        self.extra.setdefault("errors", []).append({"what": what, "error": msg[-2000:]})

    def setup_engine(self, stack: contextlib.ExitStack) -> bool:
        if self.engine is None:
            from sie_server.engine import Engine

            log("engine in-process: loading")
            t0 = time.perf_counter()
            engine = Engine(self.settings())
            stack.callback(free_device_memory)
            stack.callback(engine.close)
            engine.start()
            self.engine = engine
            self.extra["engine_load_s"] = round(time.perf_counter() - t0, 2)
        return True

    def setup_fp32(self, stack: contextlib.ExitStack) -> bool:
        if self.engine_dtype()[0] == "float32":
            self.extra["engine_inprocess_fp32"] = "skipped: the engine's dtype is float32 already"
            return False
        self.engine32 = self.second_engine(stack, "float32")
        return True

    def second_engine(self, stack: contextlib.ExitStack, dtype: str):
        """An in-process engine in `dtype` beside the default one, closed by `stack`."""
        from sie_server.engine import Engine

        log(f"engine in-process, {dtype}: loading")
        engine = Engine(self.settings(dtype))
        stack.callback(engine.close)
        engine.start()
        return engine

    def setup_int8(self, stack: contextlib.ExitStack) -> bool:
        if self.a.devtype != "cpu":
            self.extra["engine_inprocess_int8"] = "skipped: int8 is a CPU path"
            return False
        self.engine8 = self.second_engine(stack, "int8")
        return True

    def setup_http_int8(self, stack: contextlib.ExitStack) -> bool:
        if self.a.devtype != "cpu":
            self.extra["engine_http_int8"] = "skipped: int8 is a CPU path"
            return False
        self.server8 = self.start_server(stack, "int8")
        return True

    def setup_peer(self, stack: contextlib.ExitStack, path: str) -> bool:
        from . import cpu_peers

        if self.a.model != "minilm" or self.a.devtype != "cpu":
            self.extra[KEYS[path]] = "skipped: all-MiniLM-L6-v2 on CPU only"
            return False
        log(f"{path}: loading")
        if path == "ort_int8":
            peer = cpu_peers.OrtPeer(self.folder, self.limit, torch_threads(),
                                     int8_dir=self.a.cache_dir)
        else:  # NNCF calibrates on texts the timed corpora do not hold
            calibration = None
            if path == "openvino_int8":
                calibration = cpu_peers.calibration_texts(self.tok, 8 if self.a.quick else 64,
                                                          self.a.seed + 1)
            peer = cpu_peers.OpenVinoPeer(self.folder, self.limit, torch_threads(),
                                          calibration=calibration)
        self.peers[path] = peer
        self.extra.setdefault("peer_versions", {})[KEYS[path]] = peer.version
        return True

    def engine_dtype(self) -> tuple[str, str]:
        """(dtype, why) the engine computes in with --device/--dtype, as the server resolves it."""
        from sie_server.runtime.device import Placement

        p = Placement.resolve(self.a.device, self.a.dtype)
        return p.dtype_name, p.reason

    def setup_ort(self, stack: contextlib.ExitStack) -> bool:
        from . import cpu_peers

        if self.a.model != "minilm" or self.a.devtype != "cpu":
            self.extra["onnxruntime"] = "skipped: all-MiniLM-L6-v2 on CPU only"
            return False
        log("onnxruntime (fastembed's way): loading")
        self.ort = cpu_peers.OrtPeer(self.folder, self.limit, torch_threads())
        return True

    def setup_fastembed(self, stack: contextlib.ExitStack) -> bool:
        from . import cpu_peers

        if self.a.model != "minilm" or self.a.devtype != "cpu":
            self.extra["fastembed"] = "skipped: all-MiniLM-L6-v2 on CPU only"
            return False
        log("fastembed: loading (offline)")
        self.fastembed = cpu_peers.FastembedPeer(self.folder, self.limit, self.a.cache_dir,
                                                 torch_threads())
        return True

    def setup_http(self, stack: contextlib.ExitStack) -> bool:
        self.server = self.start_server(stack, self.a.dtype)
        self.extra["server_start_s"] = round(self.server.startup_s, 2)
        return True

    def start_server(self, stack: contextlib.ExitStack, dtype: str):
        """`sie-server serve` in `dtype` in its own process, stopped by `stack`."""
        from .server import Server

        extra = ["--max-batch-tokens", str(self.a.max_batch_tokens)] \
            if self.a.max_batch_tokens else []
        log(f"engine over HTTP ({dtype}): starting the server")
        return stack.enter_context(Server(self.a.name, self.folder, self.a.device, dtype, extra))

    def setup_reference(self, stack: contextlib.ExitStack) -> bool:
        from . import reference as ref_mod

        if self.ref is None:
            log("references: loading the transformers model")
            self.ref = ref_mod.load(self.folder, self.a.device)
            self.extra["reference_model"] = self.ref.info
        return True

    def setup_st(self, stack: contextlib.ExitStack) -> bool:
        from . import reference as ref_mod

        if not (self.folder / "modules.json").exists():
            self.extra["sentence_transformers"] = "skipped: not a sentence-transformers model"
            return False
        log("references: loading sentence-transformers")
        self.st = ref_mod.st_load(self.folder, self.a.device)
        return True

    # -------------------------------------------------------------- one measurement per path

    def measure_inprocess(self, kind: str, outputs: list[str], warm: bool,
                          engine=None) -> dict:
        engine = engine or self.engine
        clients, size = self.shape(kind)
        reqs = chunk(self.corpora[kind].texts, size)
        call = engine_call(engine, self.a.name, reqs, outputs)
        if warm:
            w = warm_slice(reqs, clients, self.a.quick)
            closed_loop_threads(call, len(w), clients)
            return {}
        snap = stats.snapshot_inprocess(engine)
        before = snap()
        summary = closed_loop_threads(call, len(reqs), clients).summary(
            clients=clients, request_size=size)
        stats.attach(summary, before, snap(), summary.get("wall_s"))
        return summary

    def measure_fp32(self, kind: str, outputs: list[str], warm: bool) -> dict:
        return self.measure_inprocess(kind, outputs, warm, self.engine32)

    def measure_int8(self, kind: str, outputs: list[str], warm: bool) -> dict:
        return self.measure_inprocess(kind, outputs, warm, self.engine8)

    def measure_http_int8(self, kind: str, outputs: list[str], warm: bool) -> dict:
        return self.measure_http(kind, outputs, warm, self.server8)

    def measure_peer(self, path: str, kind: str, warm: bool) -> dict:
        texts = self.corpora[kind].texts
        run, _ = self.peers[path].run(texts[:32] if warm else texts)
        return {} if warm else run.summary(**self.agreement(kind, path))

    def measure_ort_int8(self, kind: str, outputs: list[str], warm: bool) -> dict:
        return self.measure_peer("ort_int8", kind, warm)

    def measure_openvino(self, kind: str, outputs: list[str], warm: bool) -> dict:
        return self.measure_peer("openvino", kind, warm)

    def measure_openvino_int8(self, kind: str, outputs: list[str], warm: bool) -> dict:
        return self.measure_peer("openvino_int8", kind, warm)

    def measure_ort(self, kind: str, outputs: list[str], warm: bool) -> dict:
        texts = self.corpora[kind].texts
        run, _ = self.ort.run(texts[:32] if warm else texts)
        return {} if warm else run.summary(**self.agreement(kind, "ort"))

    def measure_fastembed(self, kind: str, outputs: list[str], warm: bool) -> dict:
        texts = self.corpora[kind].texts
        if warm:
            self.fastembed.run(texts[:32], 0)
            return {}
        run, _ = self.fastembed.run(texts, self.fastembed_tokens[kind])
        return run.summary(**self.agreement(kind, "fastembed"))

    def agreement(self, kind: str, path: str) -> dict:
        cos = self.extra.get("dense_agreement", {}).get(kind, {}).get(KEYS[path])
        return {} if cos is None else {"dense_min_cosine_vs_sentence_transformers": cos}

    def check_agreement(self, paths: dict, kind: str) -> set[str]:
        """Before timing: the dense vectors of the engine(s) and the CPU peers on the whole
        corpus against sentence-transformers fp32; a path under AGREE_COS is not timed."""
        from . import reference as ref_mod

        vectors = {}
        texts = self.corpora[kind].texts
        if self.ort is not None:
            vectors["ort"] = lambda: self.ort.run(texts)[1]
        if self.fastembed is not None:
            self.fastembed_tokens[kind] = self.fastembed.tokens(texts)
            vectors["fastembed"] = lambda: self.fastembed.run(texts, 0)[1]
        for path, peer in self.peers.items():
            vectors[path] = lambda p=peer: p.run(texts)[1]
        for path, engine in (("inprocess", self.engine), ("fp32", self.engine32),
                             ("int8", self.engine8)):
            if engine is not None:
                vectors[path] = lambda e=engine: np.stack(
                    [r.dense for r in e.encode(self.a.name, texts, ["dense"])])
        if not vectors or self.st is None:
            return set()
        log(f"{kind}: checking dense agreement with sentence-transformers fp32")
        want = ref_mod.st_vectors(self.st, texts)
        failed, agree = set(), self.extra.setdefault("dense_agreement", {}).setdefault(kind, {})
        for path, get in vectors.items():
            try:
                agree[KEYS[path]] = cos = round(cosine_min(get(), want), 6)
            except Exception as exc:  # noqa: BLE001 - that path is out
                self.error(f"{kind}: {path} agreement check", exc)
                failed.add(path)
                continue
            bar = AGREE_COS_INT8 if path in INT8_PATHS or (
                path == "inprocess" and self.a.dtype == "int8") else AGREE_COS
            if cos < bar:
                self.error(f"{kind}: {path} agreement", ValueError(
                    f"min dense cosine {cos} < {bar} against sentence-transformers"))
                failed.add(path)
        if "fastembed" in vectors and self.fastembed_tokens[kind] != int(self.lengths[kind].sum()):
            self.error(f"{kind}: fastembed tokens", ValueError(
                f"fastembed feeds {self.fastembed_tokens[kind]} tokens, the corpus has "
                f"{int(self.lengths[kind].sum())}: it truncates differently"))
            failed.add("fastembed")
        log(f"  dense min cosine vs sentence-transformers: {agree}")
        return failed & set(paths)

    def measure_http(self, kind: str, outputs: list[str], warm: bool, server=None) -> dict:
        server = server or self.server
        clients, size = self.shape(kind)
        procs = self.a.client_procs or default_procs(clients)
        reqs = chunk(self.corpora[kind].texts, size)
        url = server.url
        if warm:
            http_closed_loop(url, self.a.name, warm_slice(reqs, clients, self.a.quick), outputs,
                             clients, procs)
            return {}
        snap = stats.snapshot_http(url, server.proc.pid)
        before = snap()
        res = http_closed_loop(url, self.a.name, reqs, outputs, clients, procs)
        summary = res.summary(clients=clients, request_size=size, client_procs=procs)
        stats.attach(summary, before, snap(), summary.get("wall_s"))
        return summary

    def measure_naive(self, kind: str, outputs: list[str], warm: bool) -> dict:
        from . import reference as ref_mod

        texts = self.corpora[kind].texts
        if warm:
            ref_mod.naive(self.ref, texts[:32], outputs)
            return {}
        run = ref_mod.naive(self.ref, texts, outputs, keep=min(len(texts), 8))
        extra = {}
        if kind in self.engine_dense and run.dense is not None:
            extra["dense_min_cosine_vs_engine"] = round(
                cosine_min(self.engine_dense[kind], run.dense), 6)
        return run.summary(**extra)

    def measure_flag(self, kind: str, outputs: list[str], warm: bool) -> dict:
        from . import reference as ref_mod

        texts = self.corpora[kind].texts
        key = (kind, tuple(outputs))
        if warm:
            if self.ref.device.type == "cuda":  # FlagEmbedding's OOM probe, untimed
                self.flag_bs[key] = ref_mod.flag_probe_batch_size(self.ref, texts, outputs, 256)
            else:
                ref_mod.flag(self.ref, texts[:32], outputs, 256)
            return {}
        return ref_mod.flag(self.ref, texts, outputs, self.flag_bs.get(key, 256)).summary()

    def measure_st(self, kind: str, outputs: list[str], warm: bool) -> dict:
        from . import reference as ref_mod

        texts = self.corpora[kind].texts
        if warm:
            self.st.encode(texts[:32], batch_size=32, show_progress_bar=False)
            return {}
        return ref_mod.st_encode(self.st, texts, int(self.lengths[kind].sum())).summary()

    # -------------------------------------------------------------- the run

    def run(self) -> None:
        with contextlib.ExitStack() as stack:
            paths = self.open_paths(stack)
            for kind, c in self.corpora.items():
                skip = self.check_agreement(paths, kind)
                if self.engine is not None:
                    try:
                        got = self.engine.encode(self.a.name, c.texts[: min(len(c.texts), 8)],
                                                 ["dense"])
                        self.engine_dense[kind] = np.stack([r.dense for r in got]).astype(np.float32)
                    except Exception as exc:  # noqa: BLE001
                        self.error(f"{kind}: engine dense check", exc)
                for outputs in self.a.outputs:
                    self.run_paths({k: v for k, v in paths.items() if k not in skip}, kind,
                                   outputs)
                if kind == "queries" and "http" in paths:
                    try:
                        self.run_query_modes(self.server.url, c.texts,
                                             stats.snapshot_http(self.server.url,
                                                                 self.server.proc.pid))
                    except Exception as exc:  # noqa: BLE001
                        self.error("short-query modes", exc)
            if "lora" in self.a.paths and self.engine is not None:
                try:
                    self.run_lora(self.engine)
                except Exception as exc:  # noqa: BLE001
                    self.error("lora", exc)
                    self.extra["lora"] = {"status": "error", "message": repr(exc)}

    def run_paths(self, paths: dict, kind: str, outputs: list[str]) -> None:
        """Warm every path up, then `repeat` rounds over the paths in turn; keep the median."""
        failed: set[str] = set()
        for name, measure in paths.items():
            try:
                measure(kind, outputs, warm=True)
            except Exception as exc:  # noqa: BLE001 - that path is out for this run
                self.error(f"{self.key(kind, outputs)} {name} warm-up", exc)
                failed.add(name)
        results: dict[str, list[dict]] = {name: [] for name in paths if name not in failed}
        for r in range(self.a.repeat):
            for name in list(results):
                try:
                    s = paths[name](kind, outputs, warm=False)
                except Exception as exc:  # noqa: BLE001
                    self.error(f"{self.key(kind, outputs)} {name}", exc)
                    s = {"error": f"{type(exc).__name__}: {exc}"[-2000:]}
                    free_device_memory()
                results[name].append(s)
                self.log_summary(kind, outputs, name, s, r)
            if self.roof is not None:
                remeasure(self.roof, self.folder)
        for name, runs in results.items():
            self.record(kind, outputs, name, median_run(runs))

    def log_summary(self, kind: str, outputs: list[str], path: str, s: dict, r: int) -> None:
        tag = f"  {self.key(kind, outputs)} {KEYS.get(path, path)}" + \
            (f" (round {r + 1}/{self.a.repeat})" if self.a.repeat > 1 else "")
        if "tokens_per_s" not in s:
            log(f"{tag}: {s}")
            return
        log(f"{tag}: {s['tokens_per_s']:,.0f} tokens/s, {s['texts_per_s']:,.1f} texts/s"
            + (f", p50 {s['p50_ms']:.1f} ms, p99 {s['p99_ms']:.1f} ms" if "p50_ms" in s else "")
            + cpu_note(s))

    def run_lora(self, engine) -> None:
        from . import lora

        if not self.a.adapters:
            self.extra["lora"] = {"status": "skipped", "message": "--adapters K not given"}
            return
        root = Path(self.a.adapter_root)
        log(f"lora: making {self.a.adapters} peft adapters (rank {self.a.lora_rank}) in {root}")
        t0 = time.perf_counter()
        try:
            ids = lora.make_adapters(self.folder, root, self.a.adapters, self.a.lora_rank,
                                     seed=self.a.seed)
        except Exception as exc:  # noqa: BLE001 - e.g. peft missing: report, carry on
            self.extra["lora"] = {"status": "error", "message": f"making adapters failed: {exc!r}"}
            log(f"  {self.extra['lora']['message']}")
            return
        made_s = round(time.perf_counter() - t0, 2)
        n_p = QUICK_N["passages"] if self.a.quick else self.a.lora_passages or \
            DEFAULT_N[(self.a.devtype, "passages")]
        n_q = QUICK_N["queries"] if self.a.quick else self.a.lora_queries or \
            DEFAULT_N[(self.a.devtype, "queries")] // 4
        passages = (self.corpora["passages"].texts[:n_p] if "passages" in self.corpora
                    else corpus_mod.make_corpus("passages", n_p, self.tok, self.a.seed).texts)
        queries = (self.corpora["queries"].texts[:n_q] if "queries" in self.corpora
                   else corpus_mod.make_corpus("queries", n_q, self.tok, self.a.seed).texts)
        clients, size = self.shape("passages")
        outputs = self.a.outputs[0]
        result = lora.run(engine, self.a.name, ids, passages, queries, outputs, clients, size,
                          self.a.seed, log=log)
        result.update(adapter_make_s=made_s, rank=self.a.lora_rank, targets=lora.TARGETS,
                      outputs=outputs, passages_n=len(passages), queries_n=len(queries))
        self.extra["lora"] = result
        log(f"  lora: {json.dumps({k: v for k, v in result.items() if k in ('status', 'message')})}")
        if result.get("status") == "ok":
            log(f"  lora passages ratio {result['passages']['ratio_adapters_vs_none']}, "
                f"queries mixed/per-adapter {result['queries']['ratio_mixed_vs_per_adapter']}")

    def run_query_modes(self, url: str, texts: list[str], snap) -> None:
        """Issue 3's short-query figures over HTTP (first output set)."""
        outputs = self.a.outputs[0]
        key = self.key("queries", outputs)
        clients = self.a.clients or 64
        procs = self.a.client_procs or default_procs(clients)
        n_single = min(len(texts), 16 if self.a.quick else self.a.single_requests)
        singles = chunk(texts[:n_single], 1)
        http_closed_loop(url, self.a.name, warm_slice(singles, clients, self.a.quick), outputs,
                         clients, procs)
        before = snap()
        res = http_closed_loop(url, self.a.name, singles, outputs, clients, procs)
        summary = res.summary(clients=clients, request_size=1, client_procs=procs)
        stats.attach(summary, before, snap(), summary.get("wall_s"))
        self.runs.setdefault(key, {})["engine_http_single_query"] = summary
        log(f"  {key} engine_http_single_query: {summary.get('requests_per_s', 0):,.0f} requests/s, "
            f"p50 {summary.get('p50_ms', 0):.1f} ms" + cpu_note(summary))
        n_idle = min(len(texts), 5 if self.a.quick else self.a.idle_requests)
        idle = chunk(texts[:n_idle], 1)
        http_sequential(url, self.a.name, idle[: min(10, len(idle))], outputs)
        before = snap()
        summary = http_sequential(url, self.a.name, idle, outputs).summary(clients=1, request_size=1)
        stats.attach(summary, before, snap(), None)
        self.runs[key]["engine_http_idle_single_query"] = summary
        log(f"  {key} engine_http_idle_single_query: p50 {summary.get('p50_ms', 0):.2f} ms, "
            f"p99 {summary.get('p99_ms', 0):.2f} ms")

    # -------------------------------------------------------------- report

    def path_dtype(self, name: str) -> str:
        """The dtype whose GEMM roofline a path is measured against."""
        if name in INT8_KEYS:
            return "int8"
        return self.engine_dtype()[0] if name in ("engine_inprocess", "engine_http") \
            else "float32"

    def report(self, peak: float | None, roof: dict | None = None) -> dict:
        gemm = (roof or {}).get("gemm", {})
        for key, run in self.runs.items():
            kind, outs = key.split(":")
            outputs = outs.split("+")
            flops = corpus_flops(self.folder, outputs, self.lengths[kind])
            for name, s in run.items():
                if "wall_s" not in s or name.endswith("single_query"):
                    continue
                tflops = flops / s["wall_s"] / 1e12
                s["useful_tflops"] = round(tflops, 4)
                if peak:
                    s["pct_of_matmul_peak"] = round(100 * tflops / peak, 2)
                dtype = self.path_dtype(name)
                if dtype in gemm:
                    s["useful_gflops"] = round(tflops * 1e3, 1)
                    s["roofline_dtype"] = dtype
                    s["pct_of_roofline"] = round(100 * tflops * 1e3 / gemm[dtype]["gflops"], 1)
            ratios = {}
            pairs = [(e, r) for e in ENGINE_KEYS for r in REF_KEYS] + [
                ("engine_inprocess", "engine_inprocess_fp32"),
                ("engine_http", "engine_inprocess_fp32"),
                ("engine_inprocess_int8", "engine_inprocess"),
                ("engine_http_int8", "engine_http")]
            for e, r in pairs:
                if e in run and r in run and run[r].get("tokens_per_s"):
                    ratios[f"{e}_vs_{r}"] = round(
                        run[e].get("tokens_per_s", 0) / run[r]["tokens_per_s"], 3)
            if "engine_http" in run and run.get("engine_inprocess", {}).get("tokens_per_s"):
                ratios["engine_http_vs_engine_inprocess"] = round(
                    run["engine_http"].get("tokens_per_s", 0) / run["engine_inprocess"]["tokens_per_s"], 3)
            run["ratios"] = ratios
        return {"targets": self.targets()}

    def targets(self) -> list[dict]:
        """Issue 3 / 4 targets that apply to this run, with the measured value."""
        out = []

        def add(name: str, value, threshold: float, higher: bool = True, note: str = "") -> None:
            if value is None:
                return
            met = value >= threshold if higher else value <= threshold
            out.append({"target": name, "value": value, "threshold": threshold,
                        "met": bool(met), **({"note": note} if note else {})})

        cpu, gpu = self.a.devtype == "cpu", self.a.devtype == "cuda"
        for key, run in self.runs.items():
            kind, outs = key.split(":")
            r = run.get("ratios", {})
            if cpu and self.a.model == "minilm" and kind == "passages":
                add(f"{key} in-process / sentence-transformers", r.get(
                    "engine_inprocess_vs_sentence_transformers"), 1.2)
                add(f"{key} HTTP / in-process", r.get("engine_http_vs_engine_inprocess"), 0.9)
            if cpu and self.a.model == "minilm" and kind in ("passages", "queries"):
                # issue 12, for the default dtype; a benchmark report, not a test
                bar = {"passages": (2.5, 1.5), "queries": (2.0, 2.0)}[kind]
                add(f"{key} HTTP / sentence-transformers", r.get(
                    "engine_http_vs_sentence_transformers"), bar[0])
                add(f"{key} HTTP / onnxruntime", r.get("engine_http_vs_onnxruntime"), bar[1])
            if cpu and self.a.model == "minilm" and kind == "passages":
                # issue 25: on an AVX2-only CPU (fp32 engine); benchmark figures, not tests
                http = run.get("engine_http", {})
                if self.engine_dtype()[0] == "float32" and self.a.dtype != "int8":
                    add(f"{key} fp32 HTTP / sentence-transformers (AVX2-only CPU)",
                        r.get("engine_http_vs_sentence_transformers"), 1.5)
                    add(f"{key} fp32 HTTP % of the fp32 GEMM roofline (AVX2-only CPU)",
                        http.get("pct_of_roofline"), 80.0)
                add(f"{key} int8 HTTP / sentence-transformers fp32",
                    r.get("engine_http_int8_vs_sentence_transformers"), 2.2)
                peers = [p for p in ("onnxruntime_int8", "openvino_int8")
                         if run.get(p, {}).get("tokens_per_s")]
                if "engine_http_int8" in run and peers:
                    fastest = max(peers, key=lambda p: run[p]["tokens_per_s"])
                    add(f"{key} int8 HTTP / fastest int8 peer ({fastest})",
                        r.get(f"engine_http_int8_vs_{fastest}"), 1.2)
            if gpu and self.a.model == "bge-m3-large" and kind == "passages":
                if outs == "dense+sparse":
                    add(f"{key} HTTP tokens/s", run.get("engine_http", {}).get("tokens_per_s"),
                        600_000, note="the issue's figure is for an H200")
                add(f"{key} HTTP / FlagEmbedding-style", r.get("engine_http_vs_flag_style"), 1.5)
            if gpu and self.a.model == "bge-m3-large" and kind == "queries":
                add(f"{key} HTTP queries/s, 64 clients x 16", run.get("engine_http", {}).get(
                    "texts_per_s"), 20_000)
                add(f"{key} HTTP requests/s, 1 query each", run.get(
                    "engine_http_single_query", {}).get("requests_per_s"), 3_000)
                add(f"{key} HTTP idle single-query p50 ms", run.get(
                    "engine_http_idle_single_query", {}).get("p50_ms"), 10.0, higher=False)
        lora = self.extra.get("lora") or {}
        if lora.get("status") == "ok":
            add(f"lora passages: {lora['adapters']} adapters / no adapters",
                lora["passages"]["ratio_adapters_vs_none"], 0.8)
            add("lora short queries: mixed / one batch per adapter",
                lora["queries"]["ratio_mixed_vs_per_adapter"], 2.0)
        return out


# ------------------------------------------------------------------ CLI

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    ap.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if any)")
    ap.add_argument("--dtype", default="auto",
                    help="engine dtype (auto: bf16 on CUDA and on CPUs with native bf16, else fp32)")
    ap.add_argument("--model", choices=MODELS, default=None,
                    help="default: minilm on CPU, bge-m3-large on CUDA")
    ap.add_argument("--model-dir", type=Path, default=None, help="use / build the model folder here")
    ap.add_argument("--cache-dir", type=Path, default=REPO / ".cache" / "bench",
                    help="where random BGE-M3 folders are built (default .cache/bench)")
    ap.add_argument("--corpus", default="passages",
                    help="passages | queries | long, or a comma list (default passages)")
    ap.add_argument("--n", type=int, default=None, help="texts per corpus (default by device)")
    ap.add_argument("--outputs", action="append", default=None,
                    help="comma list of output types; repeat for several sets "
                         "(default dense,sparse; dense for minilm and modernbert)")
    ap.add_argument("--clients", type=int, default=None,
                    help="concurrent clients (default 8; 64 for queries)")
    ap.add_argument("--request-size", type=int, default=None,
                    help="texts per request (default 32 passages, 16 queries, 2 long)")
    ap.add_argument("--client-procs", type=int, default=None,
                    help="processes the HTTP clients run in (default 1 on <= 4 CPUs, else <= 4)")
    ap.add_argument("--paths", default=None,
                    help=f"comma list of {', '.join(ALL_PATHS)} (default all but lora; "
                         "lora is added by --adapters)")
    ap.add_argument("--max-batch-tokens", type=int, default=None, help="engine token budget")
    ap.add_argument("--single-requests", type=int, default=10_000,
                    help="queries: requests of 1 query in the requests/s mode (default 10000)")
    ap.add_argument("--idle-requests", type=int, default=200,
                    help="queries: sequential single-query requests for idle latency")
    ap.add_argument("--adapters", type=int, default=0, help="LoRA mode: K distinct adapters")
    ap.add_argument("--adapter-root", type=Path, default=None,
                    help="where the LoRA adapters are written (default: a temp folder)")
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--lora-passages", type=int, default=None)
    ap.add_argument("--lora-queries", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=None,
                    help="timed rounds per path, interleaved across paths; the median is "
                         "reported (default 3 on CPU, 1 on CUDA, 1 with --quick)")
    ap.add_argument("--quick", action="store_true", help="tiny CI-sized run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json-out", type=Path, default=None, help="also write the JSON here")
    a = ap.parse_args(argv)

    import torch

    a.device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    a.devtype = "cuda" if a.device.startswith("cuda") else "cpu"
    if a.devtype == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda, but torch sees no CUDA device")
    a.model = a.model or ("bge-m3-large" if a.devtype == "cuda" else "minilm")
    if a.repeat is None:
        a.repeat = 1 if a.quick or a.devtype == "cuda" else 3
    a.name = a.model
    a.corpus = [c for c in a.corpus.split(",") if c]
    for c in a.corpus:
        if c not in corpus_mod.KINDS:
            ap.error(f"unknown corpus {c!r}")
    served = ("dense",) if a.model in DENSE_ONLY else ("dense", "sparse", "multivector")
    sets = a.outputs or [",".join(o for o in ("dense", "sparse") if o in served)]
    a.outputs = []
    for s in sets:
        outs = [o for o in s.split(",") if o]
        bad = [o for o in outs if o not in served]
        if bad:
            ap.error(f"{a.model} does not serve {bad} (it serves {', '.join(served)})")
        a.outputs.append(outs)
    if a.paths is None:
        paths = ["inprocess", "http", "naive", "flag", "st"]
        if a.devtype == "cpu" and a.model == "minilm":
            paths += CPU_PEERS
        if a.adapters:
            paths.append("lora")
    else:
        paths = [p for p in a.paths.split(",") if p and p != "none"]
        bad = [p for p in paths if p not in ALL_PATHS]
        if bad:
            ap.error(f"unknown paths {bad} (known: {', '.join(ALL_PATHS)})")
    a.paths = paths
    a.own_adapter_root = False
    if "lora" in a.paths and a.adapters and a.adapter_root is None:
        a.adapter_root = Path(tempfile.mkdtemp(prefix="sie-bench-adapters-"))
        a.own_adapter_root = True
    return a


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    started = time.perf_counter()
    a.folder = model_folder(a.model, a.model_dir, a.cache_dir)
    log(f"model {a.model} from {a.folder}; device {a.device}; paths {','.join(a.paths)}")
    bench = Bench(a)
    for kind, c in bench.corpora.items():
        log(f"corpus {kind}: {len(c.texts)} texts, {int(bench.lengths[kind].sum()):,} tokens "
            f"({c.source})")
    peak = roof = None
    if a.devtype == "cuda":
        peak = round(matmul_peak_tflops(), 1)
        log(f"bf16 8192^3 matmul: {peak} TFLOP/s")
    else:
        dtypes = [bench.engine_dtype()[0], "float32"]
        if any(p in INT8_PATHS for p in a.paths):
            dtypes.append("int8")
        roof = bench.roof = roofline(a.folder, dtypes, torch_threads(),
                                     rounds=2 if a.quick else 7)
        log(f"CPU {roof['cpu_model']} flags {','.join(roof['flags'])}; GEMM roofline at "
            f"{roof['threads']} threads: " + ", ".join(
                f"{d} {g['gflops']} GFLOP/s" for d, g in roof["gemm"].items()))
    try:
        bench.run()
        if roof is not None:
            log(f"GEMM roofline, best of {roof['gemm_measurements']} measurements: " + ", ".join(
                f"{d} {g['gflops']} GFLOP/s" for d, g in roof["gemm"].items()))
    finally:
        if a.own_adapter_root:
            shutil.rmtree(a.adapter_root, ignore_errors=True)
    linear, attn, shape = flops_per_token(a.folder, a.outputs[0])
    doc = {
        "command": "python -m bench.run " + " ".join(sys.argv[1:] if argv is None else argv),
        "versions": versions(),
        "device": device_info(a.device),
        "model": {"name": a.model, "folder": str(a.folder), "max_tokens": bench.limit,
                  "engine_dtype": a.dtype, **dict(zip(("engine_dtype_resolved",
                                                       "engine_dtype_reason"),
                                                      bench.engine_dtype())), **shape,
                  "linear_gflop_per_token": round(linear / 1e9, 4)},
        "matmul_peak_tflops": peak,
        "cpu_roofline": roof,
        "corpora": {k: c.stats(bench.tok, bench.limit) for k, c in bench.corpora.items()},
        "runs": bench.runs,
    }
    doc.update(bench.report(peak, roof))
    doc.update(bench.extra)
    doc["total_s"] = round(time.perf_counter() - started, 1)
    text = json.dumps(doc, indent=1)
    if a.json_out:
        Path(a.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json_out).write_text(text + "\n")
    print(text, flush=True)
    for t in doc["targets"]:
        log(f"target {'MET ' if t['met'] else 'MISSED'} {t['target']}: {t['value']} "
            f"(threshold {t['threshold']})")
    log(f"done in {doc['total_s']}s")
    return doc


if __name__ == "__main__":
    main()
