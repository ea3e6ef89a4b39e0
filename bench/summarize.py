"""Print the headline figures of one or more `bench.run` JSON files as a compact table.

    python -m bench.summarize OUT/*.json
    python -m bench.summarize --markdown OUT/cpu.json   # the README's per-CPU-class table
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def caps_note(roof: dict) -> str:
    """' (CPUID masked to AVX2-only by scripts/avx2-only)' or ' (torch's kernels capped to AVX2
    by ONEDNN_MAX_CPU_ISA=AVX2, ...)' when the run narrowed the CPU."""
    caps = roof.get("isa_caps") or {}
    notes = ["CPUID masked to AVX2-only by scripts/avx2-only, for every path"] \
        if roof.get("cpuid_masked") else []
    if caps:
        notes.append(f"torch's kernels capped to {roof.get('aten_capability')} by "
                     + ", ".join(f"{k}={v}" for k, v in caps.items()))
    return f" ({'; '.join(notes)})" if notes else ""


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
        lines.append(f"   CPU {roof.get('cpu_model')}, flags {','.join(roof.get('flags', []))}"
                     f"{caps_note(roof)}, "
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


NAMES = {"engine_http": "engine over HTTP", "engine_inprocess": "engine in-process",
         "engine_http_int8": "engine over HTTP, int8", "engine_inprocess_int8":
         "engine in-process, int8", "engine_inprocess_fp32": "engine in-process, fp32",
         "sentence_transformers": "sentence-transformers (batch 32)",
         "onnxruntime": "onnxruntime fp32, fastembed's way", "fastembed": "fastembed 0.9.1",
         "onnxruntime_int8": "onnxruntime dynamic int8", "openvino": "OpenVINO fp32",
         "openvino_int8": "OpenVINO int8 (NNCF static)"}


def markdown(doc: dict) -> list[str]:
    """One table of a CPU run: tokens/s, ratio to sentence-transformers, % of the path's GEMM
    roofline and min dense cosine to sentence-transformers fp32, per corpus."""
    roof = doc.get("cpu_roofline") or {}
    kinds = [k for k in ("passages:dense", "queries:dense") if k in doc.get("runs", {})]
    gemm = ", ".join(f"{d} {g['gflops']:,.0f}" for d, g in roof.get("gemm", {}).items())
    lines = [f"CPU: {roof.get('cpu_model')}, flags {', '.join(roof.get('flags', []))}"
             f"{caps_note(roof)}; "
             f"{roof.get('threads')} threads; engine dtype "
             f"{doc.get('model', {}).get('engine_dtype_resolved')}; GEMM roofline (GFLOP/s): "
             f"{gemm}; git {doc.get('versions', {}).get('git')}", ""]
    head = "| path |" + "".join(f" {k.split(':')[0]} tokens/s | vs ST | % of roofline |"
                                for k in kinds) + " min cos vs ST fp32 |"
    lines += [head, "|" + " --- |" * (1 + 3 * len(kinds) + 1)]
    agree = doc.get("dense_agreement", {})
    for key, name in NAMES.items():
        if not any(key in doc["runs"][k] for k in kinds):
            continue
        row = f"| {name} |"
        for k in kinds:
            s, st = doc["runs"][k].get(key, {}), doc["runs"][k].get("sentence_transformers", {})
            tps, ref = s.get("tokens_per_s"), st.get("tokens_per_s")
            ratio = f"{tps / ref:.2f}x" if tps and ref else "-"
            pct = (f"{s['pct_of_roofline']:.0f}% ({s['roofline_dtype']})"
                   if "pct_of_roofline" in s else "-")
            row += f" {_fmt(tps)} | {ratio} | {pct} |"
        same = key.replace("engine_http", "engine_inprocess")  # the server runs that engine
        cos = [v.get(same) for v in agree.values() if v.get(same) is not None]
        row += f" {min(cos):.4f} |" if cos else " - |"
        lines.append(row)
    return lines


def main(argv: list[str] | None = None) -> None:
    args = list(argv if argv is not None else sys.argv[1:])
    table = "--markdown" in args
    for p in [a for a in args if a != "--markdown"]:
        try:
            doc = json.loads(Path(p).read_text())
        except Exception as exc:  # noqa: BLE001
            print(f"== {p}: unreadable ({exc})")
            continue
        print("\n".join(markdown(doc) if table else summarize(doc, Path(p).name)))


if __name__ == "__main__":
    main()
