"""Print the headline figures of one or more `bench.run` JSON files as a compact table.

    python -m bench.summarize OUT/*.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.0f}"
    return str(v)


def summarize(doc: dict, name: str = "") -> list[str]:
    lines = []
    dev = doc.get("device", {})
    where = dev.get("gpu") or f"{dev.get('cpu_count')} CPUs"
    lines.append(f"== {name} {doc.get('model', {}).get('name')} on {where}"
                 f" (matmul peak {doc.get('matmul_peak_tflops')} TFLOP/s) git {doc.get('versions', {}).get('git')}")
    lines.append(f"   {doc.get('command')}")
    roof = doc.get("cpu_roofline")
    if roof:
        lines.append(f"   CPU {roof.get('cpu_model')}, flags {','.join(roof.get('flags', []))}, "
                     f"{roof.get('threads')} threads; GEMM roofline " + ", ".join(
                         f"{d} {g['gflops']} GFLOP/s" for d, g in roof.get("gemm", {}).items()))
    for key, run in doc.get("runs", {}).items():
        lines.append(f"  {key}")
        for path, s in run.items():
            if path == "ratios" or not isinstance(s, dict):
                continue
            if "error" in s and "tokens_per_s" not in s:
                lines.append(f"    {path:32s} ERROR {s['error'][:200]}")
                continue
            parts = [f"{_fmt(s.get('tokens_per_s'))} tok/s", f"{_fmt(s.get('texts_per_s'))} texts/s"]
            if "requests_per_s" in s and "single_query" in path:
                parts.append(f"{_fmt(s['requests_per_s'])} req/s")
            if "p50_ms" in s:
                parts.append(f"p50 {s['p50_ms']:.2f} ms p99 {s['p99_ms']:.2f} ms")
            if "pct_of_roofline" in s:
                parts.append(f"{s['useful_gflops']:.1f} GFLOP/s ({s['pct_of_roofline']:.0f}% of "
                             f"the {s['roofline_dtype']} roofline)")
            for k, v in s.items():
                if k.startswith("dense_min_cosine"):
                    parts.append(f"min cos {v}")
            if "pct_of_matmul_peak" in s:
                parts.append(f"{s['useful_tflops']:.1f} TFLOP/s ({s['pct_of_matmul_peak']:.0f}% peak)")
            es = s.get("engine_stats") or {}
            if "batches" in es:
                parts.append(f"[{es['batches']} batches x {es['mean_batch_tokens']:.0f} tok, "
                             f"{es.get('mean_batch_ms', 0):.1f} ms each, busy "
                             f"{es.get('inference_s_per_wall_s', '-')}]")
            if s.get("errors"):
                parts.append(f"ERRORS {s['errors']}")
            if "token_check" in s:
                parts.append(s["token_check"])
            lines.append(f"    {path:32s} " + ", ".join(parts))
        for r, v in run.get("ratios", {}).items():
            lines.append(f"    ratio {r}: {v}")
    lora = doc.get("lora")
    if lora:
        if lora.get("status") != "ok":
            lines.append(f"  lora: {lora.get('status')}: {lora.get('message')}")
        else:
            p, q = lora["passages"], lora["queries"]
            lines.append(f"  lora passages: none {_fmt(p['no_adapters'].get('tokens_per_s'))} tok/s, "
                         f"{lora['adapters']} adapters {_fmt(p['adapters_interleaved'].get('tokens_per_s'))} "
                         f"tok/s, ratio {p['ratio_adapters_vs_none']}")
            lines.append(f"  lora queries: mixed {_fmt(q['mixed'].get('texts_per_s'))} q/s, per-adapter "
                         f"{_fmt(q['per_adapter'].get('texts_per_s'))} q/s, none "
                         f"{_fmt(q['no_adapters'].get('texts_per_s'))} q/s, "
                         f"mixed/per-adapter {q['ratio_mixed_vs_per_adapter']}")
    for e in doc.get("errors", []):
        lines.append(f"  ERROR {e.get('what')}: {e.get('error', '')[:300]}")
    for t in doc.get("targets", []):
        lines.append(f"  target {'MET   ' if t['met'] else 'MISSED'} {t['target']}: "
                     f"{_fmt(t['value'])} (threshold {_fmt(t['threshold'])})")
    return lines


def main(argv: list[str] | None = None) -> None:
    for p in argv if argv is not None else sys.argv[1:]:
        try:
            doc = json.loads(Path(p).read_text())
        except Exception as exc:  # noqa: BLE001
            print(f"== {p}: unreadable ({exc})")
            continue
        print("\n".join(summarize(doc, Path(p).name)))


if __name__ == "__main__":
    main()
