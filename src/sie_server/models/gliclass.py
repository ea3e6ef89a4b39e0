"""GLiClass uni-encoder zero-shot classification (/v1/extract `classifications`).

A checkpoint as the hub has it (knowledgator/gliclass-*): `config.json` (a `GLiClass` config
with the backbone's `encoder_config`), `model.safetensors` (`model.encoder_model.*` for the
backbone, `model.text_projector.*`, `model.classes_projector.*`, `model.scorer.*`, maybe
`model.lstm.lstm.*` and `model.logit_scale`) and the backbone tokenizer with `<<LABEL>>` and
`<<SEP>>` added. What `gliclass` (its `ZeroShotClassificationPipeline`) computes, per text:

1. One row: `<<LABEL>>label<<LABEL>>label...<<SEP>>`, then the instruction (the pipeline's
   `prompt`), and the text before all of it, or after when the config says `prompt_first`;
   tokenized with the tokenizer's special tokens and cut at 1,024 tokens (the pipeline's
   `max_length`, SIE's window for every GLiClass model).
2. The encoder (DeBERTa-v2/v3, ModernBERT, BERT or XLM-R, `runtime/`) runs on the row, an
   LSTM after it for the text vector when `use_lstm` (the label vectors read the encoder's).
3. The text vector is the row's first token (`pooling_strategy: first`); a label's is its
   `<<LABEL>>` state (the token after it when `embed_class_token` is false, the mean of its
   tokens with `class_token_pooling: average`); each through its projector (Linear, the
   config's activation, Linear), L2-normalised with `normalize_features`.
4. The scorer gives one logit per label (`simple`: the dot product; `weighted-dot`; `mlp`),
   times `logit_scale` with `normalize_features`.
5. As SIE's GLiClass adapter returns them: every label with its probability, best first; a
   softmax over the labels (`classification_type` single-label, the default) or each label's
   sigmoid (multi-label; a lone label always gets its sigmoid); labels under
   `options.threshold` (default 0) dropped.

A text too long for the window (SIE's `options.overflow_policy`, SIE's GLiClass rules): with
`default`, a model reading the text first fails an item whose text pushes a label marker out
of the window, one reading the labels first cuts the text (as gliclass does) but fails every
item when the labels and instruction leave under 8 tokens for it; `truncate_text` cuts the
text's tokens to the room left (decoded to text, read again beside the labels); `error` fails
each item whose text does not fit whole. A failed item gets `classifications: []` and
`error: {code: INPUT_TOO_LONG, message}`; the other items are answered.

LoRA (`options.lora_id`): adapters made with peft on the `GLiClassModel` adapt the backbone's
linears (under `model.encoder_model.`) per row of the shared batches, and gliclass's own
linears (the text and class projectors, the scorer's MLPs; not the LSTM) in the request's
scoring.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import nn

from ..errors import InputTooLong, InvalidRequest
from ..runtime.batch import PackedBatch
from ..runtime.deberta import DebertaConfig, DebertaEncoder
from ..runtime.device import Placement
from ..runtime.encoder import _ACTIVATIONS, Encoder, EncoderConfig
from ..runtime.lora import ModelLora, head_linear
from ..runtime.modernbert import ModernBertConfig, ModernBertEncoder
from ..runtime.tokenizer import TextTokenizer
from ..runtime.weights import load_state_dict, reading
from .base import BatchOutputs, EncoderModel, ExtractPlan, ModelInfo, ModelSpec, family

LABEL_TOKEN, SEP_TOKEN = "<<LABEL>>", "<<SEP>>"  # the pipeline's markers
WINDOW = 1024  # the pipeline's max_length (SIE's max_sequence_length for GLiClass)
MAX_INSTRUCTION_CHARS = 2048  # SIE's cap on the instruction read with every text
MIN_TEXT_TOKENS = 8  # room the labels must leave a labels-first model's text (SIE)
_PREFIX = "model."
_ENCODER = "model.encoder_model."
# What this module reads: config key -> (gliclass's default, the values read); other values
# are refused at load
_SUPPORTED = {"architecture_type": ("uni-encoder", ("uni-encoder",)),
              "pooling_strategy": ("first", ("first",)),
              "scorer_type": ("simple", ("simple", "weighted-dot", "mlp")),
              "class_token_pooling": ("first", ("first", "average")),
              "squeeze_layers": (False, (False,)), "encoder_layer_id": (-1, (-1,)),
              "extract_text_features": (False, (False,)),
              "use_segment_embeddings": (False, (False,))}


Heads = dict[str, dict[str, torch.Tensor]]  # an adapter's LoRA pairs of gliclass's linears


class _Linears:
    """Some of gliclass's linears by module name, each run with the adapter's LoRA pair for it
    when the request's `heads` hold one."""

    def __init__(self, w: dict[str, torch.Tensor], names: list[str]) -> None:
        self.linears = {n: (w[f"{n}.weight"], w[f"{n}.bias"]) for n in names}

    def run(self, name: str, x: torch.Tensor, heads: Heads) -> torch.Tensor:
        return head_linear(x, *self.linears[name], heads.get(name))

    def lora_heads(self) -> dict[str, tuple[int, int]]:
        """Their (fan-in, fan-out) by module name (runtime/lora.py's layout heads)."""
        return {n: (w.shape[1], w.shape[0]) for n, (w, _) in self.linears.items()}


