"""The CPU's GEMM roofline for one model: how fast this machine multiplies the model's own
linear shapes, at the engine's thread count, in the engine's dtype (and in int8).

For a BERT-style layer the shapes are (tokens x hidden) times hidden -> 3 hidden (fused QKV),
hidden -> hidden, hidden -> intermediate and intermediate -> hidden, with `tokens` the engine's
CPU batch (2,048 tokens). float32 / bfloat16 time both float GEMMs the engine may run,
`torch.nn.functional.linear` (MKL) and oneDNN's packed linear (runtime/packed.py), and keep the
faster per shape; int8 times the
bare u8 x s8 product of runtime/int8.py (`matmul`: oneDNN, weights packed, weight scales
applied; its per-token quantization passes are not counted, so they show as a lower
fraction). The rate is the layer's FLOPs over
the best of several timed rounds of the four shapes (best, not median: on a shared machine the
best round is the one least disturbed), taken at the start and again after each of the
benchmark's rounds, so a slow moment at the start does not set it. A path's fraction of the
roofline is its useful FLOP/s (model parameters and attention on the corpus's real token
counts, bench/models.py) over this.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_bf16",
         "amx_int8", "amx_tile")


def cpu_flags() -> list[str]:
    """The matmul-relevant flags this process sees (CPUID on x86, runtime/device.py), in FLAGS
    order."""
    from sie_server.runtime.device import cpu_flags as all_flags

    have = all_flags()
    if cpuid_masked():  # the mask hides AVX-VNNI too, which torch has no probe to see
        have.discard("avx_vnni")
    return [f for f in FLAGS if f in have]


ISA_CAPS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def isa_caps() -> dict:
    """The environment's caps on the instruction sets torch's kernels may use (ATen's vector
    code, oneDNN, MKL), as set: how a run on a wider CPU stands in for a narrower class. They
    bind torch's paths only; onnxruntime and OpenVINO pick their kernels from the CPU itself."""
    import os

    return {k: os.environ[k] for k in ISA_CAPS if os.environ.get(k)}


def cpuid_masked() -> bool:
    """Whether this process runs under scripts/avx2-only (CPUID shows an AVX2-only CPU to it
    and its children: torch, onnxruntime and OpenVINO alike)."""
    import os

    return "libcpuid_mask" in os.environ.get("LD_PRELOAD", "")


def cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return None


def shapes(folder: Path) -> list[tuple[int, int]]:
    """(in, out) of one layer's linears."""
    cfg = json.loads((folder / "config.json").read_text())
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    return [(h, 3 * h), (h, h), (h, i), (i, h)]


def gemm_gflops(folder: Path, dtype: str, tokens: int = 2048, rounds: int = 7) -> dict:
    """{"gflops": the layer's rate, "shapes": per shape} in `dtype` (float32 | bfloat16 | int8)."""
    import torch

    from sie_server.runtime import int8
    from sie_server.runtime.device import cpu_flags as all_flags

    onednn = torch.backends.mkldnn.is_available() and "avx2" in all_flags()  # x86 only
    ops = []
    for k, n in shapes(folder):
        if dtype == "int8":
            u = torch.randint(0, 256, (tokens, k), dtype=torch.uint8)
            w = int8.pack(torch.randint(-64, 64, (n, k), dtype=torch.int8))
            scale, zero = torch.ones(n), torch.zeros(n, dtype=torch.long)
            ops.append(((k, n), lambda u=u, w=w, s=scale, z=zero: int8.matmul(u, w, s, z)))
        else:
            dt = getattr(torch, dtype)
            x, w = torch.randn(tokens, k, dtype=dt), torch.randn(n, k, dtype=dt)
            ops.append(((k, n), lambda x=x, w=w: torch.nn.functional.linear(x, w)))
            if onednn:
                p = torch.ops.mkldnn._reorder_linear_weight(w, tokens)
                ops.append(((k, n), lambda x=x, p=p: torch.ops.mkldnn._linear_pointwise(
                    x, p, None, "none", [], "")))
    best = {shape: float("inf") for shape, _ in ops}
    with torch.inference_mode():
        for shape, op in ops:
            op()
        for _ in range(rounds):
            for shape, op in ops:
                t0 = time.perf_counter()
                op()
                best[shape] = min(best[shape], time.perf_counter() - t0)
    flop = {s: 2.0 * tokens * s[0] * s[1] for s in best}
    return {"gflops": round(sum(flop.values()) / sum(best.values()) / 1e9, 1),
            "shapes": {f"{tokens}x{k}x{n}": round(flop[(k, n)] / t / 1e9, 1)
                       for (k, n), t in best.items()}}


def roofline(folder: Path, dtypes: list[str], threads: int, tokens: int = 2048,
             rounds: int = 7) -> dict:
    """The CPU section of the benchmark's output: flags, threads and a rate per dtype."""
    import torch

    torch.set_num_threads(threads)
    return {"cpu_model": cpu_model(), "flags": cpu_flags(), "cpuid_masked": cpuid_masked(),
            "isa_caps": isa_caps(),
            "aten_capability": torch.backends.cpu.get_cpu_capability(), "threads": threads,
            "gemm_tokens": tokens, "gemm_measurements": 1,
            "gemm": {d: gemm_gflops(folder, d, tokens, rounds) for d in dict.fromkeys(dtypes)}}


def remeasure(roof: dict, folder: Path, rounds: int = 2) -> None:
    """Measure the GEMMs again and keep each shape's best rate so far (the benchmark does this
    between its rounds: a roofline taken only at the start is as slow as that moment was)."""
    roof["gemm_measurements"] += 1
    for dtype, old in roof["gemm"].items():
        new = gemm_gflops(folder, dtype, roof["gemm_tokens"], rounds)["shapes"]
        best = {shape: max(rate, new[shape]) for shape, rate in old["shapes"].items()}
        # the layer's rate: its FLOPs over the sum of the shapes' best times
        flop = {shape: math.prod(int(d) for d in shape.split("x")) for shape in best}
        old["shapes"] = best
        old["gflops"] = round(sum(flop.values()) / sum(flop[s] / best[s] for s in best), 1)
