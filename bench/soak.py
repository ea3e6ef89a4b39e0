"""Soak: a real server under hours (or minutes) of mixed traffic from several processes.

    PYTHONPATH=src python -m bench.soak --minutes 20 --processes 3 --clients 4 --out soak.json

The server (CPU, fp32) serves three families: the BGE-M3-shaped test model (XLM-R, dense +
sparse + multivector, four LoRA adapters under `--max-adapters 2` and an adapter byte budget of
two, so adapters are loaded and evicted all along), all-MiniLM-L6-v2 (BERT) and a ModernBERT
cross-encoder. Client processes (SDK-free: httpx and numpy only) send encode, score and
OpenAI requests with short, long and over-long texts; some hang up mid-request, some carry a
deadline that expires. Every answer is checked against the same call made alone before the
load; the server's RSS and open file descriptors are sampled every few seconds. Prints one JSON
document: requests by class and status, mismatches, latency p50/p99 by class, the RSS slope
and fd range after warm-up, adapter loads and evictions. `tests/test_soak.py` runs it briefly.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import re
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import httpx
import numpy as np

from .server import REPO, Server

M3, MINILM, RERANKER = "BAAI/bge-m3", "sentence-transformers/all-MiniLM-L6-v2", "test/reranker"
ADAPTERS = [f"soak/lora-{k}" for k in range(4)]
WORDS = ("lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor "
         "incididunt ut labore et dolore magna aliqua ut enim ad minim veniam quis").split()
TOL = 1e-4  # fp32, a packed batch against the same text alone


def texts(rng: random.Random) -> dict[str, list[str]]:
    """Short (~10 tokens), long (~400) and over-long texts (over every model's limit: cut)."""
    def text(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n))
    return {"short": [text(rng.randint(3, 10)) for _ in range(12)],
            "long": [text(rng.randint(250, 350)) for _ in range(4)],
            "overlong": [text(rng.randint(9000, 10000)) for _ in range(2)],
            "queries": [text(rng.randint(3, 8)) for _ in range(3)]}


def build(work: Path) -> dict[str, Path]:
    """The model folders and the adapter root (built once into `work`)."""
    sys.path[:0] = [str(REPO / "scripts"), str(REPO / "tests")]
    import make_bge_m3_test_model
    import make_modernbert_test_models
    import reference
    from lora_adapters import make_adapter

    out = {"m3": work / "bge-m3", "reranker": work / "reranker", "adapters": work / "adapters",
           "minilm": reference.minilm_dir()}
    if not (out["m3"] / "config.json").exists():
        make_bge_m3_test_model.build(out["m3"])
    if not (out["reranker"] / "config.json").exists():
        make_modernbert_test_models.build(out["reranker"], kind="reranker")
    for k, name in enumerate(ADAPTERS):
        if not (out["adapters"] / name / "adapter_config.json").exists():
            make_adapter(out["m3"], out["adapters"] / name, r=4, seed=10 + k,
                         targets=["query", "value"])
    return out


# -- the calls -------------------------------------------------------------------------

KINDS = {"small": 4, "encode-m3": 4, "encode-minilm": 3, "score-m3": 2, "score-reranker": 2,
         "openai": 2, "hangup": 1, "deadline": 1}
M3_OPTIONS = [{}] + [{"lora_id": a} for a in ADAPTERS]


def call_for(kind: str, rng: random.Random, pool: dict[str, list[str]]) -> tuple[str, dict]:
    """A request of class `kind`: (route, JSON body)."""
    def pick(n: int, classes=("short",)) -> list[str]:
        return [rng.choice(pool[rng.choice(classes)]) for _ in range(n)]
    mixed = ("short", "short", "long", "overlong")
    if kind == "small":  # one short text: the latency that fairness protects
        return f"/v1/encode/{M3}", {"items": [{"text": rng.choice(pool["short"])}],
                                     "params": {"output_types": ["dense", "sparse"], "options": {}}}
    if kind == "encode-m3":  # over-long texts without an adapter (fewer references to make)
        options = rng.choice(M3_OPTIONS)
        items = pick(rng.randint(1, 5), mixed if not options else ("short", "long"))
        return f"/v1/encode/{M3}", {"items": [{"text": t} for t in items],
                                     "params": {"output_types": ["dense", "sparse"], "options": options}}
    if kind == "encode-minilm":
        return f"/v1/encode/{MINILM}", {"items": [{"text": t} for t in pick(rng.randint(1, 8), mixed)]}
    if kind in ("score-m3", "score-reranker"):
        model = M3 if kind == "score-m3" else RERANKER
        items = pick(4, ("short", "long"))
        return f"/v1/score/{model}", {"query": {"text": rng.choice(pool["queries"])},
                                      "items": [{"id": f"i{k}", "text": t} for k, t in enumerate(items)]}
    if kind == "openai":
        return "/v1/embeddings", {"model": MINILM, "input": pick(rng.randint(1, 6))}
    if kind == "hangup":  # a long request the client gives up on
        return f"/v1/encode/{M3}", {"items": [{"text": t} for t in pool["overlong"]]}
    if kind == "deadline":  # a deadline that expires while queued or computing
        return f"/v1/encode/{M3}", {"items": [{"text": t} for t in pool["overlong"]],
                                    "params": {"options": {"timeout_s": 0.002}}}
    raise ValueError(kind)


