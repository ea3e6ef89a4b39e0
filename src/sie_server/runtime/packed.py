"""Float linears through oneDNN with their weights packed once (`Placement.packed`): float32 on
x86 CPUs with AVX2 and FMA, bfloat16 where oneDNN runs AVX-512 (`device.onednn_packs`).

`nn.Linear` on CPU calls MKL's GEMM and copies the bias into its output first (a pass over
every linear's output). `PackedLinear` keeps the weight in oneDNN's blocked layout
(`torch.ops.mkldnn._reorder_linear_weight`, what inductor's CPU freezing uses) and calls
`torch.ops.mkldnn._linear_pointwise`, which adds the bias as it writes. Measured on 2 threads,
all-MiniLM-L6-v2:
- AMD EPYC with AVX-512 (medians of 21): the four shapes 12% less time than `F.linear` at
  1,982 and 700 tokens, 32% at 64; the whole forward 17% / 10% less in float32 and 9% / 10%
  in bfloat16 (passages / short queries);
- Intel Xeon with CPUID masked to AVX2 (scripts/avx2-only; in-process, alternating rounds,
  medians of 5), after the engine kept freed memory (device.reuse_freed_memory): the float32
  forward 0.945 / 0.957x the time on 256 passages and 0.951x / 0.962x on 2,048 / 256 short
  queries (before that fix page faults hid it: 0.93-1.16x). oneDNN's fused GELU or residual
  add after the GEMM ran slower than a separate pass on AVX2 (16.5 against 11.5 ms for
  1,936 x 384 -> 1,536), so none is fused.
Results equal `nn.Linear`'s to float rounding (token cosine 0.9999996). As with int8, only the
blocks' linears change (those of every `HookedBlock`), and LoRA's hook still adds its update
to their outputs.
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

