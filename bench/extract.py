"""Entity extraction benchmark: the engine vs gliner's own batched loop on one GLiNER model.

    PYTHONPATH=src python -m bench.extract --device cpu           # JSON on stdout

Model: a GLiNER uni-encoder span checkpoint with random weights (speed does not depend on
weight values) built by scripts/make_gliner_test_models.py into the cache folder: `--size
small` (hidden 256, 4 layers; for CPUs), `base` (hidden 768, 12 layers: gliner_multi-v2.1's
mDeBERTa-v3-base shape) or `tiny` (the tests' 64 wide, 2 layers; `--quick`). Corpus: the multilingual passages of the bge-m3-lite data package
(each under the model's 384-word window, so both paths read the same words), five labels.
- `engine_inprocess`: `Engine.submit_extract` from `--clients` closed-loop threads,
  `--request-size` texts per request (rows of concurrent requests share token-budget batches);
- `gliner_batch_predict`: `GLiNER.batch_predict_entities` (= `inference`, batch size 8, its
  default) over the corpus in order, under inference_mode.

Both paths first run the whole corpus untimed and their entities are compared: same (start,
end, label) and scores within 1e-4, except where gliner's result differs from ours by a
float tie (a span whose competing label scores within 1e-4 of it, or a score within 1e-4 of
the threshold). In float32 any other difference stops the run before anything is timed.
Then `--rounds` timed rounds, the two paths interleaved (their order alternating); texts/s
from the medians and their ratio. `--phases` adds each path's time per phase, run serially
(engine: tokenizing and windows, the encoder over the batches the scheduler forms, the span
heads and decoding; gliner: its encoder, the rest of its model forward (LSTM, span and
prompt layers, scores), decoding, the rest). `--profile` adds torch.profiler's op totals of
one pass of each path (the engine's serial phases: the profiler does not follow its
scheduler's threads): self CPU time and GFLOP (matrix products) per op; the GFLOP do not
depend on the machine's load, the wall clock does.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LABELS = ["person", "organization", "location", "date", "event"]
SIZES = {"tiny": (64, 2), "small": (256, 4), "base": (768, 12)}
TOLERANCE = 1e-4


def model_folder(cache: Path, size: str) -> Path:
    folder = cache / f"gliner-{size}"
    if not (folder / "gliner_config.json").exists():
        sys.path.insert(0, str(REPO / "scripts"))
        from make_gliner_test_models import build

        hidden, layers = SIZES[size]
        build(folder, "deberta", hidden=hidden, layers=layers)
    return folder


def corpus(n: int) -> list[str]:
    sys.path.insert(0, str(REPO / "tests"))
    from texts import miracl_passages

    passages = [p for p in miracl_passages() if len(p.split()) < 300]
    return [passages[i % len(passages)] for i in range(n)]


def compare(ours: list[list[dict]], theirs: list[list[dict]], threshold: float) -> dict:
    """How far the engine's entities agree with gliner's (module docstring)."""
    key = lambda e: (e["start"], e["end"], e["label"])  # noqa: E731
    same = ties = 0
    worst = 0.0
    unexplained = []
    for i, (o, t) in enumerate(zip(ours, theirs, strict=True)):
        mine, refs = {key(e): e["score"] for e in o}, {key(e): e["score"] for e in t}
        for k in mine.keys() & refs.keys():
            worst = max(worst, abs(mine[k] - refs[k]))
        same += len(mine.keys() & refs.keys())
        for k in mine.keys() ^ refs.keys():
            score = mine.get(k, refs.get(k))
            rival = [s for other, s in {**mine, **refs}.items()
                     if other[:2] == k[:2] and other != k]
            if abs(score - threshold) <= TOLERANCE or any(abs(s - score) <= TOLERANCE
                                                          for s in rival):
                ties += 1
            else:
                unexplained.append({"text": i, "span": k, "score": score,
                                    "only_in": "engine" if k in mine else "gliner"})
    return {"entities_agreeing": f"{same}/{sum(len(t) for t in theirs)}",
            "differing_by_float_ties": ties, "unexplained": unexplained[:10],
            "max_score_diff": worst}


def engine_pass(engine, texts: list[str], args, options: dict) -> list[list[dict]]:
    requests = [texts[i:i + args.request_size] for i in range(0, len(texts), args.request_size)]
    with ThreadPoolExecutor(args.clients) as pool:
        return [r["entities"] for part in pool.map(
            lambda t: engine.extract("gliner", t, LABELS, options)[0], requests) for r in part]


def engine_phases(engine, texts: list[str], options: dict) -> dict[str, float]:
    """The engine's path one phase at a time, in this thread: prepare_extract, the forward of
    the batches the scheduler forms from one request (in order, up to its token budget), and
    the request's finish (span heads, decoding, windows merged)."""
    from sie_server.engine.extract import ExtractOptions
    from sie_server.engine.request import Request
    from sie_server.engine.scheduler import Scheduler

    with engine.registry.use("gliner") as handle:
        model = handle.model
    out = {}
    started = time.perf_counter()
    plan = model.prepare_extract(texts, LABELS, ExtractOptions.parse(options))
    out["tokenize_and_windows_s"] = time.perf_counter() - started
    request = Request(plan.rows, [len(r) for r in plan.rows], plan.output_types)
    batches, tokens = [[]], 0
    for i, row in enumerate(plan.rows):
        if batches[-1] and tokens + len(row) > engine.registry.max_batch_tokens:
            batches.append([])
            tokens = 0
        batches[-1].append((request, i))
        tokens += len(row)
    started = time.perf_counter()
    for batch in batches:
        Scheduler._deliver(batch, model.forward(Scheduler._pack(batch)).to_host())
    out["encoder_s"] = time.perf_counter() - started
    started = time.perf_counter()
    plan.finish(request.future.result())
    out["span_heads_and_decoding_s"] = time.perf_counter() - started
    out["batches"] = len(batches)
    return out


