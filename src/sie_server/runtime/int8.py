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

Three passes over a token's row: torch's amin and amax (vectorised; faster than aminmax and
than numba's loops), then `_quantize`, which takes each row's step and writes u. No clamp: the
floor on `width` (it only widens rows nearly constant far from 0) bounds |x / sx| by
255 * 4096, so float error stays < 0.25 of a step and u within [0, 255]; no round either:
(x - lo) / sx + 1/2 lies in [0.25, 255.75], and the cast truncates it. After the product one
pass, `_dequantize`: y = sx * y + lo * offset + b.

The two kernels are numba's (LLVM, in its wheel: no system compiler), compiled for this CPU
when the module is imported (~1 s). As torch ops the same work took three passes on each side
of the product (x * (1/sx), + shift, the uint8 cast; y *= sx, y += lo * offset, y += b).
Measured on this project's 2-core CPU, 2048 tokens, 1536 wide: u 0.32 against 1.33 ms, the
dequantize 0.27 against 0.76 ms (CPUID masked to AVX2); a whole all-MiniLM-L6-v2 forward at
0.82-0.84x the time natively (AMX: its int8 product is fast, so these passes weighed more) and
0.89-0.92x under the AVX2 mask. They run on numba's OpenMP or TBB pool, as many threads as
torch's; not on its fallback pool (workqueue), which aborts the process when two threads enter
it at once and, beside torch's OpenMP threads, made the product itself 2.4x slower. Where
numba loads neither (no system libgomp, package libgomp1; numba's TBB pool wants libtbb.so.12
on the loader's path, which PyPI's `tbb` in a venv is not) they run on the calling thread,
with a warning.

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
import os
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.profiler import record_function

# numba's thread pool as large as torch's (set before numba starts it; an operator's wins)
os.environ.setdefault("NUMBA_NUM_THREADS", str(torch.get_num_threads()))
import numba  # noqa: E402

log = logging.getLogger(__name__)
# only pools that two threads may enter at once (TBB, OpenMP), not numba's workqueue
numba.config.THREADING_LAYER = "threadsafe"


def _compile(parallel: bool) -> tuple[Callable[..., None], Callable[..., None]]:
    """`_quantize` and `_dequantize` (module docstring) compiled now, for this CPU and these
    types only (float32, uint8, C-contiguous), on numba's threads or on the caller's."""

    @numba.njit("void(f4[:, ::1], f4[::1], f4[::1], u1[:, ::1], f4[::1])", parallel=parallel,
                nogil=True)
    def quantize(x, lo, hi, u, sx):
        """Row m of x (M, K), whose min and max are lo[m] and hi[m]: its step sx[m] and
        u[m] = round((x[m] - lo[m]) / sx[m]), one pass."""
        for m in numba.prange(x.shape[0]):
            low, high = lo[m], hi[m]
            width = max(high - low, max(abs(low), abs(high)) * np.float32(2.0**-12),
                        np.float32(1e-30))
            inv = np.float32(255.0) / width
            shift = np.float32(0.5) - low * inv
            sx[m] = width / np.float32(255.0)
            for k in range(x.shape[1]):
                u[m, k] = np.int32(x[m, k] * inv + shift)

    @numba.njit("void(f4[:, ::1], f4[::1], f4[::1], f4[::1], f4[::1])", parallel=parallel,
                nogil=True)
    def dequantize(y, sx, lo, offset, bias):
        """In place, y (M, N) = sx * y + lo * offset + bias, one pass."""
        for m in numba.prange(y.shape[0]):
            step, low = sx[m], lo[m]
            for n in range(y.shape[1]):
                y[m, n] = y[m, n] * step + (low * offset[n] + bias[n])

    return quantize, dequantize


try:  # compiling a parallel kernel starts numba's pool
    _quantize, _dequantize = _compile(parallel=True)
    THREADS = f"{numba.get_num_threads()} threads ({numba.threading_layer()})"
except ValueError as exc:  # numba loads neither TBB nor OpenMP (module docstring)
    _quantize, _dequantize = _compile(parallel=False)
    THREADS = "1 thread"
    log.warning("int8: numba found no thread-safe pool (%s); its quantize kernels run on one "
                "thread (its OpenMP pool needs the system's libgomp: package libgomp1)",
                str(exc).splitlines()[0])


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
        self.register_buffer("bias", torch.zeros(self.out_features) if linear.bias is None
                             else linear.bias.detach().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_features).float().contiguous()
        lo = x.amin(dim=1)  # amin + amax: one aminmax pass is ~15x slower
        hi = x.amax(dim=1)
        u = torch.empty(x.shape, dtype=torch.uint8)
        sx = torch.empty_like(lo)
        with record_function("int8::quantize"):  # named for torch.profiler
            _quantize(x.numpy(), lo.numpy(), hi.numpy(), u.numpy(), sx.numpy())
        y = matmul(u, self.weight_packed, self.scale, self.zero_points)
        with record_function("int8::dequantize"):
            _dequantize(y.numpy(), sx.numpy(), lo.numpy(), self.offset.numpy(), self.bias.numpy())
        return y.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"