def answers(route: str, request: dict, body: dict) -> dict[tuple, object]:
    """Each output of an answer under the key of what it depends on alone: (route, the item's
    text, the options) for vectors, (route, query, the item's text) for scores."""
    if route.startswith("/v1/score"):
        text = {i["id"]: i["text"] for i in request["items"]}
        return {(route, request["query"]["text"], text[s["item_id"]]): s["score"]
                for s in body["scores"]}
    if route == "/v1/embeddings":
        return {(route, t, ""): np.asarray(d["embedding"], np.float32)
                for t, d in zip(request["input"], body["data"])}
    opts = json.dumps(request.get("params", {}).get("options", {}), sort_keys=True)
    out = {}
    for item, got in zip(request["items"], body["items"]):
        sparse = got.get("sparse")
        out[(route, item["text"], opts)] = (
            np.asarray(got["dense"]["values"], np.float32),
            None if sparse is None else dict(zip(sparse["indices"], sparse["values"])))
    return out


def same(got, ref) -> bool:
    if isinstance(got, float):
        return abs(got - ref) <= TOL
    if isinstance(got, np.ndarray):
        return bool(np.allclose(got, ref, atol=TOL))
    (dense, sparse), (rdense, rsparse) = got, ref
    if not np.allclose(dense, rdense, atol=TOL):
        return False
    return sparse is None or (sparse.keys() == rsparse.keys()
                              and all(abs(sparse[i] - rsparse[i]) <= TOL for i in sparse))


def references(url: str, pool: dict[str, list[str]]) -> dict:
    """Every output a worker can meet, each from a call of that one item made alone."""
    every = pool["short"] + pool["long"] + pool["overlong"]
    calls = [(f"/v1/encode/{M3}", {"items": [{"text": t}], "params": {
        "output_types": ["dense", "sparse"], "options": o}})
        for t in every for o in (M3_OPTIONS if t not in pool["overlong"] else [{}])]
    calls += [(f"/v1/encode/{MINILM}", {"items": [{"text": t}]}) for t in every]
    calls += [("/v1/embeddings", {"model": MINILM, "input": [t]}) for t in pool["short"]]
    calls += [(f"/v1/score/{m}", {"query": {"text": q}, "items": [{"id": "i0", "text": t}]})
              for m in (M3, RERANKER) for q in pool["queries"] for t in pool["short"] + pool["long"]]
    refs: dict = {}
    with httpx.Client(base_url=url, timeout=300) as http:
        for route, request in calls:
            r = http.post(route, json=request)
            r.raise_for_status()
            refs.update(answers(route, request, r.json()))
    return refs


# -- a worker process: `clients` threads, each a closed loop until the deadline ------------

def worker(url: str, pool: dict, refs: dict, seed: int, clients: int, until: float) -> dict:
    lock = threading.Lock()
    tally: Counter = Counter()
    latency: dict[str, list[float]] = defaultdict(list)
    problems: list[str] = []

    def client(k: int) -> None:
        rng = random.Random(seed * 1000 + k)
        with httpx.Client(base_url=url, timeout=120) as http:
            while time.time() < until:
                kind = rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
                route, body = call_for(kind, rng, pool)
                started = time.perf_counter()
                try:
                    if kind == "hangup":
                        http.post(route, json=body, timeout=0.05)
                    else:
                        r = http.post(route, json=body)
                except httpx.TimeoutException:
                    with lock:
                        tally[(kind, "hung up" if kind == "hangup" else "client timeout")] += 1
                        if kind != "hangup":
                            problems.append(f"{kind}: no answer within 120 s")
                    continue
                ms = (time.perf_counter() - started) * 1e3
                problem = check(kind, route, body, r, refs)
                with lock:
                    tally[(kind, r.status_code if kind != "hangup" else f"answered {r.status_code}")] += 1
                    if r.status_code == 200 and kind != "hangup":
                        latency[kind].append(ms)
                    if problem:
                        problems.append(problem)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"tally": [[k, s, n] for (k, s), n in tally.items()], "latency": dict(latency),
            "problems": problems[:50], "problem_count": len(problems)}


def check(kind: str, route: str, request: dict, r: httpx.Response, refs: dict) -> str | None:
    """None when the answer is right: a 200 equal to the calls made alone, or a 408 for a
    request whose deadline expired."""
    if kind == "deadline" and r.status_code == 408:
        return None
    if r.status_code != 200:
        return f"{kind}: {r.status_code} {r.text[:200]}"
    if kind in ("hangup", "deadline"):
        return None  # answered in time after all: nothing to compare against
    body = r.json()
    sent = request.get("items", request.get("input"))
    answered = body.get("items", body.get("data", body.get("scores")))
    if len(answered) != len(sent):
        return f"{kind}: {len(answered)} outputs for {len(sent)} items"
    got = answers(route, request, body)
    for key, out in got.items():
        if key not in refs:
            return f"{kind}: no reference for {key[:2]}"
        if not same(out, refs[key]):
            return f"{kind}: an output differs from the same item sent alone"
    return None


