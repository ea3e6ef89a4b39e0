"""The text and vision towers of CLIP and SigLIP over packed sequences, from Hugging Face weights.

Every tower is a pre-LN transformer (`x + attn(ln1(x))`, `x + mlp(ln2(x))`); linear layers run
on the packed (tokens, hidden) matrix and attention comes from `attention.make_attention`
(causal for CLIP's text tower). Q, K and V are one fused matmul. The vision patch embedding, a
strided convolution in the checkpoint, is one matmul over patches flattened on the host
(`images.to_patches`: channel, row, column order, as the convolution's weight is laid out).
Poolings and projections are the model family's (models/clip.py).
LoRA (runtime/lora.py): every linear of a tower layer and of SigLIP's pooling head calls the
batch's LinearHook with our name of it qualified by its stack ("text.qkv", "vision.fc1",
"head.out"); `TowersLora.lora_layout` maps PEFT's module names onto those.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .encoder import HookedBlock, LinearHook
from .lora import LoraLayout, LoraStack

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


@dataclass(frozen=True)
class TowerConfig:
    """One tower's `text_config` / `vision_config` from config.json."""

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    layer_norm_eps: float
    hidden_act: str
    max_positions: int = 0  # text: max_position_embeddings
    vocab_size: int = 0  # text
    image_size: int = 0  # vision
    patch_size: int = 0  # vision
    channels: int = 3

    @classmethod
    def from_dict(cls, c: dict[str, Any], defaults: dict[str, Any]) -> "TowerConfig":
        """`defaults` are the architecture's config defaults (Hugging Face omits them)."""
        c = {**defaults, **c}
        if c["hidden_act"] not in _ACTIVATIONS:
            raise ValueError(f"hidden_act {c['hidden_act']!r} is not supported")
        return cls(hidden_size=c["hidden_size"], num_layers=c["num_hidden_layers"],
                   num_heads=c["num_attention_heads"], intermediate_size=c["intermediate_size"],
                   layer_norm_eps=c["layer_norm_eps"], hidden_act=c["hidden_act"],
                   max_positions=c.get("max_position_embeddings", 0),
                   vocab_size=c.get("vocab_size", 0), image_size=c.get("image_size", 0),
                   patch_size=c.get("patch_size", 0), channels=c.get("num_channels", 3))

    @property
    def grid(self) -> int:
        """Patches per image."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def patch_dim(self) -> int:
        return self.channels * self.patch_size ** 2


# LoRA: PEFT's module names inside a tower layer / SigLIP's head -> (our linear, piece)
LORA_TARGETS: dict[str, tuple[str, int | None]] = {
    "self_attn.q_proj": ("qkv", 0), "self_attn.k_proj": ("qkv", 1),
    "self_attn.v_proj": ("qkv", 2), "self_attn.out_proj": ("out", None),
    "mlp.fc1": ("fc1", None), "mlp.fc2": ("fc2", None)}
POOL_LORA_TARGETS: dict[str, tuple[str, int | None]] = {
    "attention.out_proj": ("out", None), "mlp.fc1": ("fc1", None), "mlp.fc2": ("fc2", None)}


@dataclass(frozen=True)
class TowersLora:
    """What LoRA needs of a CLIP / SigLIP model (its adapter config, for runtime/lora.py)."""

    text: TowerConfig
    vision: TowerConfig
    pool: bool  # SigLIP's attention-pooling head
    module_names: tuple[str, ...]  # every module of the checkpoint

    def lora_layout(self) -> LoraLayout:
        """The text tower's layers, the vision tower's, SigLIP's head: three stacks."""
        def linears(stack: str, cfg: TowerConfig, qkv: bool) -> dict:
            h, i = cfg.hidden_size, cfg.intermediate_size
            out = {f"{stack}.out": (h, (h,)), f"{stack}.fc1": (h, (i,)),
                   f"{stack}.fc2": (i, (h,))}
            return {f"{stack}.qkv": (h, (h, h, h)), **out} if qkv else out

        stacks = [LoraStack("text_model.encoder", "text", self.text.num_layers, LORA_TARGETS),
                  LoraStack("vision_model.encoder", "vision", self.vision.num_layers,
                            LORA_TARGETS)]
        lin = {**linears("text", self.text, True), **linears("vision", self.vision, True)}
        if self.pool:
            stacks.append(LoraStack("vision_model.head", "head", None, POOL_LORA_TARGETS))
            lin.update(linears("head", self.vision, False))
        every = {k: v for stack in stacks for k, v in stack.targets.items()}  # for messages
        return LoraLayout(every, lin, self.module_names, tuple(stacks))