class _Projector(_Linears):
    """gliclass's FeaturesProjector: linear_1, the config's activation, linear_2."""

    def __init__(self, w: dict[str, torch.Tensor], prefix: str, act: str) -> None:
        self.l1, self.l2 = f"{prefix}.linear_1", f"{prefix}.linear_2"
        super().__init__(w, [self.l1, self.l2])
        self.act = _ACTIVATIONS[act]

    def __call__(self, x: torch.Tensor, heads: Heads) -> torch.Tensor:
        return self.run(self.l2, self.act(self.run(self.l1, x, heads)), heads)


class _Scorer(_Linears):
    """One logit per label from the text vector (h,) and the label vectors (C, h)."""

    def __init__(self, kind: str, w: dict[str, torch.Tensor]) -> None:
        self.kind = kind
        s = "model.scorer"
        self.mlp: list[str] = []
        if kind == "weighted-dot":  # Linear, Dropout, ReLU, Linear
            self.mlp = [f"{s}.out_mlp.0", f"{s}.out_mlp.3"]
            super().__init__(w, [f"{s}.proj_text", f"{s}.proj_label", *self.mlp])
        elif kind == "mlp":  # Linear, ReLU, Linear, ReLU, Linear
            self.mlp = [f"{s}.mlp.{i}" for i in (0, 2, 4)]
            super().__init__(w, self.mlp)
        else:
            super().__init__(w, [])

    def __call__(self, text: torch.Tensor, labels: torch.Tensor, heads: Heads) -> torch.Tensor:
        if self.kind == "simple":
            return labels @ text
        c, h = labels.shape
        if self.kind == "weighted-dot":
            t = self.run("model.scorer.proj_text", text, heads).view(2, h)
            lab = self.run("model.scorer.proj_label", labels, heads).view(c, 2, h)
            x = torch.cat([t[0].expand(c, h), lab[:, 0], t[1] * lab[:, 1]], -1)
        else:
            x = torch.cat([text.expand(c, h), labels], -1)
        for i, name in enumerate(self.mlp):
            x = self.run(name, x, heads)
            if i + 1 < len(self.mlp):
                x = F.relu(x)
        return x[:, 0]