# -- the server's RSS and open files ----------------------------------------------------

def sample(pid: int) -> tuple[float, int]:
    rss = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
               if line.startswith("VmRSS:"))
    return rss / 1024, len(os.listdir(f"/proc/{pid}/fd"))


def log_progress(message: str) -> None:
    print(f"soak: {message}", file=sys.stderr, flush=True)


def metric(text: str, name: str) -> float:
    return sum(float(m.group(1)) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def run(minutes: float, processes: int, clients: int, work: Path, seed: int = 0,
        warmup: float = 0.25) -> dict:
    folders = build(work)
    pool = texts(random.Random(seed))
    extra = ["--model", f"{MINILM}={folders['minilm']}", "--model", f"{RERANKER}={folders['reranker']}",
             "--default-model", MINILM, "--default-model", RERANKER,
             "--adapter-root", str(folders["adapters"]), "--max-adapters", "2",
             "--max-batch-tokens", "1024", "--max-queued-tokens", "1000000"]
    adapter_bytes = sum(f.stat().st_size for f in (folders["adapters"] / ADAPTERS[0]).iterdir())
    extra += ["--max-adapter-bytes", str(2 * adapter_bytes + adapter_bytes // 2)]
    with Server(M3, folders["m3"], "cpu", "float32", extra) as srv:
        started = time.perf_counter()
        refs = references(srv.url, pool)
        log_progress(f"{len(refs)} references in {time.perf_counter() - started:.0f} s; load for {minutes} min")
        samples: list[tuple[float, float, int]] = []
        until = time.time() + minutes * 60
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(processes) as p:
            jobs = [p.apply_async(worker, (srv.url, pool, refs, seed + 100 + k, clients, until))
                    for k in range(processes)]
            start = time.time()
            while not all(j.ready() for j in jobs):
                samples.append((time.time() - start, *sample(srv.proc.pid)))
                time.sleep(2.0)
            results = [j.get() for j in jobs]
        samples.append((time.time() - start, *sample(srv.proc.pid)))
        metrics = httpx.get(f"{srv.url}/metrics").text
        log = srv.log_tail(2000)
    return summarize(results, samples, metrics, log, minutes, processes, clients, warmup)


def summarize(results, samples, metrics, log, minutes, processes, clients, warmup) -> dict:
    tally: Counter = Counter()
    latency: dict[str, list[float]] = defaultdict(list)
    for res in results:
        for kind, status, n in res["tally"]:
            tally[(kind, str(status))] += n
        for kind, values in res["latency"].items():
            latency[kind] += values
    t = np.asarray([s[0] for s in samples])
    rss = np.asarray([s[1] for s in samples])
    fds = np.asarray([s[2] for s in samples])
    after = t >= t[-1] * warmup
    slope = float(np.polyfit(t[after] / 60, rss[after], 1)[0]) if after.sum() >= 3 else None
    by_status: Counter = Counter()
    for (_, status), n in tally.items():
        by_status[status] += n
    return {
        "minutes": minutes, "processes": processes, "clients_per_process": clients,
        "requests": sum(tally.values()),
        "by_class": {f"{k} {s}": n for (k, s), n in sorted(tally.items())},
        "by_status": dict(sorted(by_status.items())),
        "server_5xx": sum(n for s, n in by_status.items() if s.isdigit() and s.startswith("5")),
        "problems": sum(r["problem_count"] for r in results),
        "first_problems": [p for r in results for p in r["problems"]][:10],
        "latency_ms": {k: {"n": len(v), "p50": round(float(np.percentile(v, 50)), 1),
                           "p99": round(float(np.percentile(v, 99)), 1)}
                       for k, v in sorted(latency.items()) if v},
        "rss_mb": {"start": round(float(rss[0]), 1), "after_warmup": round(float(rss[after][0]), 1),
                   "end": round(float(rss[-1]), 1), "max": round(float(rss.max()), 1),
                   "slope_mb_per_min_after_warmup": None if slope is None else round(slope, 2),
                   "series": [[round(float(a) / 60, 1), round(float(b))]  # (minute, MB), ~20 points
                              for a, b in zip(t[::max(1, len(t) // 20)], rss[::max(1, len(t) // 20)])]},
        "open_fds": {"after_warmup_min": int(fds[after].min()), "after_warmup_max": int(fds[after].max()),
                     "end": int(fds[-1])},
        "server_requests_counted": metric(metrics, "sie_requests_total"),
        "adapter_loads": metric(metrics, "sie_adapter_loads_total"),
        "adapter_evictions": metric(metrics, "sie_adapter_evictions_total"),
        "server_errors_logged": log.count('"level": "ERROR"') + log.count("Traceback"),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=20.0)
    ap.add_argument("--processes", type=int, default=3)
    ap.add_argument("--clients", type=int, default=4, help="client threads per process")
    ap.add_argument("--work", type=Path, default=None, help="model folders (default: a temp dir)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="sie-soak-"))
    out = run(args.minutes, args.processes, args.clients, work)
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0 if out["server_5xx"] == 0 and out["problems"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