class PreLNLayer(HookedBlock):
    def __init__(self, cfg: TowerConfig, index: int, stack: str) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.index, self.stack = index, stack
        self.heads = cfg.num_heads
        self.ln1 = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.qkv = nn.Linear(h, 3 * h)
        self.out = nn.Linear(h, h)
        self.ln2 = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.fc1 = nn.Linear(h, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, h)
        self.act = _ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor, attention, hook: LinearHook | None) -> torch.Tensor:
        t, h = x.shape
        qkv = self._linear("qkv", self.ln1(x), hook).view(t, 3, self.heads, h // self.heads)
        a = attention(qkv[:, 0], qkv[:, 1], qkv[:, 2]).reshape(t, h)
        x = x + self._linear("out", a, hook)
        return x + self._linear("fc2", self.act(self._linear("fc1", self.ln2(x), hook)), hook)


class TextTower(nn.Module):
    """Token + position embeddings, layers, final LayerNorm: the last hidden state per token."""

    def __init__(self, cfg: TowerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.token = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position = nn.Embedding(cfg.max_positions, cfg.hidden_size)
        self.layers = nn.ModuleList(PreLNLayer(cfg, i, "text") for i in range(cfg.num_layers))
        self.final_ln = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, attention,
                hook: LinearHook | None = None) -> torch.Tensor:
        x = self.token(ids) + self.position(positions)
        for layer in self.layers:
            x = layer(x, attention, hook)
        return self.final_ln(x)


class VisionTower(nn.Module):
    """Patch embedding (a matmul), CLIP's class token and pre-LayerNorm when the checkpoint has
    them, layers, post-LayerNorm (SigLIP: on every token; CLIP: the family applies it to the
    class token). Input: (images * patches, patch_dim); output (images, sequence, hidden)."""

    def __init__(self, cfg: TowerConfig, class_token: bool, patch_bias: bool) -> None:
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden_size
        self.patch = nn.Linear(cfg.patch_dim, h, bias=patch_bias)
        self.cls = nn.Parameter(torch.empty(h)) if class_token else None
        self.seq = cfg.grid + int(class_token)
        self.position = nn.Embedding(self.seq, h)
        self.pre_ln = nn.LayerNorm(h, eps=cfg.layer_norm_eps) if class_token else None
        self.layers = nn.ModuleList(PreLNLayer(cfg, i, "vision") for i in range(cfg.num_layers))
        self.post_ln = nn.LayerNorm(h, eps=cfg.layer_norm_eps)

    def forward(self, patches: torch.Tensor, attention,
                hook: LinearHook | None = None) -> torch.Tensor:
        h = self.cfg.hidden_size
        x = self.patch(patches).view(-1, self.cfg.grid, h)
        if self.cls is not None:
            x = torch.cat([self.cls.expand(x.shape[0], 1, h), x], dim=1)
        x = x + self.position.weight
        if self.pre_ln is not None:
            x = self.pre_ln(x)
        n = x.shape[0]
        x = x.reshape(n * self.seq, h)
        for layer in self.layers:
            x = layer(x, attention, hook)
        return x.view(n, self.seq, h)


class AttentionPool(HookedBlock):
    """SigLIP's `head`: one learnt probe attends over an image's tokens (multi-head), then
    LayerNorm + MLP with a residual; input (images, sequence, hidden), output (images, hidden)."""

    stack = "head"

    def __init__(self, cfg: TowerConfig) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.heads = cfg.num_heads
        self.probe = nn.Parameter(torch.empty(h))
        self.qkv = nn.Linear(h, 3 * h)
        self.out = nn.Linear(h, h)
        self.ln = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.fc1 = nn.Linear(h, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, h)
        self.act = _ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor, hook: LinearHook | None = None) -> torch.Tensor:
        """`hook` sees one row per image."""
        n, s, h = x.shape
        d = h // self.heads
        wq, wk, wv = self.qkv.weight.chunk(3)
        bq, bk, bv = self.qkv.bias.chunk(3)
        q = F.linear(self.probe, wq, bq).view(1, self.heads, 1, d).expand(n, -1, -1, -1)
        k = F.linear(x, wk, bk).view(n, s, self.heads, d).transpose(1, 2)
        v = F.linear(x, wv, bv).view(n, s, self.heads, d).transpose(1, 2)
        a = self._linear("out", F.scaled_dot_product_attention(q, k, v).reshape(n, h), hook)
        return a + self._linear("fc2", self.act(self._linear("fc1", self.ln(a), hook)), hook)


