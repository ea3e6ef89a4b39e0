"""A ModernBERT encoder over packed sequences, loaded from Hugging Face weights.

As transformers' `ModernBertModel`: token embeddings -> LayerNorm, then per layer
`x += Wo(attn(attn_norm(x)))` with rotary positions on q and k, and
`x += mlp.Wo(act(a) * g)` where `a, g = mlp.Wi(mlp_norm(x))` split in halves (GeGLU);
`final_norm` at the end. Layer 0 has no `attn_norm` (the embedding norm comes just before).
Layers 0, n, 2n... (n = `global_attn_every_n_layers`) attend to the whole sequence with
rotary base `global_rope_theta`; the others only to tokens at most `local_attention // 2`
positions away, with base `local_rope_theta`. Biases only where the config asks for them
(`attention_bias`, `mlp_bias`, `norm_bias`; all false in the released checkpoints).
Everything runs on the packed (tokens, hidden) matrix; our linears keep the BERT encoder's
names (qkv, attn_out, ffn_in, ffn_out), so the same per-row LinearHook (LoRA) applies.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from .attention import make_attention
from .encoder import _ACTIVATIONS, HookedBlock, LinearHook
from .lora import LoraLayout
from .weights import load_state_dict

# checkpoint names (ModernBertModel; "model." in front inside *ForSequenceClassification and
# *ForMaskedLM) -> ours
_LAYER_NAMES = {"attn_norm": "attn_norm", "attn.Wqkv": "qkv", "attn.Wo": "attn_out",
                "mlp_norm": "mlp_norm", "mlp.Wi": "ffn_in", "mlp.Wo": "ffn_out"}
_TOP_NAMES = {"embeddings.tok_embeddings": "word", "embeddings.norm": "emb_norm",
              "final_norm": "final_norm"}


def _any(names) -> str:
    return "|".join(map(re.escape, names))


_KEY = re.compile(rf"^(?:model\.)?(?:layers\.(?P<layer>\d+)\.(?P<module>{_any(_LAYER_NAMES)})|"
                  rf"(?P<top>{_any(_TOP_NAMES)}))\.(?P<param>weight|bias)$")


# LoRA on the four linears of a layer (PEFT's names), each onto our linear as a whole
LORA_TARGETS = {k: (v, None) for k, v in _LAYER_NAMES.items() if "." in k}


@dataclass(frozen=True)
class ModernBertConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    norm_eps: float
    norm_bias: bool
    attention_bias: bool
    mlp_bias: bool
    hidden_act: str
    global_rope_theta: float
    local_rope_theta: float
    local_attention: int  # window width: a local layer sees local_attention // 2 on each side
    global_every: int
    pad_token_id: int
    position_offset: int = 0  # rotary positions count from 0 in every sequence
    type_vocab_size: int = 0  # no token type embeddings

    @classmethod
    def from_folder(cls, folder: Path) -> "ModernBertConfig":
        return cls.from_dict(json.loads((folder / "config.json").read_text()))

    @classmethod
    def from_dict(cls, c: dict) -> "ModernBertConfig":
        return cls(
            vocab_size=c["vocab_size"],
            hidden_size=c["hidden_size"],
            num_layers=c["num_hidden_layers"],
            num_heads=c["num_attention_heads"],
            intermediate_size=c["intermediate_size"],
            max_position_embeddings=c.get("max_position_embeddings", 8192),
            norm_eps=c.get("norm_eps", 1e-5),
            norm_bias=c.get("norm_bias", False),
            attention_bias=c.get("attention_bias", False),
            mlp_bias=c.get("mlp_bias", False),
            hidden_act=c.get("hidden_activation", "gelu"),
            global_rope_theta=c.get("global_rope_theta", 160000.0),
            local_rope_theta=c.get("local_rope_theta") or c.get("global_rope_theta", 160000.0),
            local_attention=c.get("local_attention", 128),
            global_every=c.get("global_attn_every_n_layers", 3),
            pad_token_id=c.get("pad_token_id", 50283),
        )

    def lora_layout(self) -> LoraLayout:
        """Where LoRA applies: attn.Wqkv, attn.Wo, mlp.Wi, mlp.Wo of every layer."""
        h, inter = self.hidden_size, self.intermediate_size
        linears = {"qkv": (h, (3 * h,)), "attn_out": (h, (h,)), "ffn_in": (h, (2 * inter,)),
                   "ffn_out": (inter, (h,))}
        names = [f"layers.{i}.{m}" for i in range(self.num_layers) for m in _LAYER_NAMES]
        return LoraLayout(LORA_TARGETS, linears, tuple(names + list(_TOP_NAMES)))

    @property
    def max_tokens(self) -> int:
        return self.max_position_embeddings

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class LayerAttention:
    """The two attentions of one batch: whole sequences, and the local window."""

    full: Callable
    local: Callable


def rotary_tables(positions: torch.Tensor, dim: int, theta: float,
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (T, 1, dim) of rotary embeddings, computed in float32 as transformers does."""
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.int64,
                                            device=positions.device).float() / dim)
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class ModernBertLayer(HookedBlock):
    def __init__(self, cfg: ModernBertConfig, index: int) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.index = index
        self.heads = cfg.num_heads
        self.is_global = index % cfg.global_every == 0
        self.attn_norm = (nn.LayerNorm(h, eps=cfg.norm_eps, bias=cfg.norm_bias) if index
                          else nn.Identity())
        self.qkv = nn.Linear(h, 3 * h, bias=cfg.attention_bias)
        self.attn_out = nn.Linear(h, h, bias=cfg.attention_bias)
        self.mlp_norm = nn.LayerNorm(h, eps=cfg.norm_eps, bias=cfg.norm_bias)
        self.ffn_in = nn.Linear(h, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.ffn_out = nn.Linear(cfg.intermediate_size, h, bias=cfg.mlp_bias)
        self.act = _ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor, attention: LayerAttention,
                rope: dict[bool, tuple[torch.Tensor, torch.Tensor]],
                hook: LinearHook | None) -> torch.Tensor:
        t, h = x.shape
        qkv = self._linear("qkv", self.attn_norm(x), hook).view(t, 3, self.heads, h // self.heads)
        cos, sin = rope[self.is_global]
        q, k = _rotate(qkv[:, 0], cos, sin), _rotate(qkv[:, 1], cos, sin)
        attend = attention.full if self.is_global else attention.local
        x = x + self._linear("attn_out", attend(q, k, qkv[:, 2]).reshape(t, h), hook)
        a, g = self._linear("ffn_in", self.mlp_norm(x), hook).chunk(2, dim=-1)
        return x + self._linear("ffn_out", self.act(a) * g, hook)


class ModernBertEncoder(nn.Module):
    """Embeddings + ModernBERT layers + final norm; the last hidden state of every token."""

    def __init__(self, cfg: ModernBertConfig) -> None:
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden_size
        self.word = nn.Embedding(cfg.vocab_size, h)
        self.emb_norm = nn.LayerNorm(h, eps=cfg.norm_eps, bias=cfg.norm_bias)
        self.layers = nn.ModuleList(ModernBertLayer(cfg, i) for i in range(cfg.num_layers))
        self.final_norm = nn.LayerNorm(h, eps=cfg.norm_eps, bias=cfg.norm_bias)

    def attention(self, cu_seqlens: np.ndarray, device: torch.device,
                  dtype: torch.dtype, keys: np.ndarray | None = None) -> LayerAttention:
        """Both attentions for a batch; the local one is the full one when no sequence is
        longer than the window. `keys`: make_attention's."""
        full = make_attention(cu_seqlens, device, dtype, keys=keys)
        reach = self.cfg.local_attention // 2
        if int(np.diff(cu_seqlens).max()) <= reach + 1:
            return LayerAttention(full, full)
        return LayerAttention(full, make_attention(cu_seqlens, device, dtype, window=reach,
                                                   keys=keys))

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None,
        attention: LayerAttention,
        hook: LinearHook | None = None,
    ) -> torch.Tensor:
        if token_type_ids is not None:
            raise ValueError("ModernBERT has no token types")
        x = self.emb_norm(self.word(input_ids))
        dim, dtype = self.cfg.head_dim, x.dtype
        rope = {True: rotary_tables(position_ids, dim, self.cfg.global_rope_theta, dtype),
                False: rotary_tables(position_ids, dim, self.cfg.local_rope_theta, dtype)}
        for layer in self.layers:
            x = layer(x, attention, rope, hook)
        return self.final_norm(x)

    @classmethod
    def from_folder(cls, folder: Path) -> tuple["ModernBertEncoder", dict[str, torch.Tensor]]:
        """Build from config.json + weights; also returns the weights the encoder did not use
        (the sequence-classification head, an MLM head...) under their checkpoint names."""
        return cls.from_weights(ModernBertConfig.from_folder(folder), load_state_dict(folder),
                                str(folder))

    @classmethod
    def from_weights(cls, cfg: ModernBertConfig, weights: dict[str, torch.Tensor],
                     where: str = "the checkpoint") -> tuple["ModernBertEncoder", dict[str, torch.Tensor]]:
        """Build from ModernBertModel weights (names with or without `model.`); also returns the
        weights it did not use."""
        with torch.device("meta"):
            enc = cls(cfg)
        state, rest = _convert(weights)
        want = set(enc.state_dict())
        missing, unexpected = want - set(state), set(state) - want
        if missing or unexpected:
            raise ValueError(f"weights in {where} do not fit its config: missing "
                             f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
        enc.load_state_dict(state, assign=True)
        return enc.eval(), rest


def _convert(hf: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    out: dict[str, torch.Tensor] = {}
    rest: dict[str, torch.Tensor] = {}
    for key, value in hf.items():
        m = _KEY.match(key)
        if m is None:
            rest[key] = value
        elif m["top"]:
            out[f"{_TOP_NAMES[m['top']]}.{m['param']}"] = value
        else:
            out[f"layers.{m['layer']}.{_LAYER_NAMES[m['module']]}.{m['param']}"] = value
    return out, rest
