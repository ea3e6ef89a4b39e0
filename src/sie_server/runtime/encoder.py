"""A BERT / XLM-RoBERTa encoder over packed sequences, loaded from Hugging Face weights.

Linear layers run on the packed (tokens, hidden) matrix, so no FLOP is spent on padding;
attention comes from `attention.make_attention`. Q, K and V are one fused matmul.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .weights import load_state_dict, reading

# Hugging Face sub-module names inside one layer -> (our linear, slice of its output or None).
LORA_TARGETS: dict[str, tuple[str, int | None]] = {
    "query": ("qkv", 0),
    "key": ("qkv", 1),
    "value": ("qkv", 2),
    "attention.output.dense": ("attn_out", None),
    "intermediate.dense": ("ffn_in", None),
    "output.dense": ("ffn_out", None),
}


class LinearHook(Protocol):
    """Adds per-row updates (LoRA) to a linear layer's output: hook(layer, name, x, y) -> y;
    `shared` does it for an input all sequences share, giving one y per sequence (or None
    when no sequence's update touches that linear)."""

    def __call__(self, layer: int, name: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...

    def shared(self, layer: int, name: str, x: torch.Tensor,
               y: torch.Tensor) -> torch.Tensor | None: ...


class HookedBlock(nn.Module):
    """A block whose linears go through the batch's LinearHook (LoRA) as layer `index`, named
    by their attribute, qualified by `stack` in a model of several stacks ("vision.fc1")."""

    index = 0
    stack = ""

    def _linear(self, name: str, x: torch.Tensor, hook: LinearHook | None) -> torch.Tensor:
        y = getattr(self, name)(x)
        if hook is None:
            return y
        return hook(self.index, f"{self.stack}.{name}" if self.stack else name, x, y)


def replace_block_linears(module: nn.Module, make: Callable[[nn.Linear], nn.Module]) -> int:
    """Replace every nn.Linear attribute of every HookedBlock inside `module` by make(linear)
    (int8 or oneDNN-packed linears); returns how many were replaced."""
    n = 0
    for block in [m for m in module.modules() if isinstance(m, HookedBlock)]:
        for name, child in list(block.named_children()):
            if isinstance(child, nn.Linear):
                setattr(block, name, make(child))
                n += 1
    return n


@dataclass(frozen=True)
class EncoderConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    hidden_act: str
    pad_token_id: int
    position_offset: int  # XLM-R/RoBERTa positions start at pad_token_id + 1, BERT at 0
    # XLM-R/RoBERTa number positions from the ids: a token equal to this id (a literal <pad>)
    # keeps the padding position (runtime.batch.positions); None (BERT): 0..n-1 whatever the ids
    position_pad_id: int | None = None

    @classmethod
    def from_folder(cls, folder: Path) -> "EncoderConfig":
        path = folder / "config.json"
        with reading(path):  # unparsable, or a key missing: DamagedFile naming config.json
            return cls.from_dict(json.loads(path.read_text()))

    @classmethod
    def from_dict(cls, c: dict) -> "EncoderConfig":
        """From a Hugging Face BERT / XLM-R config.json's content."""
        roberta = c.get("model_type") in ("xlm-roberta", "roberta", "camembert")
        pad = c.get("pad_token_id", 1 if roberta else 0)
        return cls(
            vocab_size=c["vocab_size"],
            hidden_size=c["hidden_size"],
            num_layers=c["num_hidden_layers"],
            num_heads=c["num_attention_heads"],
            intermediate_size=c["intermediate_size"],
            max_position_embeddings=c["max_position_embeddings"],
            type_vocab_size=c.get("type_vocab_size", 2),
            layer_norm_eps=c.get("layer_norm_eps", 1e-12),
            hidden_act=c.get("hidden_act", "gelu"),
            pad_token_id=pad,
            position_offset=pad + 1 if roberta else 0,
            position_pad_id=pad if roberta else None,
        )

    @property
    def max_tokens(self) -> int:
        """Longest sequence the position table allows."""
        return self.max_position_embeddings - self.position_offset


_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


class EncoderLayer(HookedBlock):
    def __init__(self, cfg: EncoderConfig, index: int) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.index = index
        self.heads = cfg.num_heads
        self.qkv = nn.Linear(h, 3 * h)
        self.attn_out = nn.Linear(h, h)
        self.ln1 = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.ffn_in = nn.Linear(h, cfg.intermediate_size)
        self.ffn_out = nn.Linear(cfg.intermediate_size, h)
        self.ln2 = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.act = _ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor, attention, hook: LinearHook | None) -> torch.Tensor:
        t, h = x.shape
        qkv = self._linear("qkv", x, hook).view(t, 3, self.heads, h // self.heads)
        a = attention(qkv[:, 0], qkv[:, 1], qkv[:, 2]).reshape(t, h)
        x = self.ln1(x + self._linear("attn_out", a, hook))
        f = self._linear("ffn_out", self.act(self._linear("ffn_in", x, hook)), hook)
        return self.ln2(x + f)


class Encoder(nn.Module):
    """Embeddings + transformer layers; returns the last hidden state of every packed token."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden_size
        self.word = nn.Embedding(cfg.vocab_size, h)
        self.position = nn.Embedding(cfg.max_position_embeddings, h)
        self.token_type = nn.Embedding(max(cfg.type_vocab_size, 1), h)
        self.ln = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.layers = nn.ModuleList(EncoderLayer(cfg, i) for i in range(cfg.num_layers))

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None,
        attention,
        hook: LinearHook | None = None,
    ) -> torch.Tensor:
        x = self.word(input_ids) + self.position(position_ids)
        if token_type_ids is None:
            x = x + self.token_type.weight[0]
        else:
            x = x + self.token_type(token_type_ids)
        x = self.ln(x)
        for layer in self.layers:
            x = layer(x, attention, hook)
        return x

    @classmethod
    def from_folder(cls, folder: Path) -> tuple["Encoder", dict[str, torch.Tensor]]:
        """Build from config.json + weights; also returns the weights the encoder did not use
        (pooler, classifier, LM head...) for the model family to take its heads from."""
        return cls.from_weights(EncoderConfig.from_folder(folder), load_state_dict(folder))

    @classmethod
    def from_weights(cls, cfg: EncoderConfig, weights: dict[str, torch.Tensor]
                     ) -> tuple["Encoder", dict[str, torch.Tensor]]:
        """Build from Hugging Face weights; also returns the weights the encoder did not use."""
        with torch.device("meta"):
            enc = cls(cfg)
        state, rest = _convert(weights, cfg.num_layers)
        missing = set(enc.state_dict()) - set(state)
        if missing:
            raise ValueError(f"the encoder's weights lack {sorted(missing)[:5]}")
        enc.load_state_dict(state, assign=True)
        return enc.eval(), rest


def _convert(hf: dict[str, torch.Tensor], num_layers: int) -> tuple[dict, dict]:
    """Map Hugging Face BERT/XLM-R names to ours; fuse Q, K, V."""
    sd: dict[str, torch.Tensor] = {}
    for key, value in hf.items():
        k = key.replace(".gamma", ".weight").replace(".beta", ".bias")
        for prefix in ("roberta.", "bert.", "model."):
            if k.startswith(prefix) and (k[len(prefix):].startswith(("embeddings.", "encoder."))):
                k = k[len(prefix):]
        sd[k] = value
    out: dict[str, torch.Tensor] = {}
    emb = {"word_embeddings": "word", "position_embeddings": "position",
           "token_type_embeddings": "token_type", "LayerNorm": "ln"}
    for src, dst in emb.items():
        for p in ("weight", "bias"):
            if f"embeddings.{src}.{p}" in sd:
                out[f"{dst}.{p}"] = sd.pop(f"embeddings.{src}.{p}")
    sd.pop("embeddings.position_ids", None)
    sd.pop("embeddings.token_type_ids", None)
    if "token_type.weight" not in out and "word.weight" in out:  # models without token types
        out["token_type.weight"] = torch.zeros_like(out["word.weight"][:1])
    names = {"attention.output.dense": "attn_out", "attention.output.LayerNorm": "ln1",
             "intermediate.dense": "ffn_in", "output.dense": "ffn_out", "output.LayerNorm": "ln2"}
    for i in range(num_layers):
        pre = f"encoder.layer.{i}."
        for p in ("weight", "bias"):
            parts = [sd.pop(f"{pre}attention.self.{n}.{p}", None) for n in ("query", "key", "value")]
            if all(t is not None for t in parts):
                out[f"layers.{i}.qkv.{p}"] = torch.cat(parts, 0)
            for src, dst in names.items():
                if f"{pre}{src}.{p}" in sd:
                    out[f"layers.{i}.{dst}.{p}"] = sd.pop(f"{pre}{src}.{p}")
    return out, sd