def gliner_phases(ref, texts: list[str], threshold: float) -> dict[str, float]:
    """gliner's `batch_predict_entities` with its encoder, model forward and decoding timed
    (the model's forward less its encoder: LSTM, span and prompt layers, scores)."""
    spent: dict[str, float] = defaultdict(float)
    wrapped = []

    def timed(obj, name: str, phase: str) -> None:
        inner = getattr(obj, name)

        def wrapper(*a, **k):
            started = time.perf_counter()
            try:
                return inner(*a, **k)
            finally:
                spent[phase] += time.perf_counter() - started
        setattr(obj, name, wrapper)  # an instance attribute over the method, removed below
        wrapped.append((obj, name))

    timed(ref.model.token_rep_layer.bert_layer, "forward", "encoder")
    timed(ref.model, "forward", "model")
    timed(ref, "decode_batch", "decode")
    try:
        started = time.perf_counter()
        ref.batch_predict_entities(texts, LABELS, threshold=threshold)
        total = time.perf_counter() - started
    finally:
        for obj, name in wrapped:
            delattr(obj, name)
    return {"encoder_s": spent["encoder"],
            "span_heads_s": spent["model"] - spent["encoder"],
            "decoding_s": spent["decode"],
            "tokenize_collate_and_rest_s": total - spent["model"] - spent["decode"]}


def profiled(run) -> dict:
    """torch.profiler's totals over `run()`: self CPU seconds, GFLOP of matrix products, and
    the ops taking the most self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        run()
    ops = prof.key_averages()
    top = sorted(ops, key=lambda e: -e.self_cpu_time_total)[:8]
    return {"self_cpu_s": round(sum(e.self_cpu_time_total for e in ops) / 1e6, 3),
            "gflop": round(sum(e.flops for e in ops) / 1e9, 1),
            "top_ops": {e.key: {"self_cpu_s": round(e.self_cpu_time_total / 1e6, 3),
                                **({"gflop": round(e.flops / 1e9, 1)} if e.flops else {})}
                        for e in top}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--texts", type=int, default=128)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--request-size", type=int, default=8)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds of each path")
    parser.add_argument("--phases", action="store_true", help="time each path's phases")
    parser.add_argument("--profile", action="store_true", help="torch.profiler op totals")
    parser.add_argument("--cache", type=Path, default=REPO / ".cache" / "bench")
    parser.add_argument("--quick", action="store_true", help="16 texts, the tiny model, 1 round")
    args = parser.parse_args()
    if args.quick:
        args.texts, args.size, args.rounds = 16, "tiny", 1
    import torch
    from gliner import GLiNER

    from sie_server.config import Settings
    from sie_server.engine import Engine

    folder = model_folder(args.cache, args.size)
    texts = corpus(args.texts)
    threshold = 0.5
    options = {"threshold": threshold}
    engine = Engine(Settings(device=args.device, dtype=args.dtype, default_models=[],
                             models={"gliner": str(folder)}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = GLiNER.from_pretrained(str(folder), local_files_only=True).to(args.device)
    if args.dtype in ("bfloat16", "float16"):
        ref = ref.to(dtype=getattr(torch, args.dtype))
    theirs_pass = lambda: ref.batch_predict_entities(texts, LABELS, threshold=threshold)  # noqa: E731
    ours_pass = lambda: engine_pass(engine, texts, args, options)  # noqa: E731
    result: dict = {"model": f"gliner {args.size} (random weights)", "device": args.device,
                    "dtype": args.dtype, "texts": len(texts), "labels": len(LABELS),
                    "threads": torch.get_num_threads()}
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")  # batch_predict_entities is deprecated
        agreement = compare(ours_pass(), theirs_pass(), threshold)  # also the warm-up
        result.update(agreement)
        if agreement["unexplained"] and args.dtype == "float32":
            result["error"] = "the paths disagree beyond float ties: nothing was timed"
            print(json.dumps(result, indent=2))
            sys.exit(1)
        times: dict[str, list[float]] = {"engine": [], "gliner": []}
        for r in range(args.rounds):
            for name in (("engine", "gliner") if r % 2 == 0 else ("gliner", "engine")):
                started = time.perf_counter()
                (ours_pass if name == "engine" else theirs_pass)()
                times[name].append(time.perf_counter() - started)
        engine_s, ref_s = (statistics.median(times[k]) for k in ("engine", "gliner"))
        result.update({
            "rounds": args.rounds,
            "engine_inprocess_texts_s": round(len(texts) / engine_s, 2),
            "gliner_batch_predict_texts_s": round(len(texts) / ref_s, 2),
            "ratio": round(ref_s / engine_s, 2),
            "round_seconds": {k: [round(t, 3) for t in v] for k, v in times.items()},
        })
        if args.phases:
            result["phases"] = {
                "engine": {k: round(v, 3) for k, v in engine_phases(engine, texts, options).items()},
                "gliner": {k: round(v, 3) for k, v in gliner_phases(ref, texts, threshold).items()}}
        if args.profile:
            # the engine's ops run on its scheduler's threads, which the profiler does not
            # follow: its serial path (`engine_phases`, the same ops) is profiled instead
            result["profile"] = {
                "engine": profiled(lambda: engine_phases(engine, texts, options)),
                "gliner": profiled(theirs_pass)}
    engine.close()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
