"""Engine-side figures of a timed run, from the engine's Prometheus metrics (before / after).

They say why a number is what it is: how full the batches were, how long a batch took, how
much of the wall time the model was busy, how long items queued and tokenization took, and
over HTTP how much CPU the server and the client processes spent per request (on a fast GPU,
short requests are bound by that, not by the device).
Missing metrics (another engine version) give an empty dict, never an error.
"""

from __future__ import annotations

import os
from typing import Callable

HISTOGRAMS = {
    "sie_batch_tokens": "batch_tokens",
    "sie_batch_items": "batch_items",
    "sie_inference_seconds": "inference_s",
    "sie_tokenize_seconds": "tokenize_s",
    "sie_queue_seconds": "queue_s",
}


def parse(text: str) -> dict[str, float]:
    """{"batch_tokens_sum": .., "batch_tokens_count": .., ...} summed over labels."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            for prefix, short in HISTOGRAMS.items():
                if s.name in (f"{prefix}_sum", f"{prefix}_count"):
                    key = f"{short}_{s.name.rsplit('_', 1)[1]}"
                    out[key] = out.get(key, 0.0) + float(s.value)
    return out


def snapshot_inprocess(engine) -> Callable[[], dict[str, float]]:
    def snap() -> dict[str, float]:
        try:
            return parse(engine.metrics.render().decode())
        except Exception:  # noqa: BLE001 - diagnostics only
            return {}
    return snap


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a local process (all its threads; Linux /proc), else None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def snapshot_http(url: str, pid: int | None = None) -> Callable[[], dict[str, float]]:
    """Metrics of the server at `url`, plus its process's CPU seconds when `pid` is given."""
    def snap() -> dict[str, float]:
        out: dict[str, float] = {}
        try:
            import httpx

            r = httpx.get(f"{url}/metrics", timeout=10)
            out = parse(r.text) if r.status_code == 200 else {}
        except Exception:  # noqa: BLE001 - diagnostics only
            pass
        cpu = process_cpu_s(pid) if pid is not None else None
        if cpu is not None:
            out["server_cpu_s"] = cpu
        return out
    return snap


def delta(before: dict[str, float], after: dict[str, float], wall_s: float | None) -> dict:
    """Per-run engine figures from two snapshots."""
    if not before and not after:
        return {}
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    out: dict = {}
    batches = d.get("batch_tokens_count", 0.0)
    if batches:
        out["batches"] = int(batches)
        out["mean_batch_tokens"] = round(d.get("batch_tokens_sum", 0.0) / batches, 1)
        out["mean_batch_items"] = round(d.get("batch_items_sum", 0.0) / batches, 1)
    if d.get("inference_s_count"):
        out["mean_batch_ms"] = round(1e3 * d["inference_s_sum"] / d["inference_s_count"], 2)
        if wall_s:
            out["inference_s_per_wall_s"] = round(d["inference_s_sum"] / wall_s, 3)
    if d.get("tokenize_s_count"):
        out["mean_tokenize_ms"] = round(1e3 * d["tokenize_s_sum"] / d["tokenize_s_count"], 3)
    if d.get("queue_s_count"):
        out["mean_queue_ms"] = round(1e3 * d["queue_s_sum"] / d["queue_s_count"], 2)
    if "server_cpu_s" in d:
        out["server_cpu_s"] = round(d["server_cpu_s"], 3)
        if wall_s:  # ~1 means one core busy: the server's Python threads share one GIL
            out["server_cpu_cores"] = round(d["server_cpu_s"] / wall_s, 2)
    return out


def attach(summary: dict, before: dict[str, float], after: dict[str, float],
           wall_s: float | None) -> None:
    """Adds `engine_stats` (the delta of two snapshots) to a run's summary and, for HTTP runs,
    the server / client CPU milliseconds per request."""
    summary["engine_stats"] = delta(before, after, wall_s)
    n = summary.get("requests")
    if not n:
        return
    server = summary["engine_stats"].get("server_cpu_s")
    if server is not None:
        summary["server_cpu_ms_per_request"] = round(1e3 * server / n, 3)
    if summary.get("client_cpu_s") is not None:
        summary["client_cpu_ms_per_request"] = round(1e3 * summary["client_cpu_s"] / n, 3)
