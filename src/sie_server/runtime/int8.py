"""int8 linears for CPUs (`--dtype int8`): weights int8 per output channel, activations
quantized per token (row) on the fly to uint8, the u8 x s8 -> s32 product and the weight
scales from oneDNN (`torch.ops.onednn.qlinear_pointwise`, weights packed once).

    x ~ sx * u + lo,  u = round((x - lo) / sx) in [0, 255],  sx = width / 255
    lo, hi = min x_row, max x_row,  width = max(hi - lo, max(|lo|, |hi|) / 4096)
    W ~ sw * Wq,      Wq = round(W / sw),  sw = (a bound on the row, by `weight_rule`) / 127
    y = sx * (sw * (u @ Wq^T)) + lo * sum_k(sw * Wq) + b

Weights symmetric, activations asymmetric (each token's own min and max, which map exactly to
0 and 255: GELU outputs and LayerNorm outliers are lopsided; all-MiniLM-L6-v2's dense cosine
to fp32 is >= 0.99 on every test text, with a symmetric scale 0.984; an integer zero point,
which moves the extremes off the grid, made the cross-encoder test's error 1.7x). Each token's
scales are its own, so a text's vectors do not depend on the other texts of its batch. Only
the transformer blocks' linears (those of every `HookedBlock`) change; embeddings, norms,
attention and every head stay in float32, and the LinearHook (LoRA) still adds its float
update to the dequantized output rows.

No clamp pass: the floor on `width` (it only widens rows nearly constant far from 0) bounds
|x / sx| by 255 * 4096, so float error stays < 0.25 of a step and u within [0, 255]; nor a
round pass: (x - lo) / sx + 1/2 lies in [0.25, 255.75], and the cast to uint8 truncates it.
Each pass is one plain vectorised op (amin and amax beat aminmax; mul + add_ beat addcmul).
After the product: y *= sx, y += lo * offset (addcmul_, one pass; a rank-2 addmm_ adding the
offset and the bias at once took 1.3-2.2x longer), y += b.

Why oneDNN's `qlinear_pointwise` and not `torch._int_mm`: torch 2.13 sends `_int_mm` to oneDNN
only when its cpuinfo reports AVX512-VNNI; on any other CPU it runs a plain loop. With CPUID
masked to AVX2 (scripts/avx2-only, this project's AMD EPYC, 2 threads, MiniLM's four shapes at
2,048 tokens) `_int_mm` took 370-519 ms per linear where `qlinear_pointwise` took 2.5-8.8 ms
and float32 ~3-12 ms. With VNNI the two are within 10% of each other either way (18.1 against
18.5 ms for the four); this one also applies the weight scales in its epilogue, one pass fewer
over the output, and takes plain uint8 / int8 tensors, not the quantized tensor types torch
2.13 deprecates (fbgemm's `quantized.linear_dynamic` needs them, and quantizes a whole batch
with one 7-bit scale); the per-token scales go after it (it takes one activation scale).

Without VNNI oneDNN's kernel is not exact over the whole range: it adds each pair of u8 x s8
products (input channels 2j and 2j+1) in int16 (`vpmaddubsw`), which saturates; with 8-bit
weights all-MiniLM-L6-v2's dense cosine to fp32 fell to 0.958. `weight_rule` probes the kernel
once per process and picks the scale per output channel (row):
- "int8": max |w| / 127, where 8-bit weights are exact (VNNI);
- "pairs": the row's largest same-sign sum over a pair (2j, 2j+1), / 127, so every pair's
  positive part and negative part each round to at most 128 and 255 x 128 fits in int16: a
  row whose large weights are not paired keeps nearly 8 bits (MiniLM: 102 levels for the
  row's largest weight on average). MiniLM with CPUID masked to AVX2, min cosine to fp32 on
  the test texts: 0.9931 (0.9924 with "int8" on a VNNI CPU; "int7" gave 0.9883);
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


def matmul(u: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor,
           zero_points: torch.Tensor) -> torch.Tensor:
    """float32 (M, N) = scale * (u @ Wq^T): u uint8 (M, K), `packed` from `pack(Wq)`,
    `zero_points` zeros (N,) int64 (oneDNN takes them; symmetric weights have none)."""
    return torch.ops.onednn.qlinear_pointwise(u, 1.0, 0, packed, scale, zero_points, None, 1.0,
                                              0, torch.float32, "none", [], "")


def pack(wq: torch.Tensor) -> torch.Tensor:
    """int8 (out, in) weights in oneDNN's layout for `matmul` (any number of rows)."""
    return torch.ops.onednn.qlinear_prepack(wq, None)


