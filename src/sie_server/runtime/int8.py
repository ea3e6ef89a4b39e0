"""int8 linears for CPUs (`--dtype int8`): weights int8 per output channel, activations
quantized per token (row) on the fly, the int8 x int8 -> int32 product from `torch._int_mm`.

    x ~ sx * q + ox,  q = round((x - lo) / sx) - 128,  ox = lo + 128 sx,  sx = width / 255
    lo, hi = min x_row, max x_row,  width = max(hi - lo, max(|lo|, |hi|) / 4096)
    W ~ sw * Wq,      Wq = round(W / sw),  sw = (a bound on the row, by `weight_rule`) / 127
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
and adds each pair of u8 x s8 products (input channels 2j and 2j+1) in int16 (`vpmaddubsw`),
which saturates; with oneDNN held to AVX2, all-MiniLM-L6-v2's dense cosine to fp32 fell to
0.958 with 8-bit weights. `weight_rule` probes the kernel once per process and picks the
scale per output channel (row):
- "int8": max |w| / 127, where 8-bit weights are exact (VNNI);
- "pairs": the row's largest same-sign sum over a pair (2j, 2j+1), / 127, so every pair's
  positive part and negative part each round to at most 128 and 255 x 128 fits in int16: a
  row whose large weights are not paired keeps nearly 8 bits (MiniLM: 102 levels for the
  row's largest weight on average). MiniLM held to AVX2, min cosine to fp32 on the test texts:
  0.9908 (0.9883 with "int7", 0.9934 with "int8" on a VNNI CPU);
- "int7": max |w| / 64, where pairs are not exact either (another kernel); raises if neither.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


def _pair_bound(w: torch.Tensor) -> torch.Tensor:
    """Per row of w: the largest of the pairs' (input channels 2j, 2j+1) positive-part sums
    and negative-part magnitudes; never below max |w|."""
    w = nn.functional.pad(w, (0, w.shape[1] % 2)).reshape(w.shape[0], -1, 2)
    return torch.maximum(w.clamp_min(0).sum(-1), w.clamp_max(0).sum(-1).neg()).amax(dim=1)


def quantize_weight(w: torch.Tensor, rule: str) -> tuple[torch.Tensor, torch.Tensor]:
    """float (out, in) -> (int8 (out, in), float scale (out,)) under `rule` (module docstring)."""
    bound = _pair_bound(w) if rule == "pairs" else w.abs().amax(dim=1)
    scale = bound.clamp_min(1e-12) / (64 if rule == "int7" else 127)
    return torch.round(w / scale[:, None]).to(torch.int8), scale


def _exact(rule: str) -> bool:
    """Whether `_int_mm` is exact on weights quantized by `rule`: rows all +1, all -1, (1, 0)
    alternating and random (the extremes of every rule's bound), against activations at
    int8's ends (where int16 pair sums overflow) and random, on two shapes."""
    g = torch.Generator().manual_seed(0)
    for m, k, n in ((64, 256, 64), (5, 384, 48)):
        w = torch.randn(n, k, generator=g)
        w[0], w[1], w[2] = 1.0, -1.0, torch.arange(k) % 2 == 0
        wq = quantize_weight(w, rule)[0].t().contiguous()
        a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
        a[: m // 4], a[m // 4: m // 2] = 127, -128
        if not torch.equal(torch._int_mm(a, wq).double(), a.double() @ wq.double()):
            return False
    return True


@functools.cache
def weight_rule() -> str:
    """"int8", "pairs" or "int7": the first whose weights this CPU's int8 kernel multiplies
    exactly (module docstring); raises if none."""
    for rule in ("int8", "pairs", "int7"):
        if _exact(rule):
            if rule != "int8":
                log.info("int8: this CPU's int8 matmul saturates on full-range weights (no VNNI); "
                         "weights scaled by the %s rule", rule)
            return rule
    raise RuntimeError("torch._int_mm is not exact on this CPU; --dtype int8 cannot run here")


class Int8Linear(nn.Module):
    """A drop-in for an nn.Linear of a HookedBlock (module docstring)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        wq, scale = quantize_weight(linear.weight.detach().float(), weight_rule())
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # (in, out): _int_mm's second operand, contiguous as oneDNN wants it
        self.register_buffer("weight_t", wq.t().contiguous())
        self.register_buffer("scale", scale)
        # rows [sum_k sw * Wq[n, k], bias[n]]: the rank-2 update that adds each token's offset
        # ox and the bias in one pass
        bias = linear.bias.detach().float() if linear.bias is not None else torch.zeros_like(scale)
        self.register_buffer("offset_bias", torch.stack([wq.sum(dim=1, dtype=torch.float32) * scale,
                                                         bias]))

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
