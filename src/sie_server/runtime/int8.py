"""int8 linears for CPUs (`--dtype int8`): weights int8 per output channel, activations
quantized per token (row) on the fly, the int8 x int8 -> int32 product from `torch._int_mm`.

    x ~ sx * q + ox,  q = round((x - lo) / sx) - 128,  ox = lo + 128 sx,  sx = width / 255
    lo, hi = min x_row, max x_row,  width = max(hi - lo, max(|lo|, |hi|) / 4096)
    W ~ sw * Wq,      Wq = round(W / sw),  sw = max|W_row| / L  (L = 127; 64 without VNNI)
    y = (q @ Wq^T) * sx * sw + ox * sum_k(sw * Wq) + b

Weights symmetric, activations asymmetric (each token's own min and max, which map exactly to
-128 and 127: GELU outputs and LayerNorm outliers are lopsided; all-MiniLM-L6-v2's dense cosine
to fp32 is >= 0.99 on every test text, with a symmetric scale 0.984; an integer zero point,
which moves the extremes off the grid, made the cross-encoder test's error 1.7x). Each token's
scales are its own, so a text's vectors do not depend on the other texts of its batch. Only
the transformer blocks' linears (those of every `HookedBlock`) change; embeddings, norms,
attention and every head stay in float32, and the LinearHook (LoRA) still adds its float
update to the dequantized output rows.

No clamp pass: the floor on `width` (it only widens rows nearly constant far from 0) bounds
|x / sx| by 255 * 4096, so float error stays < 0.25 of a step and q within [-128, 127].
Each pass is one plain vectorised op (amin and amax beat aminmax; mul + add_ beat addcmul).

Why `torch._int_mm` (measured on this project's 2-core avx512_vnni CPU, one core, CPU time;
README "Precision"): on 1,024 x 384 x 1,536 it took 2.8 ms where fp32's linear took 12.7 ms;
it takes plain int8 tensors, not the quantized tensor types torch 2.13 deprecates (fbgemm's
`quantized.linear_dynamic` needs them, and quantizes a whole batch with one 7-bit scale);
oneDNN's `qlinear_pointwise` takes one activation scale per tensor (per-token scales go after
it), and with uint8 input and float output it was no faster than this path in all; torchao's
int8 dynamic config calls the same kernel with symmetric scales, as fast and less accurate.
With oneDNN held to AVX2 (no VNNI; `ONEDNN_MAX_CPU_ISA=AVX2`) `_int_mm` still did ~195 GOP/s
on the model's shapes against fp32's ~85 (one core, CPU time, busy machine).

Without VNNI that kernel is not exact over the whole int8 range: it shifts activations to u8
and adds pairs of u8 x s8 products in int16 (`vpmaddubsw`), which saturates; with oneDNN held
to AVX2, all-MiniLM-L6-v2's dense cosine to fp32 fell to 0.958. `weight_levels` probes the
kernel once per process; where full-range weights are not exact it takes L = 64, since
2 x 255 x 64 fits in int16. Measured the same way (MiniLM, every test text, oneDNN held to
AVX2): min cosine 0.988 with L = 64, 0.987 with 181 activation steps and L = 90, 0.978 with
7-bit activations and L = 127; so weights lose the bit.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


def _exact(levels: int) -> bool:
    """Whether `_int_mm` is exact for activations over all of int8 and weights in
    [-levels, levels]: on extremes (where int16 pair sums overflow) and random values."""
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (64, 256), dtype=torch.int8, generator=g)
    a[:16], a[16:32] = 127, -128
    w = torch.randint(-levels, levels + 1, (256, 64), dtype=torch.int8, generator=g)
    w[:, :16], w[:, 16:32] = levels, -levels
    return torch.equal(torch._int_mm(a, w).double(), a.double() @ w.double())


@functools.cache
def weight_levels() -> int:
    """127, or 64 where this CPU's int8 kernel saturates on full-range weights (module
    docstring); raises if neither is exact."""
    for levels in (127, 64):
        if _exact(levels):
            if levels != 127:
                log.info("int8: this CPU's int8 matmul saturates on full-range weights (no "
                         "VNNI); weights quantized to [-%d, %d]", levels, levels)
            return levels
    raise RuntimeError("torch._int_mm is not exact on this CPU; --dtype int8 cannot run here")


class Int8Linear(nn.Module):
    """A drop-in for an nn.Linear of a HookedBlock (module docstring)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp_min(1e-12) / weight_levels()
        wq = torch.round(w / scale[:, None])
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # (in, out): _int_mm's second operand, contiguous as oneDNN wants it
        self.register_buffer("weight_t", wq.to(torch.int8).t().contiguous())
        self.register_buffer("scale", scale)
        # rows [sum_k sw * Wq[n, k], bias[n]]: the rank-2 update that adds each token's offset
        # ox and the bias in one pass
        bias = linear.bias.detach().float() if linear.bias is not None else torch.zeros_like(scale)
        self.register_buffer("offset_bias", torch.stack([wq.sum(dim=1) * scale, bias]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_features).float()
        lo = x.amin(dim=1, keepdim=True)  # amin + amax: one aminmax pass is ~15x slower
        hi = x.amax(dim=1, keepdim=True)
        width = torch.maximum(hi - lo, torch.maximum(lo.abs(), hi.abs()).mul_(2.0**-12))
        inv = width.clamp_min_(1e-30).reciprocal_().mul_(255)  # 1 / sx
        # q = round((x - lo) / sx) - 128 in [-128, 127] (module docstring: no clamp needed)
        q = x.mul(inv).add_(lo.mul(inv).add_(128).neg_()).round_().to(torch.int8)
        sx = inv.reciprocal_()
        y = torch._int_mm(q, self.weight_t).float().mul_(self.scale).mul_(sx)
        u = torch.cat([sx.mul(128).add_(lo), torch.ones_like(sx)], dim=1)  # [ox, 1] per token
        return y.addmm_(u, self.offset_bias).view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"
