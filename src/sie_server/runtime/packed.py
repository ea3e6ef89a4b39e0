"""Float linears through oneDNN with their weights packed once, for CPUs whose oneDNN runs
AVX-512 (float32 and bfloat16; `Placement.packed`).

`nn.Linear` on CPU calls MKL's GEMM, which on this project's AMD EPYC runs slower than
oneDNN's AVX-512 kernels (MKL's own packed GEMM, `torch.ops.mkl._mkl_linear`, was no faster
than `F.linear` there). `PackedLinear` keeps the weight in oneDNN's blocked layout
(`torch.ops.mkldnn._reorder_linear_weight`, what inductor's CPU freezing uses) and calls
`torch.ops.mkldnn._linear_pointwise`. Measured on that CPU (2 threads, all-MiniLM-L6-v2's
four shapes, medians of 21): 12% less time than `F.linear` at 1,982 and 700 tokens, 32% at
64; the whole forward 17% / 10% less in float32 and 9% / 10% in bfloat16 (passages / short
queries). AVX2-only CPUs keep `nn.Linear`: with oneDNN and MKL capped at AVX2 by environment
the two were within 3%; with CPUID showing AVX2 only (scripts/avx2-only) the four shapes took
2-8% less packed, but the float32 forward (in-process, alternating rounds) took 0.93-1.01x
the time on passages in four runs and 0.82-1.16x on short queries in three: no difference
above this machine's noise. Results equal `nn.Linear`'s to float rounding (token cosine
0.9999996). As with int8, only the blocks' linears change (those of every `HookedBlock`),
and LoRA's hook still adds its update to their outputs.
"""

from __future__ import annotations

import torch
from torch import nn

# oneDNN picks the packed layout for this many rows; any row count runs (the engine's CPU batch)
_ROWS_HINT = 2048


class PackedLinear(nn.Module):
    """A drop-in for an nn.Linear of a HookedBlock (module docstring)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach()
        self.register_buffer("weight_packed", torch.ops.mkldnn._reorder_linear_weight(w, _ROWS_HINT))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight_packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, oneDNN packed"