def _layer_names(prefix: str, i: int) -> dict[str, str]:
    src = f"{prefix}encoder.layers.{i}."
    return {f"{src}layer_norm1": "ln1", f"{src}layer_norm2": "ln2",
            f"{src}self_attn.out_proj": "out", f"{src}mlp.fc1": "fc1", f"{src}mlp.fc2": "fc2"}


def _take(state: dict[str, torch.Tensor], names: dict[str, str]) -> dict[str, torch.Tensor]:
    """Pop `src.weight/bias` of every module in `names` as `dst.weight/bias`."""
    out = {}
    for src, dst in names.items():
        for p in ("weight", "bias"):
            if f"{src}.{p}" in state:
                out[f"{dst}.{p}"] = state.pop(f"{src}.{p}")
    return out


def _layers(state: dict[str, torch.Tensor], prefix: str, num_layers: int) -> dict[str, torch.Tensor]:
    out = {}
    for i in range(num_layers):
        for k, v in _take(state, _layer_names(prefix, i)).items():
            out[f"layers.{i}.{k}"] = v
        attn = f"{prefix}encoder.layers.{i}.self_attn."
        for p in ("weight", "bias"):
            parts = [state.pop(f"{attn}{n}_proj.{p}", None) for n in "qkv"]
            if all(t is not None for t in parts):
                out[f"layers.{i}.qkv.{p}"] = torch.cat(parts, 0)
    return out


def _build(module_factory: Callable[[], nn.Module], state: dict[str, torch.Tensor],
           what: str) -> nn.Module:
    with torch.device("meta"):
        module = module_factory()
    missing = set(module.state_dict()) - set(state)
    if missing:
        raise ValueError(f"the checkpoint's {what} lacks {sorted(missing)[:5]}")
    module.load_state_dict(state, assign=True)
    return module.eval()


def text_tower(cfg: TowerConfig, state: dict[str, torch.Tensor], prefix: str) -> TextTower:
    """Build from a CLIPModel / SiglipModel state dict (`prefix` = "text_model."); the keys
    used are popped from `state`."""
    sd = _take(state, {f"{prefix}embeddings.token_embedding": "token",
                       f"{prefix}embeddings.position_embedding": "position",
                       f"{prefix}final_layer_norm": "final_ln"})
    sd.update(_layers(state, prefix, cfg.num_layers))
    state.pop(f"{prefix}embeddings.position_ids", None)
    return _build(lambda: TextTower(cfg), sd, "text tower")


def vision_tower(cfg: TowerConfig, state: dict[str, torch.Tensor], prefix: str) -> VisionTower:
    """Build from a CLIPModel / SiglipModel state dict (`prefix` = "vision_model.")."""
    emb = f"{prefix}embeddings."
    conv = state.pop(f"{emb}patch_embedding.weight")
    sd = {"patch.weight": conv.reshape(conv.shape[0], -1)}
    if f"{emb}patch_embedding.bias" in state:
        sd["patch.bias"] = state.pop(f"{emb}patch_embedding.bias")
    if f"{emb}class_embedding" in state:
        sd["cls"] = state.pop(f"{emb}class_embedding")
    sd.update(_take(state, {f"{emb}position_embedding": "position",
                            f"{prefix}pre_layrnorm": "pre_ln",
                            f"{prefix}post_layernorm": "post_ln"}))
    sd.update(_layers(state, prefix, cfg.num_layers))
    state.pop(f"{emb}position_ids", None)
    return _build(lambda: VisionTower(cfg, "cls" in sd, "patch.bias" in sd), sd, "vision tower")


def attention_pool(cfg: TowerConfig, state: dict[str, torch.Tensor], prefix: str) -> AttentionPool:
    """SigLIP's vision head (`prefix` = "vision_model.head.")."""
    sd = _take(state, {f"{prefix}attention.out_proj": "out", f"{prefix}layernorm": "ln",
                       f"{prefix}mlp.fc1": "fc1", f"{prefix}mlp.fc2": "fc2"})
    sd["qkv.weight"] = state.pop(f"{prefix}attention.in_proj_weight")
    sd["qkv.bias"] = state.pop(f"{prefix}attention.in_proj_bias")
    sd["probe"] = state.pop(f"{prefix}probe").reshape(-1)
    return _build(lambda: AttentionPool(cfg), sd, "attention-pooling head")