def _exact(rule: str) -> bool:
    """Whether `matmul` is exact on weights quantized by `rule`: rows all +1, all -1, (1, 0)
    alternating and random (the extremes of every rule's bound), against activations at
    uint8's ends (where int16 pair sums overflow) and random, on two shapes."""
    g = torch.Generator().manual_seed(0)
    for m, k, n in ((64, 256, 64), (5, 384, 48)):
        w = torch.randn(n, k, generator=g)
        w[0], w[1], w[2] = 1.0, -1.0, torch.arange(k) % 2 == 0
        wq = quantize_weight(w, rule)[0]
        u = torch.randint(0, 256, (m, k), dtype=torch.uint8, generator=g)
        u[: m // 4], u[m // 4: m // 2] = 255, 0
        got = matmul(u, pack(wq), torch.ones(n), torch.zeros(n, dtype=torch.long)).double()
        if not torch.equal(got, u.double() @ wq.double().t()):
            return False
    return True


@functools.cache
def weight_rule() -> str:
    """"int8", "pairs" or "int7": the first whose weights this CPU's int8 kernel multiplies
    exactly (module docstring); raises if none."""
    for rule in ("int8", "pairs", "int7"):
        try:
            exact = _exact(rule)
        except (AttributeError, NotImplementedError, RuntimeError) as exc:
            raise RuntimeError("--dtype int8 needs oneDNN's int8 matmul "
                               "(torch.ops.onednn.qlinear_pointwise), which failed in this torch "
                               f"build: {exc}") from exc
        if exact:
            if rule != "int8":
                log.info("int8: this CPU's int8 matmul saturates on full-range weights (no VNNI); "
                         "weights scaled by the %s rule", rule)
            return rule
    raise RuntimeError("oneDNN's int8 matmul is not exact on this CPU; --dtype int8 cannot run "
                       "here")


class Int8Linear(nn.Module):
    """A drop-in for an nn.Linear of a HookedBlock (module docstring)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        wq, scale = quantize_weight(linear.weight.detach().float(), weight_rule())
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight_packed", pack(wq))
        self.register_buffer("scale", scale)
        self.register_buffer("zero_points", torch.zeros_like(scale, dtype=torch.long))
        # sum_k sw * Wq[n, k]: times each token's offset lo, what the offset adds to output n
        self.register_buffer("offset", wq.sum(dim=1, dtype=torch.float32) * scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_features).float()
        lo = x.amin(dim=1, keepdim=True)  # amin + amax: one aminmax pass is ~15x slower
        hi = x.amax(dim=1, keepdim=True)
        width = torch.maximum(hi - lo, torch.maximum(lo.abs(), hi.abs()).mul_(2.0**-12))
        inv = width.clamp_min_(1e-30).reciprocal_().mul_(255)  # 1 / sx
        # u = round((x - lo) / sx) in [0, 255]: + 1/2, and the cast truncates (module docstring)
        u = x.mul(inv).add_(lo.mul(inv).neg_().add_(0.5)).to(torch.uint8)
        y = matmul(u, self.weight_packed, self.scale, self.zero_points).mul_(inv.reciprocal_())
        y.addcmul_(lo, self.offset)
        if self.bias is not None:
            y.add_(self.bias)
        return y.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"
