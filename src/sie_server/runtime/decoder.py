"""A decoder-only transformer (Qwen3 / Qwen2 / Mistral / Llama) over packed sequences.

RMSNorm, rotary positions (restarting at 0 in every packed sequence), grouped-query attention
(Qwen3's per-head q_norm / k_norm before the rotation), SwiGLU MLP, a final RMSNorm. Attention
is causal: `attention.make_attention(..., causal=True)`. Q/K/V and gate/up are fused matmuls.
Loads the hub checkpoints as saved (`model.layers.N.self_attn.q_proj.weight`, ... for
*ForCausalLM, the same names without `model.` for a bare *Model), sharded or not; the weights
it does not use (`lm_head.weight`) are returned for the model family.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .encoder import HookedBlock, LinearHook
from .lora import LoraLayout
from .weights import load_state_dict

MODEL_TYPES = ("qwen3", "qwen2", "mistral", "llama")
# LoRA (runtime/lora.py): Hugging Face module names inside one layer -> (our linear, piece of
# its output); the layer's other modules; the modules outside the layers.
LORA_TARGETS: dict[str, tuple[str, int | None]] = {
    "self_attn.q_proj": ("qkv", 0), "self_attn.k_proj": ("qkv", 1),
    "self_attn.v_proj": ("qkv", 2), "self_attn.o_proj": ("attn_out", None),
    "mlp.gate_proj": ("gate_up", 0), "mlp.up_proj": ("gate_up", 1),
    "mlp.down_proj": ("down", None),
}
LAYER_MODULES = (*LORA_TARGETS, "input_layernorm", "post_attention_layernorm",
                 "self_attn.q_norm", "self_attn.k_norm")
OTHER_MODULES = ("embed_tokens", "norm", "lm_head")


@dataclass(frozen=True)
class DecoderConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_linear_factor: float  # rope_scaling {"type": "linear", "factor": f}; 1.0 = none
    qkv_bias: bool  # Qwen2 (always), others when attention_bias is set
    o_bias: bool
    qk_norm: bool  # Qwen3
    max_position_embeddings: int
    sliding_window: int | None
    tie_word_embeddings: bool
    position_offset: int = 0

    @classmethod
    def from_folder(cls, folder: Path) -> "DecoderConfig":
        c = json.loads((folder / "config.json").read_text())
        kind = c.get("model_type")
        if kind not in MODEL_TYPES:
            raise ValueError(f"{folder}: model_type {kind!r} is not a supported decoder "
                             f"(supported: {', '.join(MODEL_TYPES)})")
        if c.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{folder}: hidden_act {c['hidden_act']!r}; decoders need silu")
        factor = 1.0
        scaling = c.get("rope_scaling")
        if scaling:
            rtype = scaling.get("rope_type", scaling.get("type"))
            if rtype == "linear":
                factor = float(scaling["factor"])
            elif rtype != "default":
                raise ValueError(f"{folder}: rope_scaling type {rtype!r} is not supported "
                                 "(supported: none, default, linear)")
        heads = c["num_attention_heads"]
        bias = bool(c.get("attention_bias", False))
        window = c.get("sliding_window")
        if kind in ("qwen2", "qwen3") and not c.get("use_sliding_window", False):
            window = None
        return cls(
            model_type=kind,
            vocab_size=c["vocab_size"],
            hidden_size=c["hidden_size"],
            num_layers=c["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=c.get("num_key_value_heads") or heads,
            head_dim=c.get("head_dim") or c["hidden_size"] // heads,
            intermediate_size=c["intermediate_size"],
            rms_norm_eps=c.get("rms_norm_eps", 1e-6),
            rope_theta=float(c.get("rope_theta", 10000.0)),
            rope_linear_factor=factor,
            qkv_bias=kind == "qwen2" or bias,
            o_bias=bias and kind != "qwen2",
            qk_norm=kind == "qwen3",
            max_position_embeddings=c.get("max_position_embeddings", 32768),
            sliding_window=window,
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
        )

    def lora_layout(self) -> LoraLayout:
        """Where LoRA applies: the q/k/v/o/gate/up/down linears of every layer."""
        names = [f"layers.{i}.{m}" for i in range(self.num_layers) for m in LAYER_MODULES]
        return LoraLayout(LORA_TARGETS, lora_linears(self), tuple(names + list(OTHER_MODULES)))

    @property
    def max_tokens(self) -> int:
        """Longest sequence served: the position limit, or the sliding window (attention here
        is full causal, which equals sliding-window attention only up to the window)."""
        if self.sliding_window:
            return min(self.max_position_embeddings, self.sliding_window)
        return self.max_position_embeddings


def lora_linears(cfg: DecoderConfig) -> dict[str, tuple[int, tuple[int, ...]]]:
    """Our linear -> (fan-in, output size of each piece), for LoRA's shape checks."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return {"qkv": (h, (q, kv, kv)), "attn_out": (q, (h,)), "gate_up": (h, (i, i)),
            "down": (i, (h,))}


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 like the Hugging Face implementations."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rotary(cfg: DecoderConfig, positions: torch.Tensor, dtype: torch.dtype):
    """(cos, sin), each (T, 1, head_dim), for the rotate-half convention."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64,
                                                      device=positions.device).float() / dim))
    angles = (positions.float() / cfg.rope_linear_factor)[:, None] * inv_freq[None, :]
    emb = torch.cat([angles, angles], dim=-1)[:, None, :]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class DecoderLayer(HookedBlock):
    def __init__(self, cfg: DecoderConfig, index: int) -> None:
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.index = index
        self.heads, self.kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, d
        self.q_size, self.kv_size = cfg.num_heads * d, cfg.num_kv_heads * d
        self.qkv = nn.Linear(h, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.attn_out = nn.Linear(self.q_size, h, bias=cfg.o_bias)
        self.gate_up = nn.Linear(h, 2 * cfg.intermediate_size, bias=False)
        self.down = nn.Linear(cfg.intermediate_size, h, bias=False)
        self.ln1 = RMSNorm(h, cfg.rms_norm_eps)
        self.ln2 = RMSNorm(h, cfg.rms_norm_eps)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps) if cfg.qk_norm else None

    def forward(self, x: torch.Tensor, rope, attention, hook: LinearHook | None) -> torch.Tensor:
        t = x.shape[0]
        qkv = self._linear("qkv", self.ln1(x), hook)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(t, self.heads, self.head_dim)
        k = k.view(t, self.kv_heads, self.head_dim)
        v = v.view(t, self.kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rope
        a = attention(_rotate(q, cos, sin), _rotate(k, cos, sin), v.contiguous())
        x = x + self._linear("attn_out", a.reshape(t, self.q_size), hook)
        gate, up = self._linear("gate_up", self.ln2(x), hook).chunk(2, dim=-1)
        return x + self._linear("down", F.silu(gate) * up, hook)


class Decoder(nn.Module):
    """Token embeddings + decoder layers + final norm; the last hidden state of every token."""

    causal = True

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.word = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                token_type_ids: torch.Tensor | None, attention,
                hook: LinearHook | None = None) -> torch.Tensor:
        """Same call as `encoder.Encoder` (token types are ignored: decoders have none)."""
        x = self.word(input_ids)
        rope = rotary(self.cfg, position_ids, x.dtype)
        for layer in self.layers:
            x = layer(x, rope, attention, hook)
        return self.norm(x)

    @classmethod
    def from_folder(cls, folder: Path) -> tuple["Decoder", dict[str, torch.Tensor]]:
        """Build from config.json + weights; also returns the weights not used (lm_head...).
        With tied embeddings and no `lm_head.weight` in the files, the embedding table is
        returned as `lm_head.weight`."""
        cfg = DecoderConfig.from_folder(folder)
        with torch.device("meta"):
            dec = cls(cfg)
        state, rest = _convert(load_state_dict(folder), cfg.num_layers)
        expected = set(dec.state_dict())
        missing, unexpected = expected - set(state), set(state) - expected
        if missing or unexpected:
            raise ValueError(f"weights in {folder} do not fit {cfg.model_type}: missing "
                             f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
        dec.load_state_dict(state, assign=True)
        if "lm_head.weight" not in rest and cfg.tie_word_embeddings:
            rest["lm_head.weight"] = dec.word.weight
        return dec.eval(), rest


def _convert(hf: dict[str, torch.Tensor], num_layers: int) -> tuple[dict, dict]:
    """Map Hugging Face Llama-style names to ours; fuse q/k/v and gate/up."""
    sd = {k.removeprefix("model."): v for k, v in hf.items()}
    out: dict[str, torch.Tensor] = {}
    for src, dst in (("embed_tokens.weight", "word.weight"), ("norm.weight", "norm.weight")):
        if src in sd:
            out[dst] = sd.pop(src)
    for i in range(num_layers):
        pre = f"layers.{i}."
        for p in ("weight", "bias"):
            parts = [sd.pop(f"{pre}self_attn.{n}_proj.{p}", None) for n in "qkv"]
            if all(t is not None for t in parts):
                out[f"{pre}qkv.{p}"] = torch.cat(parts, 0)
        parts = [sd.pop(f"{pre}mlp.{n}_proj.weight", None) for n in ("gate", "up")]
        if all(t is not None for t in parts):
            out[f"{pre}gate_up.weight"] = torch.cat(parts, 0)
        names = {"self_attn.o_proj.weight": "attn_out.weight", "self_attn.o_proj.bias":
                 "attn_out.bias", "mlp.down_proj.weight": "down.weight",
                 "input_layernorm.weight": "ln1.weight",
                 "post_attention_layernorm.weight": "ln2.weight",
                 "self_attn.q_norm.weight": "q_norm.weight",
                 "self_attn.k_norm.weight": "k_norm.weight"}
        for src, dst in names.items():
            if pre + src in sd:
                out[pre + dst] = sd.pop(pre + src)
    for key in [k for k in sd if k.endswith("rotary_emb.inv_freq")]:
        del sd[key]
    return out, sd
