"""A DeBERTa-v2/v3 encoder over packed sequences, loaded from Hugging Face weights.

DeBERTa's disentangled attention adds two relative-position terms to the content score of
every query/key pair: content-to-position (the query against the embedding of the key's
relative position) and position-to-content (the key against the embedding of the query's),
with relative positions in log buckets (v3: 256 buckets over 512 positions). Those terms are
L x L per head, so attention runs per group of sequences padded to the group's longest
(`Layout`: on CPU, groups of similar lengths), while every linear layer runs on the packed
(tokens, hidden) matrix. A group's position terms are its queries (keys) times only the rows
of the position table its length reads, picked per pair and added to the content scores as
the bias of `scaled_dot_product_attention`. Post-LN blocks as in BERT.

LoRA (`DebertaConfig.lora_layout`): the query, key and value projections (separate linears
here, as in the checkpoints), the attention output and the feed-forward linears. With shared
attention keys (v3) the key and query projections also project the relative position
embeddings, so an adapter changes those terms too, per sequence (`LinearHook.shared`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .encoder import _ACTIVATIONS, HookedBlock, LinearHook
from .lora import LoraLayout
from .weights import load_state_dict, reading


@dataclass(frozen=True)
class DebertaConfig:
    vocab_size: int
    hidden_size: int
    embedding_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    hidden_act: str
    pad_token_id: int
    position_biased_input: bool
    relative_attention: bool
    position_buckets: int
    max_relative_positions: int
    pos_att_type: tuple[str, ...]
    share_att_key: bool
    norm_rel_ebd: str
    position_offset: int = 0  # positions count 0..n-1 in each sequence
    position_pad_id: int | None = None

    @classmethod
    def from_dict(cls, c: dict) -> "DebertaConfig":
        if c.get("conv_kernel_size", 0) > 0:
            raise ValueError("DeBERTa-v2 convolution layers (conv_kernel_size) are not supported")
        kinds = c.get("pos_att_type") or []
        if isinstance(kinds, str):
            kinds = [k.strip() for k in kinds.lower().split("|")]
        max_rel = c.get("max_relative_positions", -1)
        return cls(
            vocab_size=c["vocab_size"],
            hidden_size=c["hidden_size"],
            embedding_size=c.get("embedding_size") or c["hidden_size"],
            num_layers=c["num_hidden_layers"],
            num_heads=c["num_attention_heads"],
            intermediate_size=c["intermediate_size"],
            max_position_embeddings=c["max_position_embeddings"],
            type_vocab_size=c.get("type_vocab_size", 0),
            layer_norm_eps=c.get("layer_norm_eps", 1e-7),
            hidden_act=c.get("hidden_act", "gelu"),
            pad_token_id=c.get("pad_token_id", 0),
            position_biased_input=c.get("position_biased_input", True),
            relative_attention=c.get("relative_attention", False),
            position_buckets=c.get("position_buckets", -1),
            max_relative_positions=max_rel if max_rel >= 1 else c["max_position_embeddings"],
            pos_att_type=tuple(kinds),
            share_att_key=c.get("share_att_key", False),
            norm_rel_ebd=(c.get("norm_rel_ebd") or "none").lower(),
        )

    @classmethod
    def from_folder(cls, folder: Path) -> "DebertaConfig":
        path = folder / "config.json"
        with reading(path):
            return cls.from_dict(json.loads(path.read_text()))

    def lora_layout(self) -> LoraLayout:
        """Where LoRA applies: Hugging Face's module names in a layer -> our linears (none
        fused; the separate position projections where the checkpoint has them)."""
        h, inter = self.hidden_size, self.intermediate_size
        ours = {"attention.self.query_proj": "query_proj", "attention.self.key_proj": "key_proj",
                "attention.self.value_proj": "value_proj", "attention.output.dense": "attn_out",
                "intermediate.dense": "ffn_in", "output.dense": "ffn_out"}
        if self.relative_attention and not self.share_att_key:
            for kind, name in (("c2p", "pos_key_proj"), ("p2c", "pos_query_proj")):
                if kind in self.pos_att_type:
                    ours[f"attention.self.{name}"] = name
        sizes = {"ffn_in": (h, (inter,)), "ffn_out": (inter, (h,))}
        linears = {v: sizes.get(v, (h, (h,))) for v in ours.values()}
        in_layer = [*ours, "attention.output.LayerNorm", "output.LayerNorm"]
        names = [f"encoder.layer.{i}.{m}" for i in range(self.num_layers) for m in in_layer]
        names += ["embeddings.word_embeddings", "embeddings.LayerNorm", "encoder.rel_embeddings",
                  "encoder.LayerNorm"]
        targets = {k.removeprefix("attention.self."): (v, None) for k, v in ours.items()}
        return LoraLayout(targets, linears, tuple(names))

    @property
    def span(self) -> int:
        """Relative positions each side: the buckets, or the positions when not bucketed."""
        return self.position_buckets if self.position_buckets > 0 else self.max_relative_positions

    @property
    def max_tokens(self) -> int:
        """DeBERTa reads any length (positions are relative); beyond its training length the
        log buckets saturate. The position table, when it has one, bounds it."""
        return self.max_position_embeddings


def relative_positions(length: int, cfg: DebertaConfig, device: torch.device) -> torch.Tensor:
    """(L, L) bucketed relative position of query i to key j (i - j), as DeBERTa computes it."""
    ids = torch.arange(length, dtype=torch.long, device=device)
    rel = ids[:, None] - ids[None, :]
    bucket, top = cfg.position_buckets, cfg.max_relative_positions
    if bucket > 0 and top > 0:
        mid = bucket // 2
        sign = torch.sign(rel)
        near = (rel < mid) & (rel > -mid)
        magnitude = torch.where(near, torch.tensor(mid - 1).type_as(rel), rel.abs())
        log_pos = torch.ceil(torch.log(magnitude / mid) / torch.log(torch.tensor((top - 1) / mid))
                             * (mid - 1)) + mid
        rel = torch.where(magnitude <= mid, rel.type_as(log_pos), log_pos * sign)
    return rel.to(torch.long)


GROUP_WASTE = 0.25  # padding a group may add to its attention area (its L^2 per sequence)
GROUP_MIN_AREA = 64 * 64  # below this much padding a group takes the next sequence anyway


@dataclass(frozen=True)
class Group:
    """Sequences of similar length, attended together padded to the longest (`length`)."""

    seqs: torch.Tensor  # (G,) their numbers in the batch
    length: int
    rows: torch.Tensor  # (G * L,) packed token of each padded position (padding: any token)
    real: torch.Tensor | None  # (N,) padded positions holding a token (None: all do)...
    tokens: torch.Tensor  # ...and their packed tokens
    key_mask: torch.Tensor | None  # (1, G, 1, L), False for padding keys; None: no padding


@dataclass(frozen=True)
class Relative:
    """Where the position terms of sequences of one length L read: the rows [lo, hi) of the
    relative position table (R = hi - lo), and for each query i and key j the flat position
    in the (L, R) products of the queries (content-to-position: i * R + index(i, j)) and of
    the keys (position-to-content: j * R + index(i, j); the buckets are symmetric, so the
    key's relative position to the query is the same index)."""

    lo: int
    hi: int
    c2p: torch.Tensor  # (L * L,)
    p2c: torch.Tensor  # (L * L,)


class Layout:
    """A batch's sequences in groups for attention (packed tokens in, packed tokens out).

    The relative-position terms are L x L per head, so attention runs per group of sequences
    padded to the group's longest. On CPU, where attention on padding costs what it costs on
    tokens, sequences sorted by length form groups closed when padding would add more than
    GROUP_WASTE to their area; on an accelerator, where each group's kernel launches cost more
    than its padding, all sequences form one group. Every linear layer runs on the packed
    (tokens, hidden) matrix. Each length's `Relative` is built once per batch."""

    def __init__(self, cu_seqlens: np.ndarray, cfg: DebertaConfig, device: torch.device) -> None:
        self.cfg, self.device = cfg, device
        lengths = np.diff(cu_seqlens)
        groups = _grouped(lengths) if device.type == "cpu" else \
            [np.flatnonzero(lengths).tolist()] if lengths.any() else []
        self.groups = [self._group(cu_seqlens, lengths, seqs, device) for seqs in groups]
        self._relative: dict[int, Relative] = {}

    @staticmethod
    def _group(cu: np.ndarray, lengths: np.ndarray, seqs: list[int],
               device: torch.device) -> Group:
        n = lengths[seqs]
        length = int(n.max())
        offset = np.arange(length)
        valid = offset[None, :] < n[:, None]  # (G, L)
        rows = np.where(valid, cu[seqs][:, None] + offset[None, :], cu[seqs][:, None]).ravel()
        as_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(device)  # noqa: E731
        if valid.all():
            return Group(as_tensor(seqs), length, as_tensor(rows), None, as_tensor(rows), None)
        real = np.flatnonzero(valid)
        return Group(as_tensor(seqs), length, as_tensor(rows), as_tensor(real),
                     as_tensor(rows[real]), torch.from_numpy(valid).to(device)[None, :, None, :])

    def relative(self, length: int) -> Relative:
        if length not in self._relative:
            span = self.cfg.span
            index = torch.clamp(relative_positions(length, self.cfg, self.device) + span, 0,
                                2 * span - 1)
            lo, hi = int(index.min()), int(index.max()) + 1
            index = index - lo
            at = torch.arange(length, device=self.device) * (hi - lo)
            self._relative[length] = Relative(lo, hi, (at[:, None] + index).view(-1),
                                              (at[None, :] + index).view(-1))
        return self._relative[length]

    @property
    def rows_read(self) -> tuple[int, int]:
        """The rows of the relative position table any group reads."""
        if not self.groups:
            return 0, 0
        r = self.relative(max(g.length for g in self.groups))
        return r.lo, r.hi


def _grouped(lengths: np.ndarray) -> list[list[int]]:
    """Sequence numbers (non-empty sequences only) in groups: longest first, a group taking
    the next shorter sequence while its padding stays within GROUP_WASTE of its area (or
    under GROUP_MIN_AREA)."""
    groups: list[list[int]] = []
    area = 0
    for s in np.argsort(-lengths, kind="stable").tolist():
        n = int(lengths[s])
        if n == 0:
            break
        if groups:
            top = int(lengths[groups[-1][0]])
            padding = (len(groups[-1]) + 1) * top * top - (area + n * n)
            if padding <= max(GROUP_WASTE * (area + n * n), GROUP_MIN_AREA):
                groups[-1].append(s)
                area += n * n
                continue
        groups.append([s])
        area = n * n
    return groups


class DebertaLayer(HookedBlock):
    def __init__(self, cfg: DebertaConfig, index: int) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.cfg, self.index, self.heads = cfg, index, cfg.num_heads
        self.query_proj, self.key_proj, self.value_proj = (nn.Linear(h, h) for _ in range(3))
        if cfg.relative_attention and not cfg.share_att_key:
            if "c2p" in cfg.pos_att_type:
                self.pos_key_proj = nn.Linear(h, h)
            if "p2c" in cfg.pos_att_type:
                self.pos_query_proj = nn.Linear(h, h)
        self.attn_out = nn.Linear(h, h)
        self.ln1 = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.ffn_in = nn.Linear(h, cfg.intermediate_size)
        self.ffn_out = nn.Linear(cfg.intermediate_size, h)
        self.ln2 = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.act = _ACTIVATIONS[cfg.hidden_act]
        self.factor = 1 + sum(k in cfg.pos_att_type for k in ("c2p", "p2c")) \
            if cfg.relative_attention else 1

    def attention(self, x: torch.Tensor, layout: Layout, rel_emb: torch.Tensor | None,
                  hook: LinearHook | None) -> torch.Tensor:
        """Per group: content scores plus the position terms as an additive bias, through
        scaled_dot_product_attention; out in packed order. Queries, keys and values are
        (H, T, d) here, so a group's are (H, G * L, d) and its position products one bmm."""
        t, heads = x.shape[0], self.heads
        q, k, v = (self._linear(name, x, hook).view(t, heads, -1).transpose(0, 1)
                   for name in ("query_proj", "key_proj", "value_proj"))
        d = q.shape[-1]
        scale = math.sqrt(d * self.factor)
        pos = self._positions(rel_emb, scale, hook) if rel_emb is not None else {}
        out = x.new_empty(t, heads, d)
        for g in layout.groups:
            n, length = len(g.seqs), g.length
            qg, kg, vg = (y.index_select(1, g.rows) for y in (q, k, v))  # (H, G * L, d)
            bias = self._position_bias(qg, kg, g, layout, pos) if pos else None
            if g.key_mask is not None:
                bias = (x.new_zeros(heads, n, length, length) if bias is None
                        else bias).masked_fill_(~g.key_mask, torch.finfo(x.dtype).min)
            grouped = [y.view(heads, n, length, d).transpose(0, 1) for y in (qg, kg, vg)]
            context = F.scaled_dot_product_attention(
                *grouped, attn_mask=None if bias is None else bias.transpose(0, 1),
                scale=1 / scale)  # (G, H, L, d)
            context = context.transpose(1, 2).reshape(n * length, heads, d)
            out[g.tokens] = context if g.real is None else context[g.real]
        return out.view(x.shape)

    def _positions(self, rel_emb: torch.Tensor, scale: float, hook: LinearHook | None
                   ) -> dict[str, torch.Tensor]:
        """The relative position embeddings (the rows the batch reads) through the key
        projection (c2p) and the query projection (p2c), over `scale`, as contiguous (H, d, R)
        matrices (bmm runs ~1.5x faster on them than on a transposed view), or (B, H, d, R)
        when the sequences' adapters project them differently."""
        share = self.cfg.share_att_key
        out = {}
        for kind, name in (("c2p", "key_proj" if share else "pos_key_proj"),
                           ("p2c", "query_proj" if share else "pos_query_proj")):
            if kind not in self.cfg.pos_att_type:
                continue
            y = getattr(self, name)(rel_emb)
            per_seq = hook.shared(self.index, name, rel_emb, y) if hook is not None else None
            if per_seq is not None:
                table = per_seq.view(per_seq.shape[0], rel_emb.shape[0], self.heads, -1)
                out[kind] = (table / scale).permute(0, 2, 3, 1).contiguous()
            else:
                table = y.view(rel_emb.shape[0], self.heads, -1)
                out[kind] = (table / scale).permute(1, 2, 0).contiguous()
        return out

    @staticmethod
    def _position_bias(qg: torch.Tensor, kg: torch.Tensor, g: Group, layout: Layout,
                       pos: dict[str, torch.Tensor]) -> torch.Tensor:
        """Content-to-position and position-to-content terms of a group, (H, G, L, L): the
        group's queries (keys) times the table rows its length reads, (H, G, L * R), picked
        at each pair's relative position."""
        heads, n, length = qg.shape[0], len(g.seqs), g.length
        rel = layout.relative(length)
        first = layout.rows_read[0]
        bias = None
        for kind, y in (("c2p", qg), ("p2c", kg)):
            if kind not in pos:
                continue
            table = pos[kind][..., rel.lo - first:rel.hi - first]
            if table.dim() == 4:  # per sequence: (G, H, d, R)
                product = y.view(heads, n, length, -1) @ table[g.seqs].transpose(0, 1)
            else:
                product = torch.bmm(y, table)  # (H, G * L, R)
            index = getattr(rel, kind).expand(heads, n, length * length)
            term = torch.gather(product.view(heads, n, -1), -1, index)
            bias = term if bias is None else bias.add_(term)
        return bias.view(heads, n, length, length)

    def forward(self, x: torch.Tensor, layout: Layout, rel_emb: torch.Tensor | None,
                hook: LinearHook | None) -> torch.Tensor:
        a = self.attention(x, layout, rel_emb, hook)
        x = self.ln1(x + self._linear("attn_out", a, hook))
        f = self._linear("ffn_out", self.act(self._linear("ffn_in", x, hook)), hook)
        return self.ln2(x + f)


class DebertaEncoder(nn.Module):
    """Embeddings + DeBERTa layers; returns the last hidden state of every packed token.

    Called as the other stacks are (ids, positions, token types, attention, hook), with a
    `Layout` of the batch as its attention (`layout(cu_seqlens, device)`)."""

    def __init__(self, cfg: DebertaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        h, e = cfg.hidden_size, cfg.embedding_size
        self.word = nn.Embedding(cfg.vocab_size, e)
        self.position = nn.Embedding(cfg.max_position_embeddings, e) \
            if cfg.position_biased_input else None
        self.token_type = nn.Embedding(cfg.type_vocab_size, e) if cfg.type_vocab_size > 0 else None
        self.embed_proj = nn.Linear(e, h, bias=False) if e != h else None
        self.ln = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.layers = nn.ModuleList(DebertaLayer(cfg, i) for i in range(cfg.num_layers))
        if cfg.relative_attention:
            self.rel_embeddings = nn.Embedding(2 * cfg.span, h)
            self.rel_ln = nn.LayerNorm(h, eps=cfg.layer_norm_eps) \
                if "layer_norm" in cfg.norm_rel_ebd else None

    def layout(self, cu_seqlens: np.ndarray, device: torch.device) -> Layout:
        return Layout(cu_seqlens, self.cfg, device)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                token_type_ids: torch.Tensor | None, layout: Layout,
                hook: LinearHook | None = None) -> torch.Tensor:
        x = self.word(input_ids)
        if self.position is not None:
            x = x + self.position(position_ids)
        if self.token_type is not None:
            x = x + (self.token_type(token_type_ids) if token_type_ids is not None
                     else self.token_type.weight[0])
        if self.embed_proj is not None:
            x = self.embed_proj(x)
        x = self.ln(x)
        rel_emb = None
        if self.cfg.relative_attention:
            lo, hi = layout.rows_read
            rel_emb = self.rel_embeddings.weight[lo:hi]
            if self.rel_ln is not None:
                rel_emb = self.rel_ln(rel_emb)
        for layer in self.layers:
            x = layer(x, layout, rel_emb, hook)
        return x

    @classmethod
    def from_weights(cls, cfg: DebertaConfig, weights: dict[str, torch.Tensor],
                     prefix: str = "") -> tuple["DebertaEncoder", dict[str, torch.Tensor]]:
        """Build from Hugging Face DebertaV2Model weights (names after `prefix`); also returns
        the weights it did not use."""
        with torch.device("meta"):
            enc = cls(cfg)
        state, rest = _convert(weights, prefix, cfg.num_layers)
        missing = set(enc.state_dict()) - set(state)
        if missing:
            raise ValueError(f"DeBERTa weights lack {sorted(missing)[:5]}")
        enc.load_state_dict(state, assign=True, strict=False)
        return enc.eval(), rest

    @classmethod
    def from_folder(cls, folder: Path) -> tuple["DebertaEncoder", dict[str, torch.Tensor]]:
        weights = load_state_dict(folder)
        prefix = "deberta." if any(k.startswith("deberta.") for k in weights) else ""
        return cls.from_weights(DebertaConfig.from_folder(folder), weights, prefix)


def _convert(hf: dict[str, torch.Tensor], prefix: str, num_layers: int) -> tuple[dict, dict]:
    """Hugging Face DeBERTa-v2 names (after `prefix`) -> ours."""
    sd = {k[len(prefix):]: v for k, v in hf.items() if k.startswith(prefix)}
    rest = {k: v for k, v in hf.items() if not k.startswith(prefix)}
    out: dict[str, torch.Tensor] = {}
    names = {"embeddings.word_embeddings.weight": "word.weight",
             "embeddings.position_embeddings.weight": "position.weight",
             "embeddings.token_type_embeddings.weight": "token_type.weight",
             "embeddings.embed_proj.weight": "embed_proj.weight",
             "embeddings.LayerNorm.weight": "ln.weight", "embeddings.LayerNorm.bias": "ln.bias",
             "encoder.rel_embeddings.weight": "rel_embeddings.weight",
             "encoder.LayerNorm.weight": "rel_ln.weight", "encoder.LayerNorm.bias": "rel_ln.bias"}
    for src, dst in names.items():
        if src in sd:
            out[dst] = sd.pop(src)
    sd.pop("embeddings.position_ids", None)
    layer = {"attention.self.query_proj": "query_proj", "attention.self.key_proj": "key_proj",
             "attention.self.value_proj": "value_proj",
             "attention.self.pos_key_proj": "pos_key_proj",
             "attention.self.pos_query_proj": "pos_query_proj",
             "attention.output.dense": "attn_out", "attention.output.LayerNorm": "ln1",
             "intermediate.dense": "ffn_in", "output.dense": "ffn_out", "output.LayerNorm": "ln2"}
    for i in range(num_layers):
        for src, dst in layer.items():
            for p in ("weight", "bias"):
                key = f"encoder.layer.{i}.{src}.{p}"
                if key in sd:
                    out[f"layers.{i}.{dst}.{p}"] = sd.pop(key)
    rest.update({prefix + k: v for k, v in sd.items()})
    return out, rest
