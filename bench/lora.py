"""LoRA benchmark (issue 4): mixed-adapter batches against no adapters and against a
one-batch-per-adapter policy, on the in-process engine.

Adapters are made with peft on the base model (random A, random non-zero B; speed does not
depend on the values), saved under a temporary adapter root that the engine is given in
`Settings.adapter_roots`; requests name them with `options={"lora_id": ...}`.

Loads:
- ``passages``: the passage load of the main benchmark, once without adapters and once with
  request i using adapter i mod K (K distinct adapters interleaved). Target: >= 0.8x.
- ``short queries``: 64 closed-loop clients, 16 queries per request, each request's adapter
  drawn at random. ``mixed``: the engine batches whatever is queued, adapters mixed.
  ``per_adapter``: a one-batch-per-adapter server simulated with the same engine: rounds of
  64 requests (one per client, adapters drawn as before), each round's requests grouped by
  adapter and the groups submitted one after another, each waiting for the previous, so no
  batch ever holds two adapters. Target: mixed >= 2x per_adapter.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from . import stats
from .load import LoadResult, chunk, closed_loop_threads, engine_call

TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


def make_adapters(base: Path, root: Path, count: int, rank: int = 16,
                  targets: list[str] | None = None, seed: int = 0) -> list[str]:
    """`count` peft LoRA adapters of the model in `base`, saved as root/bench-lora-K."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    from .reference import quiet_transformers

    quiet_transformers()
    model = AutoModel.from_pretrained(str(base), dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets or TARGETS,
                        lora_dropout=0.0)
    model = get_peft_model(model, config)
    g = torch.Generator().manual_seed(seed)
    ids = []
    for k in range(count):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_A" in name:
                    p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
                elif "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        lora_id = f"bench-lora-{k}"
        model.save_pretrained(str(root / lora_id))
        ids.append(lora_id)
    return ids


def lora_supported(engine, model: str, lora_id: str, text: str, outputs: list[str]) -> str | None:
    """None when the engine serves `lora_id`; else the reason it does not."""
    try:
        engine.submit(model, [text], outputs, {"lora_id": lora_id}).result(timeout=600)
        return None
    except Exception as exc:  # noqa: BLE001 - any failure means: not available
        return f"{type(exc).__name__}: {getattr(exc, 'message', None) or exc}"


def per_adapter_rounds(engine, model: str, requests: list[list[str]], adapters: list[str | None],
                       outputs: list[str], clients: int) -> LoadResult:
    """Rounds of `clients` requests; within a round one adapter's group at a time. A group's
    requests are submitted from a thread pool, so they are tokenized in parallel as the
    closed-loop clients' are."""
    result = LoadResult()
    pool = ThreadPoolExecutor(clients, thread_name_prefix="per-adapter")
    started = time.perf_counter()
    for r0 in range(0, len(requests), clients):
        idx = list(range(r0, min(r0 + clients, len(requests))))
        for adapter in dict.fromkeys(adapters[i] for i in idx):
            group = [i for i in idx if adapters[i] == adapter]
            opts = {"lora_id": adapter} if adapter else {}
            t0 = time.perf_counter()
            futures = list(pool.map(lambda i: engine.submit(model, requests[i], outputs, opts),
                                    group))
            for i, f in zip(group, futures):
                try:
                    res = f.result()
                except Exception as exc:  # noqa: BLE001
                    result.errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                result.records.append((t0, time.perf_counter(), len(res),
                                       sum(x.token_count for x in res)))
    result.wall_s = time.perf_counter() - started
    pool.shutdown()
    return result


def run(engine, model: str, adapter_ids: list[str], passages: list[str], queries: list[str],
        outputs: list[str], clients: int, request_size: int, seed: int = 0,
        log=print) -> dict:
    """The LoRA figures (JSON-ready); `engine` must serve the adapter root holding the ids."""
    reason = lora_supported(engine, model, adapter_ids[0], passages[0], outputs)
    if reason is not None:
        return {"status": "unavailable", "message": f"LoRA is not served by this engine "
                f"build, so the LoRA benchmark did not run ({reason})"}
    out: dict = {"status": "ok", "adapters": len(adapter_ids)}
    t0 = time.perf_counter()
    for a in adapter_ids[1:]:  # load them all before timing
        engine.submit(model, [passages[0]], outputs, {"lora_id": a}).result()
    out["adapter_load_s"] = round(time.perf_counter() - t0, 3)
    k = len(adapter_ids)

    reqs = chunk(passages, request_size)
    def p_opts(i: int) -> dict:
        return {"lora_id": adapter_ids[i % k]}

    warm = reqs[: max(2, len(reqs) // 8)]
    closed_loop_threads(engine_call(engine, model, warm, outputs, p_opts), len(warm), clients)
    snap = stats.snapshot_inprocess(engine)

    def measured(run) -> dict:
        before = snap()
        summary = run().summary()
        stats.attach(summary, before, snap(), summary.get("wall_s"))
        return summary

    log(f"  lora passages: no adapters ({len(passages)} texts)")
    b = measured(lambda: closed_loop_threads(engine_call(engine, model, reqs, outputs), len(reqs),
                                             clients))
    log(f"  lora passages: {k} adapters interleaved")
    m = measured(lambda: closed_loop_threads(engine_call(engine, model, reqs, outputs, p_opts),
                                             len(reqs), clients))
    out["passages"] = {"clients": clients, "request_size": request_size, "no_adapters": b,
                       "adapters_interleaved": m,
                       "ratio_adapters_vs_none": _ratio(m, b), "target": 0.8}

    q_clients, q_size = 64, 16
    qreqs = chunk(queries, q_size)
    rng = np.random.default_rng(seed)
    drawn = [adapter_ids[j] for j in rng.integers(0, k, len(qreqs))]
    def q_opts(i: int) -> dict:
        return {"lora_id": drawn[i]}

    warm = qreqs[: max(2, len(qreqs) // 8)]
    closed_loop_threads(engine_call(engine, model, warm, outputs, q_opts), len(warm), q_clients)
    log(f"  lora queries: mixed ({len(queries)} queries, {q_clients} clients)")
    qmixed = measured(lambda: closed_loop_threads(
        engine_call(engine, model, qreqs, outputs, q_opts), len(qreqs), q_clients))
    log("  lora queries: one batch per adapter")
    qper = measured(lambda: per_adapter_rounds(engine, model, qreqs, drawn, outputs, q_clients))
    log("  lora queries: no adapters")
    qbase = measured(lambda: closed_loop_threads(
        engine_call(engine, model, qreqs, outputs), len(qreqs), q_clients))
    out["queries"] = {"clients": q_clients, "request_size": q_size, "mixed": qmixed,
                      "per_adapter": qper, "no_adapters": qbase,
                      "ratio_mixed_vs_per_adapter": _ratio(qmixed, qper), "target": 2.0,
                      "ratio_mixed_vs_none": _ratio(qmixed, qbase)}
    return out


def _ratio(a: dict, b: dict) -> float | None:
    if "tokens_per_s" not in a or "tokens_per_s" not in b or not b["tokens_per_s"]:
        return None
    return round(a["tokens_per_s"] / b["tokens_per_s"], 3)
