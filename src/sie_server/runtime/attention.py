"""Attention over packed variable-length sequences.

`VarlenAttention` (CUDA) runs torch's varlen kernel on the packed tokens directly.
`BucketedAttention` (anywhere) scatters sequences of similar length into small padded groups
and runs SDPA per group, so padding stays small without changing the packed layout.
Both are built once per batch and reused by every layer.
"""

from __future__ import annotations

import inspect

import numpy as np
import torch
import torch.nn.functional as F

try:  # torch >= 2.10 on CUDA
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # pragma: no cover - depends on the torch build
    varlen_attn = None


def _varlen_causal() -> dict | None:
    """varlen_attn's keyword for causal attention in this torch (2.13: window_size=(-1, 0);
    earlier: is_causal=True); None when it has neither."""
    if varlen_attn is None:
        return None
    params = inspect.signature(varlen_attn).parameters
    if "window_size" in params:
        return {"window_size": (-1, 0)}
    return {"is_causal": True} if "is_causal" in params else None


_CAUSAL_KWARGS = _varlen_causal()

# A group grows while its padded size stays within this factor of its real tokens.
_PAD_SLACK = 1.25


class VarlenAttention:
    """Padding-free attention with torch.nn.attention.varlen (CUDA, fp16/bf16)."""

    def __init__(self, cu_seqlens: np.ndarray, device: torch.device, *, causal: bool = False) -> None:
        self.cu = torch.from_numpy(cu_seqlens.astype(np.int32)).to(device, non_blocking=True)
        self.max_len = int(np.diff(cu_seqlens).max())
        self.kwargs = _CAUSAL_KWARGS if causal else {}

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return varlen_attn(q, k, v, self.cu, self.cu, self.max_len, self.max_len, **self.kwargs)


class BucketedAttention:
    """SDPA over length-bucketed padded groups; q/k/v and the result are (T, heads, dim).
    `causal`: each token attends to itself and the tokens before it in its sequence."""

    def __init__(self, cu_seqlens: np.ndarray, device: torch.device, *, causal: bool = False) -> None:
        self.causal = causal
        lengths = np.diff(cu_seqlens)
        order = np.argsort(lengths, kind="stable")
        self.groups = []
        start, real = 0, 0
        for end, seq in enumerate(order):
            # sorted ascending, so lengths[seq] is the width of the group [start, end]
            if end > start and (end + 1 - start) * lengths[seq] > _PAD_SLACK * (real + lengths[seq]):
                self.groups.append(self._group(cu_seqlens, lengths, order[start:end], device))
                start, real = end, 0
            real += lengths[seq]
        self.groups.append(self._group(cu_seqlens, lengths, order[start:], device))

    def _group(self, cu: np.ndarray, lengths: np.ndarray, seqs: np.ndarray, device: torch.device):
        lens = lengths[seqs]
        width = int(lens.max())
        # token index in the packed batch for every real slot of the padded (n, width) group
        rows = np.repeat(np.arange(len(seqs)), lens)
        cols = np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens)
        packed_idx = cu[seqs][rows] + cols
        padded_idx = rows * width + cols
        mask = None
        if (lens != width).any():
            m = (np.arange(width)[None, :] < lens[:, None])[:, None, None, :]
            if self.causal:
                m = m & np.tri(width, dtype=bool)
            mask = torch.from_numpy(m).to(device)
        return (
            torch.from_numpy(packed_idx).to(device),
            torch.from_numpy(padded_idx).to(device) if mask is not None else None,
            len(seqs),
            width,
            mask,
        )

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(q)
        heads, dim = q.shape[1], q.shape[2]
        for packed_idx, padded_idx, n, width, mask in self.groups:
            parts = []
            for t in (q, k, v):
                x = t.index_select(0, packed_idx)
                if padded_idx is not None:
                    buf = x.new_zeros(n * width, heads, dim)
                    buf.index_copy_(0, padded_idx, x)
                    x = buf
                parts.append(x.view(n, width, heads, dim).transpose(1, 2))
            o = F.scaled_dot_product_attention(*parts, attn_mask=mask,
                                               is_causal=self.causal and mask is None)
            o = o.transpose(1, 2).reshape(n * width, heads, dim)
            if padded_idx is not None:
                o = o.index_select(0, padded_idx)
            out.index_copy_(0, packed_idx, o)
        return out


def make_attention(cu_seqlens: np.ndarray, device: torch.device, dtype: torch.dtype, *,
                   causal: bool = False):
    """The best attention for this device and dtype; `causal` for decoder-style masks."""
    if device.type == "cuda" and varlen_attn is not None and dtype in (torch.float16, torch.bfloat16) \
            and (not causal or _CAUSAL_KWARGS is not None):
        return VarlenAttention(cu_seqlens, device, causal=causal)
    return BucketedAttention(cu_seqlens, device, causal=causal)