@family("gliclass")
class GLiClass(EncoderModel):
    output_types = ()  # does not encode
    extracts = "classifications"

    def __init__(self, spec: ModelSpec, folder: Path, placement: Placement) -> None:
        self.spec, self.folder, self.placement = spec, folder, placement
        self.config = cfg = self.read_config(folder)
        for key, (default, allowed) in _SUPPORTED.items():
            if cfg.get(key, default) not in allowed:
                raise ValueError(f"{folder}: GLiClass {key} {cfg.get(key)!r} is not supported "
                                 f"(supported: {', '.join(map(str, allowed))})")
        weights = load_state_dict(folder)
        enc_cfg = dict(cfg["encoder_config"])
        table = next((k for k in (f"{_ENCODER}embeddings.word_embeddings.weight",
                                  f"{_ENCODER}embeddings.tok_embeddings.weight") if k in weights),
                     None)
        if table is None:
            raise ValueError(f"{folder}: no {_ENCODER}embeddings in the weights: not a GLiClass "
                             "uni-encoder checkpoint")
        enc_cfg["vocab_size"] = weights[table].shape[0]
        kind = enc_cfg.get("model_type", "deberta-v2")
        if kind in ("deberta-v2", "deberta"):
            encoder, rest = DebertaEncoder.from_weights(DebertaConfig.from_dict(enc_cfg), weights,
                                                        _ENCODER)
        elif kind in ("bert", "roberta", "xlm-roberta", "modernbert"):
            own = {k[len(_ENCODER):]: v for k, v in weights.items() if k.startswith(_ENCODER)}
            rest = {k: v for k, v in weights.items() if not k.startswith(_ENCODER)}
            if kind == "modernbert":
                encoder, _ = ModernBertEncoder.from_weights(ModernBertConfig.from_dict(enc_cfg),
                                                            own, str(folder))
            else:
                encoder, _ = Encoder.from_weights(EncoderConfig.from_dict(enc_cfg), own)
        else:
            raise ValueError(f"{folder}: GLiClass on a {kind} encoder is not supported "
                             "(DeBERTa-v2/v3, BERT, RoBERTa, XLM-R, ModernBERT)")
        self.encoder = encoder.to(placement.device, placement.dtype)
        self.extra_weights: dict[str, torch.Tensor] = {}
        head = {k: v.float() for k, v in rest.items() if k.startswith(_PREFIX)}
        act = cfg.get("projector_hidden_act", "gelu")
        self.text_projector = _Projector(head, "model.text_projector", act)
        self.classes_projector = _Projector(head, "model.classes_projector", act)
        self.scorer = _Scorer(cfg.get("scorer_type", "simple"), head)
        self.lstm = None
        if cfg.get("use_lstm"):
            hidden = enc_cfg["hidden_size"]
            self.lstm = nn.LSTM(hidden, hidden // 2, bidirectional=True, batch_first=True)
            self.lstm.load_state_dict({k[len("model.lstm.lstm."):]: v for k, v in head.items()
                                       if k.startswith("model.lstm.lstm.")})
            self.lstm.eval()
        self.normalize = bool(cfg.get("normalize_features"))
        self.logit_scale = float(head["model.logit_scale"]) if "model.logit_scale" in head else 1.0
        self.prompt_first = bool(cfg.get("prompt_first"))
        self.embed_class_token = cfg.get("embed_class_token", True)
        self.average = cfg.get("class_token_pooling", "first") == "average"
        self.class_token = cfg["class_token_index"]
        limit = self.encoder.cfg.max_tokens if kind not in ("deberta-v2", "deberta") else WINDOW
        self.max_tokens = min(spec.max_input_tokens or WINDOW, WINDOW, limit)
        path = folder / "tokenizer.json"
        if not path.exists():
            raise FileNotFoundError(f"{folder} has no tokenizer.json: put the backbone's tokenizer "
                                    f"(with {LABEL_TOKEN} and {SEP_TOKEN} added) beside config.json")
        self.tokenizer = TextTokenizer(path, self.max_tokens)  # /v1/tokenize and friends
        self.rows = Tokenizer.from_file(str(path))
        self.rows.no_padding()
        self.whole = Tokenizer.from_str(self.rows.to_str())
        self.whole.no_truncation()
        self.rows.enable_truncation(self.max_tokens)
        config = folder / "tokenizer_config.json"
        self.clean_up_spaces = bool(config.exists() and json.loads(config.read_text()).get(
            "clean_up_tokenization_spaces", False))

    @staticmethod
    def read_config(folder: Path) -> dict:
        path = folder / "config.json"
        with reading(path):
            return json.loads(path.read_text())

    @classmethod
    def describe(cls, spec: ModelSpec, folder: Path) -> ModelInfo:
        return ModelInfo(spec.name, spec.family, (), {}, spec.max_input_tokens or WINDOW)

    def dims(self) -> dict[str, int]:
        return {}

    @property
    def lora_config(self) -> ModelLora:
        """LoRA on the backbone's linears (under gliclass's module path) and on gliclass's own:
        the text and class projectors and the scorer's linears (the LSTM is no linear)."""
        heads = {k: v for part in (self.text_projector, self.classes_projector, self.scorer)
                 for k, v in part.lora_heads().items()}
        return ModelLora(self.encoder.cfg, heads, _ENCODER)

    def prepare_extract(self, texts: list[str], labels: list[str], options: Any) -> ExtractPlan:
        """One row per text that the window can read as SIE reads it (`_fit`); an item that
        cannot be read gets SIE's INPUT_TOO_LONG item error, is not computed and counts no
        tokens."""
        if not labels:
            raise InvalidRequest("params.labels: Zero-shot classification requires labels "
                                 "parameter.")
        labels = [label.strip() for label in labels]
        if any(not label for label in labels):
            raise InvalidRequest("params.labels: GLiClass labels must be non-empty strings")
        if len(set(labels)) != len(labels):
            raise InvalidRequest("params.labels: GLiClass labels must be unique")
        kind = options.classification_type or "single-label"  # SIE's default for every GLiClass
        threshold = float(options.threshold or 0.0)
        policy = options.overflow_policy or "default"
        instruction = options.instruction if (options.instruction or "").strip() else ""
        if len(instruction) > MAX_INSTRUCTION_CHARS:
            raise InvalidRequest(f"instruction: GLiClass instruction must be at most "
                                 f"{MAX_INSTRUCTION_CHARS} characters")
        for i, text in enumerate(texts):
            if not text.strip():
                raise InvalidRequest(f"items[{i}].text: zero-shot classification requires "
                                     "non-blank text")
        label_prompt = "".join(LABEL_TOKEN + label for label in labels) + SEP_TOKEN
        texts, errors = self._fit(texts, label_prompt, instruction, len(labels), policy)
        prompt = label_prompt + instruction
        kept = [i for i, e in enumerate(errors) if e is None]
        encodings = self.rows.encode_batch([prompt + texts[i] if self.prompt_first
                                            else texts[i] + prompt for i in kept])
        if not self.prompt_first:  # every label marker must stay in the window (after the
            # text's own markers, which come first)
            for i, enc in zip(kept, encodings):
                if enc.ids.count(self.class_token) < texts[i].count(LABEL_TOKEN) + len(labels):
                    errors[i] = ("the text pushes the labels out of the GLiClass model's "
                                 f"{self.max_tokens}-token window; shorten it, send fewer "
                                 "labels, or send options.overflow_policy 'truncate_text'")
            encodings = [e for i, e in zip(kept, encodings) if errors[i] is None]
            kept = [i for i in kept if errors[i] is None]
        ids = [np.asarray(e.ids, dtype=np.int64) for e in encodings]
        tokens = self._billed([texts[i] for i in kept], label_prompt, instruction)
        heads = options.adapter.heads if options.adapter is not None else {}

        def finish(results: list) -> tuple[list[dict], int]:
            out: list[dict] = [{"classifications": [],
                                "error": {"code": "INPUT_TOO_LONG", "message": e}}
                               if e is not None else {} for e in errors]
            for i, row, result in zip(kept, ids, results, strict=True):
                logits = self._logits(torch.from_numpy(result.multivector).float(), row,
                                      len(labels), heads)
                if kind == "multi-label" or len(labels) == 1:
                    probs = torch.sigmoid(logits)
                else:
                    probs = torch.softmax(logits, -1)
                found = [{"label": label, "score": p} for label, p in zip(labels, probs.tolist())
                         if p >= threshold or threshold <= 0.0]
                out[i] = {"classifications": sorted(found, key=lambda c: -c["score"])}
            return out, tokens

        return ExtractPlan(ids, frozenset({"multivector"}), finish)

    def _billed(self, texts: list[str], label_prompt: str, instruction: str) -> int:
        """Input tokens as SIE bills a GLiClass row: the text's tokens that the window reads,
        with the special tokens, plus the instruction's, at most the window less the label
        prompt (unless the text alone counts more); label names and markers are not billed."""
        special = self.whole.num_special_tokens_to_add(False)
        alone = self.whole.encode_batch([label_prompt, instruction, *texts],
                                        add_special_tokens=False)
        labels, context = len(alone[0].ids), len(alone[1].ids) if instruction else 0
        room = self.max_tokens - special - (labels + context if self.prompt_first else 0)
        cap = self.max_tokens - labels
        docs = [min(len(e.ids), room) + special for e in alone[2:]]
        return sum(max(d, min(d + context, cap)) for d in docs)

    def _fit(self, texts: list[str], label_prompt: str, instruction: str, count: int,
             policy: str) -> tuple[list[str], list[str | None]]:
        """The texts as the window will read them (cut under `truncate_text`) and, per text,
        why it cannot be read (None: not known yet; a text-first row is checked once encoded),
        by SIE's rules: the label prompt, the instruction and the text tokenized each alone,
        without special tokens, against the window less the special tokens. Labels that do
        not fit refuse the request."""
        special = self.whole.num_special_tokens_to_add(False)
        window = self.max_tokens - special
        alone = lambda t: self.whole.encode(t, add_special_tokens=False).ids  # noqa: E731
        label_ids = alone(label_prompt)
        errors: list[str | None] = [None] * len(texts)
        if policy != "default":  # as SIE: this refusal first
            overhead = len(alone(label_prompt + instruction)) + special
            budget = self.max_tokens - overhead
            if budget <= 0:
                raise InputTooLong(f"params.labels: the labels and instruction take {overhead} "
                                   f"tokens with the special tokens; the GLiClass model reads "
                                   f"{self.max_tokens}: send fewer or shorter labels")
        marks = np.flatnonzero(np.asarray(label_ids) == self.class_token)
        if len(marks) >= count and marks[-1] >= window:
            raise InputTooLong(f"params.labels: the labels take {len(label_ids)} tokens, more "
                               f"than the GLiClass model's {window}-token window holds; send "
                               "fewer or shorter labels")
        prompt_tokens = len(alone(instruction)) if instruction else 0
        if instruction and len(label_ids) + prompt_tokens >= window:
            raise InvalidRequest(f"instruction: the instruction and the labels leave no room for "
                                 f"the text in the GLiClass model's {window}-token window; "
                                 "shorten the instruction or send fewer labels")
        if policy != "default":
            texts = list(texts)
            for i, text_ids in enumerate(self.whole.encode_batch(texts, add_special_tokens=False)):
                if len(text_ids.ids) <= budget:
                    continue
                if policy == "error":
                    errors[i] = (f"the text takes {len(text_ids.ids)} tokens; beside the labels "
                                 f"the GLiClass model reads {budget} of it, and "
                                 "options.overflow_policy is 'error': shorten the text or send "
                                 "options.overflow_policy 'truncate_text'")
                else:
                    texts[i] = self._decode(text_ids.ids[:budget])
        if self.prompt_first and policy == "default" and \
                window - len(label_ids) - prompt_tokens < MIN_TEXT_TOKENS:
            errors = [e or ("the labels leave no room for the text in the GLiClass model's "
                            f"{self.max_tokens}-token window; send fewer or shorter labels")
                      for e in errors]
        return texts, errors

    def _decode(self, ids: list[int]) -> str:
        """Token ids back to text, as transformers' tokenizer decodes them for SIE's
        `truncate_text` (special tokens skipped; its clean-up of spaces where the tokenizer's
        config asks for it)."""
        text = self.whole.decode(ids, skip_special_tokens=True)
        if not self.clean_up_spaces:
            return text
        for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
                     (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"),
                     (" 're", "'re")):
            text = text.replace(a, b)
        return text

    def attention(self, batch: PackedBatch):
        if isinstance(self.encoder, ModernBertEncoder):  # global and sliding-window layers
            return self.encoder.attention(batch.cu_seqlens, self.placement.device,
                                          self.placement.dtype)
        return super().attention(batch)

    def heads(self, batch: PackedBatch, hidden: torch.Tensor, ids: torch.Tensor) -> BatchOutputs:
        """Every token's hidden state, for the scoring after the batch (`_logits`)."""
        return BatchOutputs(multivector=(hidden, torch.from_numpy(batch.lengths), 0))

    @torch.inference_mode()
    def _logits(self, hidden: torch.Tensor, ids: np.ndarray, count: int,
                heads: Heads) -> torch.Tensor:
        # the text vector reads the LSTM's output, the label vectors the encoder's
        first = self.lstm(hidden[None])[0][0, 0] if self.lstm is not None else hidden[0]
        text = self.text_projector(first, heads)
        marks = np.flatnonzero(ids == self.class_token)[:count]
        if self.average:  # a label's tokens: from its marker to the next (the last: to the end)
            owner = np.cumsum(ids == self.class_token) - 1
            keep = np.ones(len(ids), bool) if self.embed_class_token else ids != self.class_token
            classes = torch.stack([hidden[torch.from_numpy((owner == k) & keep)].mean(0)
                                   for k in range(count)])
        else:
            classes = hidden[torch.from_numpy(marks + (0 if self.embed_class_token else 1))]
        classes = self.classes_projector(classes, heads)
        if self.normalize:
            text = text / (text.norm() + 1e-8)
            classes = classes / (classes.norm(dim=-1, keepdim=True) + 1e-8)
        logits = self.scorer(text, classes, heads)
        return logits * self.logit_scale if self.normalize else logits
