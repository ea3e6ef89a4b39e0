"""LoRA adapters in the PEFT format, applied per row segment of a packed batch.

Loading (`load_adapter`): adapter_config.json + adapter_model.safetensors (or .bin) become, for
every (layer, linear) the adapter touches, one low-rank pair A (R, in) and B (out, R) with
PEFT's scaling (lora_alpha / r, or lora_alpha / sqrt(r) with rslora; per-module rank_pattern /
alpha_pattern) folded into B. Query, key and value share our fused `qkv` linear (and a
decoder's gate and up projections our `gate_up`), so their updates are fused too: A stacks the
A matrices, B is block-diagonal over the output slices (`LoraLayout` says which module maps to
which slice, for encoders and decoders). A model with several stacks (CLIP / SigLIP's text
and vision towers) lists them in `LoraLayout.stacks`: a module belongs to the stack whose path
precedes its `layers.N`, and our linears carry the stack's name ("text.qkv", "vision.fc1").
A model's own linears outside its layers (GLiNER's span and prompt MLPs, an NLI model's pooler
and classifier) are `LoraLayout.heads`: their pairs are kept unmerged as the adapter's head
`{"lora_a", "lora_b"}` entries, which the family adds where it runs that linear (`head_linear`).
`ModelLora` gives a stack's layout such heads and the stack's path inside the model.
Everything that does not fit the base model is refused with InvalidAdapter naming the adapter
and the reason, before anything is kept.

Applying (`BatchLora`): built once per batch from `PackedBatch.adapter_slots`, it is the
encoder's LinearHook. It adds `x @ A^T @ B^T` to the output rows of the tokens whose sequence
uses the adapter, and touches no other row, so base rows stay bit-for-bit what the base model
gives. Batches are never regrouped by adapter:
- one adapter in the batch: one gather (skipped when every row uses it), two matmuls and one
  index_add per linear;
- several adapters: the adapter rows are sorted by adapter and cut into equal chunks of C
  rows (a slot's last chunk padded), so every linear costs one gather, two batched matmuls
  over the chunks (each chunk with its adapter's A and B, ranks zero-padded to the largest)
  and one index_add, whatever the number of adapters: a segmented matmul (as in Punica /
  S-LoRA's SGMV) in plain PyTorch. The adapters' weights stacked for a set of adapters are
  cached (`StackCache`) so consecutive batches with the same adapters reuse them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import AdapterNotFound, InvalidAdapter
from .batch import PackedBatch
from .encoder import LORA_TARGETS, EncoderConfig

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")

# Module names (relative to one encoder layer) in BERT / XLM-R, as PEFT sees them.
LAYER_MODULES = ("attention.self.query", "attention.self.key", "attention.self.value",
                 "attention.output.dense", "attention.output.LayerNorm", "intermediate.dense",
                 "output.dense", "output.LayerNorm")
OTHER_MODULES = ("embeddings.word_embeddings", "embeddings.position_embeddings",
                 "embeddings.token_type_embeddings", "embeddings.LayerNorm", "pooler.dense")
# LoRA on these changes nothing we output (embedders read the last hidden state): skipped.
IGNORED_MODULES = ("pooler.dense",)
# adapter_config.json fields whose non-default values change what the adapter computes in ways
# we do not implement: refused rather than silently ignored.
_UNSUPPORTED = {
    "use_dora": "DoRA (use_dora)",
    "lora_bias": "a bias on lora_B (lora_bias)",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D layers)",
    "modules_to_save": "fully trained extra modules (modules_to_save)",
    "layer_replication": "layer_replication",
    "target_parameters": "target_parameters",
    "trainable_token_indices": "trainable_token_indices",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "use_qalora": "QA-LoRA (use_qalora)",
    "use_bdlora": "BD-LoRA (use_bdlora)",
}
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>A|B)(?:\.[^.]+)?\.weight$")
_LAYER = re.compile(r"(?:^|\.)layers?\.(?P<index>\d+)\.(?P<rel>.+)$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class LoraStack:
    """One of several stacks of a model (CLIP / SigLIP: the text and the vision tower, and
    SigLIP's pooling head), for `LoraLayout.stacks`."""

    path: str  # the module path in front of `layers.N`, e.g. "text_model.encoder"
    name: str  # our linears of this stack are called "<name>.<linear>", e.g. "text.qkv"
    layers: int | None  # None: one block whose modules sit right under `path` (layer 0)
    targets: dict[str, tuple[str, int | None]]  # module inside a layer -> (our linear, piece)


@dataclass(frozen=True)
class LoraLayout:
    """Where LoRA applies in a model: one stack of layers (BERT / XLM-R, decoder, ModernBERT),
    or several (`stacks`, whose linears carry the stack's name)."""

    targets: dict[str, tuple[str, int | None]]  # module inside a layer -> (our linear, piece)
    linears: dict[str, tuple[int, tuple[int, ...]]]  # our linear -> (fan-in, piece sizes)
    module_names: tuple[str, ...]  # every module a target_modules entry may name
    stacks: tuple[LoraStack, ...] = ()  # empty: one stack of cfg.num_layers layers
    # a model's own linears outside the layers: module name -> (fan-in, fan-out)
    heads: dict[str, tuple[int, int]] = field(default_factory=dict)
    # modules whose LoRA changes nothing the model outputs (a head of the same name wins)
    ignored: tuple[str, ...] = IGNORED_MODULES


@dataclass(frozen=True)
class ModelLora:
    """A model's `lora_config` when it has LoRA-able linears of its own (`heads`) or its stack
    sits under a path (`prefix`, e.g. GLiNER's "token_rep_layer.bert_layer.model."); reads as
    the stack's config otherwise."""

    stack: Any
    heads: dict[str, tuple[int, int]]
    prefix: str = ""

    def __getattr__(self, name: str) -> Any:
        if name == "stack":  # not set yet (copying): no recursion
            raise AttributeError(name)
        return getattr(self.stack, name)

    def lora_layout(self) -> LoraLayout:
        base = layout_for(self.stack)
        names = tuple(self.prefix + n for n in base.module_names) + tuple(self.heads)
        return dataclasses.replace(base, module_names=names, heads=self.heads)


def layout_for(cfg: Any) -> LoraLayout:
    """A stack's config that is not BERT / XLM-R's (decoder, ModernBERT, DeBERTa) gives its own
    layout (`cfg.lora_layout()`); BERT / XLM-R's is built here."""
    if hasattr(cfg, "lora_layout"):
        return cfg.lora_layout()
    h, inter = cfg.hidden_size, cfg.intermediate_size
    names = [f"encoder.layer.{i}.{m}" for i in range(cfg.num_layers) for m in LAYER_MODULES]
    return LoraLayout(LORA_TARGETS, {"qkv": (h, (h, h, h)), "attn_out": (h, (h,)),
                                     "ffn_in": (h, (inter,)), "ffn_out": (inter, (h,))},
                      tuple(names + list(OTHER_MODULES)))


def _is(module: str, name: str) -> bool:
    return module == name or module.endswith("." + name)


def _target(rel: str, targets: dict[str, tuple[str, int | None]]) -> tuple[str, int | None] | None:
    """Our (linear, output slice) for a module path inside one layer: the longest target name
    that `rel` is or ends with (so "attention.output.dense" is not "output.dense")."""
    hits = [k for k in targets if rel == k or rel.endswith("." + k)]
    return targets[max(hits, key=len)] if hits else None


def _locate(module: str, layout: LoraLayout, cfg: Any):
    """(layer, our linear, piece, module name inside its layer, layers of its stack) for an
    adapter's module path, or None when LoRA cannot apply there."""
    if not layout.stacks:
        lm = _LAYER.search(module)
        target = _target(lm["rel"], layout.targets) if lm else None
        return None if target is None else (int(lm["index"]), *target, lm["rel"], cfg.num_layers)
    for stack in layout.stacks:  # the stack's path, after any wrapper's prefix
        if m := re.search(rf"(?:^|\.){re.escape(stack.path)}\.(?P<rest>.+)$", module):
            rest = m["rest"]
            break
    else:
        return None
    if stack.layers is None:
        layer, rel = 0, rest
    elif lm := re.fullmatch(r"layers\.(\d+)\.(.+)", rest):
        layer, rel = int(lm[1]), lm[2]
    else:
        return None
    target = stack.targets.get(rel)
    if target is None:
        return None
    return layer, f"{stack.name}.{target[0]}", target[1], f"{stack.name}.{rel}", stack.layers or 1


@dataclass
class Delta:
    """One linear's low-rank update: y += x @ a.T @ b.T (scaling folded into b)."""

    a: torch.Tensor  # (R, in)
    b: torch.Tensor  # (out, R)


@dataclass(eq=False)
class LoraAdapter:
    """A loaded adapter: per (layer, linear) deltas, optional head replacements."""

    name: str
    folder: Path
    deltas: dict[tuple[int, str], Delta]
    rank: int
    alpha: float
    rslora: bool
    # PEFT module names inside a layer, e.g. "attention.self.query" (with several stacks the
    # stack's name in front: "text.self_attn.q_proj"), and the head linears it adapts
    targets: tuple[str, ...]
    layers: int  # layers it adapts (over all stacks; a stack without layers counts as one)
    # per head: weights replacing it ({"weight", "bias"}: BGE-M3's head files) or a LoRA pair
    # added to it ({"lora_a" (R, in), "lora_b" (out, R), scaling folded in}: LoraLayout.heads)
    heads: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    ignored: tuple[str, ...] = ()
    uid: int = -1  # the slot, set by the adapter manager

    @property
    def nbytes(self) -> int:
        tensors = [t for d in self.deltas.values() for t in (d.a, d.b)]
        tensors += [t for h in self.heads.values() for t in h.values()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def info(self) -> dict[str, Any]:
        return {"rank": self.rank, "alpha": self.alpha, "rslora": self.rslora,
                "targets": list(self.targets), "layers": self.layers,
                "heads": sorted(self.heads), "bytes": self.nbytes}


@dataclass(frozen=True)
class BaseModelId:
    """What an adapter's base_model_name_or_path is compared with."""

    names: tuple[str, ...]  # served name, catalog source, ...
    folder: Path
    cfg: Any
    model_type: str | None


def _invalid(name: str, reason: str) -> InvalidAdapter:
    return InvalidAdapter(f"adapter {name!r}: {reason}")


def read_config(name: str, folder: Path) -> dict[str, Any]:
    if not folder.is_dir():
        raise AdapterNotFound(f"adapter {name!r}: folder {folder} does not exist")
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise _invalid(name, f"{folder} has no {CONFIG_FILE} (not a PEFT adapter folder)")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _invalid(name, f"{CONFIG_FILE} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise _invalid(name, f"{CONFIG_FILE} is not a JSON object")
    return config


def read_weights(name: str, folder: Path) -> dict[str, torch.Tensor]:
    """The adapter's tensors; a corrupt or truncated file is an InvalidAdapter."""
    for fname in WEIGHT_FILES:
        path = folder / fname
        if not path.is_file():
            continue
        try:
            if fname.endswith(".safetensors"):
                from safetensors.torch import load_file

                return load_file(str(path))
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - safetensors / pickle errors are many
            raise _invalid(name, f"{fname} is corrupt or truncated ({type(exc).__name__}: "
                                 f"{exc})") from None
    raise _invalid(name, f"{folder} has no {' or '.join(WEIGHT_FILES)}")


def _check_config(name: str, config: dict[str, Any]) -> None:
    peft_type = config.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise _invalid(name, f"peft_type is {peft_type!r}; only LORA adapters are supported")
    for key, what in _UNSUPPORTED.items():
        if config.get(key):
            raise _invalid(name, f"uses {what}, which this server does not support")
    if config.get("bias", "none") != "none":
        raise _invalid(name, f"bias={config['bias']!r} (trained base biases) is not supported; "
                             "only bias='none' adapters are")
    for key in ("r", "lora_alpha"):
        value = config.get(key, 8)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise _invalid(name, f"{CONFIG_FILE}: {key} must be a positive number, not {value!r}")


def _check_targets(name: str, config: dict[str, Any], layout: LoraLayout) -> None:
    """Every target_modules entry must name a module the model has."""
    targets = config.get("target_modules")
    if targets is None:
        return
    names = layout.module_names
    if isinstance(targets, str):
        prefixes = ("", "bert.", "roberta.", "model.", "0.auto_model.")
        if not any(re.fullmatch(targets, p + n) for n in names for p in prefixes):
            raise _invalid(name, f"target_modules {targets!r} matches no module of this model")
        return
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise _invalid(name, "target_modules must be a list of names or a regex string")
    unknown = [t for t in targets if t not in names and not any(n.endswith("." + t) for n in names)]
    if unknown:
        raise _invalid(name, f"target_modules {unknown} name modules this model does not have "
                             f"(its adaptable linears: {', '.join(layout.targets)})")


def _check_base(name: str, config: dict[str, Any], base: BaseModelId) -> None:
    """Refuse an adapter made for another base model, where that can be judged."""
    claimed = config.get("base_model_name_or_path")
    if not claimed or not isinstance(claimed, str):
        return
    path = Path(claimed).expanduser()
    if path.is_absolute() or claimed.startswith((".", "~")) or path.exists():
        if not path.exists():
            return  # trained on a folder we cannot see: the shape checks decide
        if path.resolve() == base.folder.resolve() or not (path / "config.json").is_file():
            return
        try:
            theirs = EncoderConfig.from_folder(path)
            their_type = json.loads((path / "config.json").read_text()).get("model_type")
        except Exception:  # noqa: BLE001 - an unreadable foreign config decides nothing
            return
        fields = ("hidden_size", "num_layers", "intermediate_size", "vocab_size")
        differ = [f for f in fields if getattr(theirs, f) != getattr(base.cfg, f, None)]
        if differ or (their_type and base.model_type and their_type != base.model_type):
            raise _invalid(name, f"it was made for another base model ({claimed}: "
                                 f"{_shape(their_type, theirs)}), not {base.names[0]} "
                                 f"({_shape(base.model_type, base.cfg)})")
        return
    ours = [n for n in base.names if _HUB_ID.match(n)]
    if _HUB_ID.match(claimed) and ours and claimed.lower() not in {n.lower() for n in ours}:
        raise _invalid(name, f"it was made for base model {claimed!r}, not {base.names[0]!r} "
                             f"(base_model_name_or_path in {CONFIG_FILE})")


def _shape(model_type: str | None, cfg: Any) -> str:
    if not hasattr(cfg, "hidden_size"):  # several stacks (CLIP / SigLIP): the type says it
        return str(model_type)
    size = f"hidden {cfg.hidden_size}, {cfg.num_layers} layers"
    return f"{model_type}, {size}" if model_type else size  # GLiNER: no config.json


def _pattern(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup (peft.utils.other.get_pattern_key)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def load_adapter(name: str, folder: Path, base: BaseModelId, device: torch.device,
                 dtype: torch.dtype) -> LoraAdapter:
    """Read, validate and convert an adapter folder; raises AdapterNotFound / InvalidAdapter."""
    cfg = base.cfg
    config = read_config(name, folder)
    _check_config(name, config)
    _check_base(name, config, base)
    layout = layout_for(cfg)
    _check_targets(name, config, layout)
    state = read_weights(name, folder)
    r, alpha = config.get("r", 8), config.get("lora_alpha", 8)
    rslora = bool(config.get("use_rslora", False))

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    ignored: set[str] = set()
    for key, tensor in state.items():
        m = _KEY.match(key)
        if m is None:
            what = ("embedding LoRA" if "lora_embedding" in key else
                    "DoRA" if "lora_magnitude" in key else "not a LoRA weight")
            raise _invalid(name, f"tensor {key!r} ({what}) cannot be applied by this server")
        module = m["module"]
        if not any(_is(module, h) for h in layout.heads) and \
                any(_is(module, i) for i in layout.ignored):
            ignored.add(module.removeprefix("base_model.model."))
            continue
        pairs.setdefault(module, {})[m["ab"]] = tensor

    parts: dict[tuple[int, str], list[tuple[int | None, torch.Tensor, torch.Tensor]]] = {}
    heads: dict[str, dict[str, torch.Tensor]] = {}
    targets, layers = set(), set()
    for module, ab in sorted(pairs.items()):
        head = next((h for h in layout.heads if _is(module, h)), None)
        where = None if head is not None else _locate(module, layout, cfg)
        if head is None and where is None:
            raise _invalid(name, f"it targets module {module!r}, which this model does not "
                                 "have or cannot adapt (LoRA applies to the attention query, "
                                 "key, value and output and the feed-forward linears"
                                 + (f", and {', '.join(layout.heads)}" if layout.heads else "")
                                 + ")")
        if where is not None and where[0] >= where[4]:
            raise _invalid(name, f"it adapts layer {where[0]} but the model has {where[4]} "
                                 f"layers (made for a deeper model?)")
        if set(ab) != {"A", "B"}:
            missing = "lora_B" if "A" in ab else "lora_A"
            raise _invalid(name, f"{module} has no {missing} weight")
        a, b = ab["A"], ab["B"]
        if head is not None:
            fan_in, fan_out = layout.heads[head]
        else:
            fan_in, sizes = layout.linears[where[1]]
            fan_out = sizes[where[2] or 0]
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != fan_in or b.shape[0] != fan_out \
                or b.shape[1] != a.shape[0]:
            raise _invalid(name, f"{module}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} "
                                 f"do not fit the model's {fan_in} -> {fan_out} linear "
                                 f"(expected ({a.shape[0]}, {fan_in}) / ({fan_out}, "
                                 f"{a.shape[0]}))")
        rank = a.shape[0]
        rel_key = module.removeprefix("base_model.model.")
        want_rank = _pattern(config.get("rank_pattern"), rel_key, r)
        if rank != want_rank:
            raise _invalid(name, f"{module}: the weights have rank {rank} but "
                                 f"{CONFIG_FILE} says r={want_rank}")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise _invalid(name, f"{module} holds NaN or infinite values")
        mod_alpha = _pattern(config.get("alpha_pattern"), rel_key, alpha)
        scale = mod_alpha / (math.sqrt(rank) if rslora else rank)
        if head is not None:  # the family runs its heads in float32
            heads[head] = {"lora_a": a.float().to(device).contiguous(),
                           "lora_b": (b.float() * scale).to(device).contiguous()}
            targets.add(head)
            continue
        layer, linear, piece, rel, _ = where
        parts.setdefault((layer, linear), []).append((piece, a.float(), b.float() * scale))
        targets.add(rel)
        layers.add((linear.rpartition(".")[0], layer))
    if not parts and not heads:
        raise _invalid(name, "it holds no LoRA weights for any encoder layer")

    deltas: dict[tuple[int, str], Delta] = {}
    for (layer, linear), ps in parts.items():
        sizes = layout.linears[linear][1]
        if len(sizes) > 1:  # a fused linear (qkv, gate_up): B is block-diagonal over its pieces
            ps.sort(key=lambda p: p[0])
            a = torch.cat([p[1] for p in ps])
            b = torch.zeros(sum(sizes), a.shape[0])
            starts = np.concatenate([[0], np.cumsum(sizes)])
            col = 0
            for piece, pa, pb in ps:
                b[starts[piece]:starts[piece + 1], col:col + pa.shape[0]] = pb
                col += pa.shape[0]
        else:
            (_, a, b), = ps
        deltas[(layer, linear)] = Delta(a.to(device, dtype).contiguous(),
                                        b.to(device, dtype).contiguous())
    return LoraAdapter(name=name, folder=folder, deltas=deltas, rank=int(r), alpha=float(alpha),
                       rslora=rslora, targets=tuple(sorted(targets)), layers=len(layers),
                       heads=heads, ignored=tuple(sorted(ignored)))


def head_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
                head: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """A model's head linear on `x`, as an adapter's `heads` entry changes it: its weights
    instead of the model's, or its LoRA pair added (None: the model's)."""
    if head is None:
        return torch.nn.functional.linear(x, w, b)
    if "weight" in head:
        return torch.nn.functional.linear(x, head["weight"], head["bias"])
    a, b_ = head["lora_a"].to(x.device), head["lora_b"].to(x.device)  # GLiNER's run on the host
    return torch.nn.functional.linear(x, w, b) + (x @ a.T) @ b_.T


def head_weights(w: torch.Tensor, b: torch.Tensor | None,
                 head: dict[str, torch.Tensor] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight and bias of a model's head linear as an adapter's `heads` entry changes
    them (a LoRA pair merged), for a family that splits or folds that linear."""
    if head is None:
        return w, b
    if "weight" in head:
        return head["weight"], head["bias"]
    return w + head["lora_b"].to(w.device) @ head["lora_a"].to(w.device), b


# ------------------------------------------------------------------------- applying per row


class StackCache:
    """Every loaded adapter's deltas stacked per (layer, linear): A (S, R, in), B (S, out, R),
    ranks zero-padded to the largest, in slot order. Batches index it with their adapters'
    positions, so it is rebuilt only when the loaded set changes, not per batch."""

    def __init__(self) -> None:
        self._key: tuple[int, ...] = ()
        self._stacks: dict = {}
        self._lock = threading.Lock()

    def get(self, table: list[LoraAdapter], key: tuple[int, str]):
        table_key = tuple(a.uid for a in table)
        with self._lock:
            if table_key != self._key:
                self._key, self._stacks = table_key, {}
            stacks = self._stacks  # a batch in flight keeps its dict even if the set changes
        if key not in stacks:
            stacks[key] = _stack([a.deltas.get(key) for a in table])
        return stacks[key]

    def forget(self, uid: int) -> None:
        """Drop the stacks if they hold adapter `uid` (it was unloaded)."""
        with self._lock:
            if uid in self._key:
                self._key, self._stacks = (), {}


def _stack(deltas: list[Delta | None]):
    present = [d for d in deltas if d is not None]
    if not present:
        return None
    rank = max(d.a.shape[0] for d in present)
    ref = present[0]
    a = ref.a.new_zeros(len(deltas), rank, ref.a.shape[1])
    b = ref.b.new_zeros(len(deltas), ref.b.shape[0], rank)
    for i, d in enumerate(deltas):
        if d is not None:
            a[i, :d.a.shape[0]] = d.a
            b[i, :, :d.a.shape[0]] = d.b
    return a, b


def chunk_rows(n_rows: int, n_adapters: int) -> int:
    """Chunk height for the segmented matmul: about four chunks per adapter, a multiple of 8,
    so padding wastes at most ~1/4 of the adapter rows' LoRA work."""
    per = -(-n_rows // (4 * n_adapters))
    return max(8, -(-per // 8) * 8)


class BatchLora:
    """The LinearHook of one batch: each adapter's update on its own rows only."""

    def __init__(self, batch: PackedBatch, adapters: list[LoraAdapter], local: np.ndarray,
                 device: torch.device, stacks: StackCache,
                 table: list[LoraAdapter] | None = None) -> None:
        """`adapters`: those present; `local`: per sequence, index into `adapters` or -1;
        `table`: every loaded adapter, in slot order (what `stacks` holds; default `adapters`)."""
        self.batch = batch
        self.adapters = adapters
        self.stacks = stacks
        self.table = table if table is not None else adapters
        self.device = device
        self.local = local
        token_local = np.repeat(local, batch.lengths)
        self._token_local = token_local
        self._rows_cache: dict[int, torch.Tensor] = {}
        # The scheduler orders a batch's rows by adapter, so each adapter's tokens are one
        # contiguous range; on CPU, plain matmuls on those slices beat gathers and padded bmm
        # (on GPU the fixed number of launches of the chunked bmm below matters more).
        self.ranges: list[tuple[int, int]] | None = None
        if device.type == "cpu" and (np.diff(token_local) >= 0).all():
            bounds = np.searchsorted(token_local, np.arange(len(adapters) + 1))
            self.ranges = list(zip(bounds[:-1].tolist(), bounds[1:].tolist()))
            return
        lora_rows = np.flatnonzero(token_local >= 0)
        if len(adapters) == 1:
            self.rows = (None if len(lora_rows) == len(token_local)
                         else torch.from_numpy(lora_rows).to(device))
            return
        idx = token_local[lora_rows]
        order = np.argsort(idx, kind="stable")
        rows = lora_rows[order]
        counts = np.bincount(idx, minlength=len(adapters))
        c = chunk_rows(len(rows), len(adapters))
        n_chunks = -(-counts // c)
        region = c * (np.cumsum(n_chunks) - n_chunks)  # first padded position of each adapter
        first = np.cumsum(counts) - counts  # first sorted row of each adapter
        pos = np.repeat(region - first, counts) + np.arange(len(rows))
        gather = np.zeros(int(n_chunks.sum()) * c, dtype=np.int64)
        gather[pos] = rows
        self.chunk = c
        self.rows = torch.from_numpy(rows).to(device)
        self.pos = torch.from_numpy(pos).to(device)
        self.gather = torch.from_numpy(gather).to(device)
        position = {a.uid: i for i, a in enumerate(self.table)}
        in_table = np.array([position[a.uid] for a in adapters], dtype=np.int64)
        self.chunk_adapter = torch.from_numpy(np.repeat(in_table, n_chunks)).to(device)

    def __call__(self, layer: int, name: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        key = (layer, name)
        if self.ranges is not None:
            for adapter, (start, end) in zip(self.adapters, self.ranges):
                d = adapter.deltas.get(key)
                if d is not None and end > start:
                    y[start:end].addmm_(x[start:end] @ d.a.T, d.b.T)
            return y
        if len(self.adapters) == 1:
            d = self.adapters[0].deltas.get(key)
            if d is None:
                return y
            if self.rows is None:
                return y.addmm_(x @ d.a.T, d.b.T)
            return y.index_add_(0, self.rows, (x.index_select(0, self.rows) @ d.a.T) @ d.b.T)
        stacked = self.stacks.get(self.table, key)
        if stacked is None:
            return y
        a, b = stacked
        n = self.chunk_adapter.shape[0]
        xg = x.index_select(0, self.gather).view(n, self.chunk, x.shape[1])
        u = torch.bmm(xg, a.index_select(0, self.chunk_adapter).transpose(1, 2))
        d = torch.bmm(u, b.index_select(0, self.chunk_adapter).transpose(1, 2))
        return y.index_add_(0, self.rows, d.view(-1, y.shape[1]).index_select(0, self.pos))

    def shared(self, layer: int, name: str, x: torch.Tensor, y: torch.Tensor
               ) -> torch.Tensor | None:
        """A linear of an input every sequence shares (DeBERTa's relative position embeddings
        through its key / query projections), per sequence: (sequences, rows, out), each with
        its adapter's update; None when no adapter of the batch adapts this linear."""
        key = (layer, name)
        deltas = [(i, a.deltas[key]) for i, a in enumerate(self.adapters) if key in a.deltas]
        if not deltas:
            return None
        out = y.expand(len(self.local), *y.shape).clone()
        for i, d in deltas:
            out[torch.from_numpy(self.local == i).to(self.device)] += (x @ d.a.T) @ d.b.T
        return out

    def head_overrides(self, head: str) -> list[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        """(token rows, the adapter's `heads` entry: replacement weights or a LoRA pair) for
        each adapter of the batch carrying `head`."""
        out = []
        for i, adapter in enumerate(self.adapters):
            weights = adapter.heads.get(head)
            if weights is None:
                continue
            if i not in self._rows_cache:
                self._rows_cache[i] = torch.from_numpy(
                    np.flatnonzero(self._token_local == i)).to(self.device)
            out.append((self._rows_cache[i], weights))
        return out


def batch_lora(batch: PackedBatch, by_slot: dict[int, LoraAdapter], device: torch.device,
               stacks: StackCache) -> BatchLora | None:
    """The hook for `batch`, or None when no row uses a (still known) adapter."""
    slots = batch.adapter_slots
    used = np.unique(slots[slots >= 0])
    adapters = [by_slot[int(s)] for s in used if int(s) in by_slot]
    if not adapters:
        return None
    uids = np.array([a.uid for a in adapters], dtype=np.int64)  # ascending, like `used`
    where = np.minimum(np.searchsorted(uids, slots), len(uids) - 1)
    local = np.where(uids[where] == slots, where, -1)
    table = [by_slot[s] for s in sorted(by_slot)]
    return BatchLora(batch, adapters, local, device, stacks, table)
