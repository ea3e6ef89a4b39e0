"""Zero-shot classification with NLI cross-encoders (/v1/extract `classifications`).

As transformers' zero-shot-classification pipeline computes it: every (text, label) pair is
one premise/hypothesis row, the hypothesis the template with the label in it ("This example
is {}." by default; SIE's catalog sets "This text is about {}."), the text cut when the pair
is too long ("only_first"). With one label per text (`multi_label` false) the labels' entailment
logits are softmaxed over the labels; with `multi_label` each label's [contradiction,
entailment] logits are softmaxed on their own. Labels come best first.

Checkpoints: `*ForSequenceClassification` with an entailment label in `id2label`: DeBERTa-v2/v3
(ContextPooler: dense + `pooler_hidden_act` on the first token, then `classifier`), BERT
(pooler dense + tanh, `classifier`) and XLM-R/RoBERTa (`classifier.dense` + tanh +
`classifier.out_proj`). The pair rows go through the engine's token-budget batches.

LoRA (`options.lora_id`): on the stack's linears as for encoders, and on the pooler and
classifier linears, which run per sequence with its adapter's pair (`heads`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from ..errors import InvalidRequest
from ..runtime.batch import PackedBatch
from ..runtime.deberta import DebertaEncoder
from ..runtime.device import Placement
from ..runtime.encoder import _ACTIVATIONS, Encoder
from ..runtime.lora import ModelLora, head_linear
from .base import BatchOutputs, EncoderModel, ExtractPlan, ModelInfo, ModelSpec, family

DEFAULT_TEMPLATE = "This example is {}."  # transformers' pipeline default


@family("nli-zero-shot")
class NLIZeroShot(EncoderModel):
    output_types = ()  # does not encode
    extracts = "classifications"

    def __init__(self, spec: ModelSpec, folder: Path, placement: Placement) -> None:
        config = json.loads((folder / "config.json").read_text())
        deberta = config.get("model_type") in ("deberta-v2", "deberta")
        self.stack = DebertaEncoder if deberta else Encoder
        super().__init__(spec, folder, placement)
        labels = {int(k): v.lower() for k, v in (config.get("id2label") or {}).items()}
        self.entailment = next((i for i, v in labels.items() if v.startswith("entail")), None)
        if self.entailment is None:
            raise ValueError(f"{folder}: no entailment label in config.json id2label "
                             "({labels}); zero-shot classification needs an NLI model")
        self.contradiction = -1 if self.entailment == 0 else 0
        w, dev = self.extra_weights, placement.device
        take = lambda name: w[name].to(dev, torch.float32)  # noqa: E731
        if "classifier.out_proj.weight" in w:  # RoBERTa-style
            self.pre_name, self.out_name, act = "classifier.dense", "classifier.out_proj", torch.tanh
        else:
            self.pre_name = next(p for p in ("pooler.dense", "bert.pooler.dense",
                                             "deberta.pooler.dense") if f"{p}.weight" in w)
            self.out_name = "classifier"
            act = _ACTIVATIONS[config.get("pooler_hidden_act", "gelu")] if deberta else torch.tanh
        self.pre = (take(f"{self.pre_name}.weight"), take(f"{self.pre_name}.bias"), act)
        self.out = (take(f"{self.out_name}.weight"), take(f"{self.out_name}.bias"))
        # where the stack's modules sit in the checkpoint (LoRA module names)
        self.stack_prefix = "deberta." if deberta else \
            "bert." if config.get("model_type") == "bert" else "roberta."
        self.template = spec.hypothesis_template or DEFAULT_TEMPLATE
        self.use_token_types = getattr(self.encoder.cfg, "type_vocab_size", 0) > 0
        self.pairs = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.pairs.no_padding()
        self.pairs.enable_truncation(self.max_tokens, strategy="only_first")

    @property
    def lora_config(self) -> ModelLora:
        """LoRA on the stack's linears and on the pooler and classifier linears."""
        heads = {name: (w.shape[1], w.shape[0]) for name, w in
                 ((self.pre_name, self.pre[0]), (self.out_name, self.out[0]))}
        return ModelLora(self.encoder.cfg, heads, self.stack_prefix)

    @classmethod
    def describe(cls, spec: ModelSpec, folder: Path) -> ModelInfo:
        return ModelInfo(spec.name, spec.family, (), {}, spec.max_input_tokens)

    def dims(self) -> dict[str, int]:
        return {}

    def prepare_extract(self, texts: list[str], labels: list[str], options: Any) -> ExtractPlan:
        if not labels:
            raise InvalidRequest("params.labels: Zero-shot classification requires labels "
                                 "parameter.")
        template = options.hypothesis_template or self.template
        multi = bool(options.multi_label)
        hypotheses = [template.format(label) for label in labels]
        for i, text in enumerate(texts):
            if not text.strip():
                raise InvalidRequest(f"items[{i}].text: zero-shot classification requires "
                                     "non-blank text")
        encodings = self.pairs.encode_batch([(t, h) for t in texts for h in hypotheses])
        rows = [np.asarray(e.ids, dtype=np.int64) for e in encodings]
        types = [np.asarray(e.type_ids, dtype=np.int64) for e in encodings] \
            if self.use_token_types else None
        tokens = sum(len(r) for r in rows)

        def finish(results: list) -> tuple[list[dict], int]:
            logits = torch.from_numpy(np.stack([r.dense for r in results])).view(
                len(texts), len(labels), -1)
            if multi:
                pair = logits[..., [self.contradiction, self.entailment]]
                scores = pair.softmax(-1)[..., 1]
            else:
                scores = logits[..., self.entailment].softmax(-1)
            out = []
            for row in scores.tolist():
                order = sorted(range(len(labels)), key=lambda j: -row[j])
                out.append({"classifications": [{"label": labels[j], "score": row[j]}
                                                for j in order]})
            return out, tokens

        return ExtractPlan(rows, frozenset({"dense"}), finish, types)

    def heads(self, batch: PackedBatch, hidden: torch.Tensor, ids: torch.Tensor) -> BatchOutputs:
        first = self.first_tokens(batch)
        w, b, act = self.pre
        x = act(self._head(batch, first, hidden[first].float(), self.pre_name, w, b))
        return BatchOutputs(dense=self._head(batch, first, x, self.out_name, *self.out))

    def _head(self, batch: PackedBatch, first: torch.Tensor, x: torch.Tensor, name: str,
              w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """A head linear on the sequences' first-token vectors `x`, the sequences whose adapter
        changes it (LoRA on the pooler or classifier) computed with that change."""
        y = F.linear(x, w, b)
        for rows, head in self.adapter_heads(batch, name):
            seqs = torch.isin(first, rows)
            y[seqs] = head_linear(x[seqs], w, b, head)
        return y
