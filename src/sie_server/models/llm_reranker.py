"""LLM rerankers (Qwen3-Reranker): a causal decoder reads one prompt per (query, item) pair and
the score is the probability of "yes" against "no" as the next token.

As the model card computes it, on `*ForCausalLM` logits at the last position:
`score = softmax([logit("no"), logit("yes")])[1]`, which is `sigmoid(logit("yes") -
logit("no"))`: the heads return that log-odds as the raw score and the engine's default
activation for this family, sigmoid, makes it the card's probability (`activation: none` gives
the log-odds). Only the two lm_head rows of "no" and "yes" are kept, so the full vocabulary
projection never runs. The prompt is the card's:

    <|im_start|>system\\nJudge whether the Document meets the requirements based on the Query
    and the Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\\n
    <|im_start|>user\\n<Instruct>: {instruction}\\n<Query>: {query}\\n<Document>: {item}
    <|im_end|>\\n<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n

with the card's default instruction unless the request gives one (`options.instruction`). The
middle part is tokenized as one text (the model's tokenizer, with its special tokens, as the
card's `tokenizer(pairs)` does); over-long pairs lose tokens from the end of that part (the
card's truncation), so the system prefix and the assistant suffix always stay.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from ..runtime.batch import PackedBatch
from ..runtime.decoder import Decoder
from ..runtime.device import Placement
from ..runtime.tokenizer import Tokenized
from .base import BatchOutputs, EncoderModel, ModelSpec, family
from .cross_encoder import ACTIVATIONS
from .decoder_embedder import NO_LIMIT, cut, special_tail

PREFIX = ('<|im_start|>system\nJudge whether the Document meets the requirements based on the '
          'Query and the Instruct provided. Note that the answer can only be "yes" or "no".'
          '<|im_end|>\n<|im_start|>user\n')
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
BODY = "<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {item}"
DEFAULT_INSTRUCTION = ("Given a web search query, retrieve relevant passages that answer the "
                       "query")


@family("llm-reranker")
class LlmReranker(EncoderModel):
    output_types = ()  # does not encode
    score_types = ("relevance",)
    pair_scoring = True
    stack = Decoder

    def __init__(self, spec: ModelSpec, folder: Path, placement: Placement) -> None:
        super().__init__(spec, folder, placement)
        self.default_activation = spec.score_activation or "sigmoid"
        if self.default_activation not in ACTIVATIONS:
            raise ValueError(f"{spec.name}: score_activation must be one of {ACTIVATIONS}")
        head = self.extra_weights.pop("lm_head.weight", None)
        self.extra_weights = {}
        if head is None:
            raise ValueError(f"{folder}: no lm_head.weight and tie_word_embeddings is off; an "
                             "LLM reranker needs the language-model head")
        ids = [self.tokenizer.token_id(t) for t in ("no", "yes")]
        if None in ids:
            raise ValueError(f"{folder}: the tokenizer has no single 'yes' / 'no' token")
        # (2, hidden): the "no" and "yes" rows, in float32 whatever the stack's dtype
        self.yes_no = head[ids].to(placement.device, torch.float32)
        # no cut inside the tokenizer: prepare_pairs truncates the middle part itself
        self.tokenizer.max_tokens = NO_LIMIT
        raw = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tail = special_tail(raw)
        # prefix and suffix as the card encodes them: without special tokens
        self.prefix, self.suffix = (np.asarray(raw.encode(t, add_special_tokens=False).ids,
                                               dtype=np.int64) for t in (PREFIX, SUFFIX))

    def dims(self) -> dict[str, int]:
        return {}

    def prepare_pairs(self, query: str, texts: list[str], instruction: str | None = None,
                      limit: int | None = None) -> tuple[int, Tokenized]:
        """(tokens of everything but the item, the pairs' prompts tokenized)."""
        instruction = DEFAULT_INSTRUCTION if instruction is None else instruction
        bodies = [BODY.format(instruction=instruction, query=query, item=t) for t in ["", *texts]]
        tok = self.tokenizer.encode(bodies)
        specials = len(self.prefix) + len(self.suffix)
        fixed = specials + tok.original_lengths[0]
        room = self.max_tokens - specials
        ids = [np.concatenate([self.prefix, cut(body, room, self.tail), self.suffix])
               for body in tok.ids[1:]]
        return fixed, Tokenized(ids, [specials + n for n in tok.original_lengths[1:]])

    def heads(self, batch: PackedBatch, hidden: torch.Tensor, ids: torch.Tensor) -> BatchOutputs:
        last = torch.from_numpy(batch.cu_seqlens[1:] - 1).to(hidden.device)
        logits = hidden[last].float() @ self.yes_no.T  # (B, 2): no, yes
        return BatchOutputs(scores=logits[:, 1] - logits[:, 0])  # log-odds of "yes"
