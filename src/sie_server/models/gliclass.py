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

Text-first models need the labels inside the window: a text that pushes a label marker out is
refused (SIE: INPUT_TOO_LONG); prompt-first models cut the text, and refuse labels that leave
it under 8 tokens.
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
from ..runtime.modernbert import ModernBertConfig, ModernBertEncoder
from ..runtime.tokenizer import TextTokenizer
from ..runtime.weights import load_state_dict, reading
from .base import BatchOutputs, EncoderModel, ExtractPlan, ModelInfo, ModelSpec, family

LABEL_TOKEN, SEP_TOKEN = "<<LABEL>>", "<<SEP>>"  # the pipeline's markers
WINDOW = 1024  # the pipeline's max_length (SIE's max_sequence_length for GLiClass)
MAX_INSTRUCTION_CHARS = 2048  # SIE's cap on the instruction read with every text
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


class _Projector:
    """gliclass's FeaturesProjector: linear_1, the config's activation, linear_2."""

    def __init__(self, w: dict[str, torch.Tensor], prefix: str, act: str) -> None:
        self.l1 = (w[f"{prefix}.linear_1.weight"], w[f"{prefix}.linear_1.bias"])
        self.l2 = (w[f"{prefix}.linear_2.weight"], w[f"{prefix}.linear_2.bias"])
        self.act = _ACTIVATIONS[act]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.act(F.linear(x, *self.l1)), *self.l2)


def _linears(w: dict[str, torch.Tensor], prefix: str, names: tuple[int, ...]) -> list:
    return [(w[f"{prefix}.{i}.weight"], w[f"{prefix}.{i}.bias"]) for i in names]


class _Scorer:
    """One logit per label from the text vector (h,) and the label vectors (C, h)."""

    def __init__(self, kind: str, w: dict[str, torch.Tensor]) -> None:
        self.kind = kind
        s = "model.scorer"
        if kind == "weighted-dot":  # Linear, Dropout, ReLU, Linear
            self.text = (w[f"{s}.proj_text.weight"], w[f"{s}.proj_text.bias"])
            self.label = (w[f"{s}.proj_label.weight"], w[f"{s}.proj_label.bias"])
            self.mlp = _linears(w, f"{s}.out_mlp", (0, 3))
        elif kind == "mlp":  # Linear, ReLU, Linear, ReLU, Linear
            self.mlp = _linears(w, f"{s}.mlp", (0, 2, 4))

    def __call__(self, text: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.kind == "simple":
            return labels @ text
        c, h = labels.shape
        if self.kind == "weighted-dot":
            t = F.linear(text, *self.text).view(2, h)
            lab = F.linear(labels, *self.label).view(c, 2, h)
            x = torch.cat([t[0].expand(c, h), lab[:, 0], t[1] * lab[:, 1]], -1)
        else:
            x = torch.cat([text.expand(c, h), labels], -1)
        for i, (weight, bias) in enumerate(self.mlp):
            x = F.linear(x, weight, bias)
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
    def lora_config(self) -> Any:
        """No LoRA here (its scorer and poolings are not adapted): a request naming an adapter
        gets this 400 when the model's adapter manager would be made."""
        raise InvalidRequest("params.options.lora_id: LoRA adapters are not served for GLiClass "
                             "models")

    def prepare_extract(self, texts: list[str], labels: list[str], options: Any) -> ExtractPlan:
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
        instruction = options.instruction if (options.instruction or "").strip() else ""
        if len(instruction) > MAX_INSTRUCTION_CHARS:
            raise InvalidRequest(f"instruction: GLiClass instruction must be at most "
                                 f"{MAX_INSTRUCTION_CHARS} characters")
        prompt = "".join(LABEL_TOKEN + label for label in labels) + SEP_TOKEN + instruction
        for i, text in enumerate(texts):
            if not text.strip():
                raise InvalidRequest(f"items[{i}].text: zero-shot classification requires "
                                     "non-blank text")
        rows = [prompt + t if self.prompt_first else t + prompt for t in texts]
        encodings = self.rows.encode_batch(rows)
        for i, enc in enumerate(encodings):
            marks = sum(1 for t in enc.ids if t == self.class_token)
            if marks < len(labels):
                raise InputTooLong(f"items[{i}].text: the text pushes the labels out of the "
                                   f"GLiClass model's {self.max_tokens}-token window; shorten "
                                   "it or send fewer labels")
        if self.prompt_first:  # SIE refuses a prompt that leaves the text under 8 tokens
            room = self.max_tokens - len(self.whole.encode(prompt).ids)
            if room < 8:
                raise InvalidRequest("params.labels: the labels leave no room for the text in "
                                     f"the GLiClass model's {self.max_tokens}-token window; "
                                     "send fewer or shorter labels")
        ids = [np.asarray(e.ids, dtype=np.int64) for e in encodings]
        # as SIE bills: the text and instruction tokens, not the label names
        names = len(self.whole.encode(prompt[:len(prompt) - len(instruction)]).ids)
        tokens = sum(max(0, len(r) - names) for r in ids)

        def finish(results: list) -> tuple[list[dict], int]:
            out = []
            for row, result in zip(ids, results):
                logits = self._logits(torch.from_numpy(result.multivector).float(), row,
                                      len(labels))
                if kind == "multi-label" or len(labels) == 1:
                    probs = torch.sigmoid(logits)
                else:
                    probs = torch.softmax(logits, -1)
                found = [{"label": label, "score": p} for label, p in zip(labels, probs.tolist())
                         if p >= threshold or threshold <= 0.0]
                out.append({"classifications": sorted(found, key=lambda c: -c["score"])})
            return out, tokens

        return ExtractPlan(ids, frozenset({"multivector"}), finish)

    def attention(self, batch: PackedBatch):
        if isinstance(self.encoder, ModernBertEncoder):  # global and sliding-window layers
            return self.encoder.attention(batch.cu_seqlens, self.placement.device,
                                          self.placement.dtype)
        return super().attention(batch)

    def heads(self, batch: PackedBatch, hidden: torch.Tensor, ids: torch.Tensor) -> BatchOutputs:
        """Every token's hidden state, for the scoring after the batch (`_logits`)."""
        return BatchOutputs(multivector=(hidden, torch.from_numpy(batch.lengths), 0))

    @torch.inference_mode()
    def _logits(self, hidden: torch.Tensor, ids: np.ndarray, count: int) -> torch.Tensor:
        # the text vector reads the LSTM's output, the label vectors the encoder's
        first = self.lstm(hidden[None])[0][0, 0] if self.lstm is not None else hidden[0]
        text = self.text_projector(first)
        marks = np.flatnonzero(ids == self.class_token)[:count]
        if self.average:  # a label's tokens: from its marker to the next (the last: to the end)
            owner = np.cumsum(ids == self.class_token) - 1
            keep = np.ones(len(ids), bool) if self.embed_class_token else ids != self.class_token
            classes = torch.stack([hidden[torch.from_numpy((owner == k) & keep)].mean(0)
                                   for k in range(count)])
        else:
            classes = hidden[torch.from_numpy(marks + (0 if self.embed_class_token else 1))]
        classes = self.classes_projector(classes)
        if self.normalize:
            text = text / (text.norm() + 1e-8)
            classes = classes / (classes.norm(dim=-1, keepdim=True) + 1e-8)
        logits = self.scorer(text, classes)
        return logits * self.logit_scale if self.normalize else logits
