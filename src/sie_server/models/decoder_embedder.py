"""Decoder embedders (Qwen3-Embedding, gte-Qwen2, e5-mistral): a causal decoder stack, then the
sentence-transformers pipeline of the folder (Pooling -- last token for these models, mean if
its 1_Pooling config says so -- and Normalize), as `dense.SentenceTransformer` reads it.

Prompts: `is_query` prepends the query prompt, otherwise the document prompt; they come from
the catalog's `query_prefix` / `document_prefix`, else from `config_sentence_transformers.json`
(`prompts["query"]`, `prompts["document"]` or `["passage"]`, else `default_prompt_name`'s
prompt), as `SentenceTransformer.encode(prompt_name=...)` prepends them. `instruction` replaces
the query prompt through the catalog's `instruction_template` (Qwen3-Embedding:
`Instruct: {instruction}\\nQuery:{text}`). Last-token pooling reads each sequence's last real
token: the EOS that the model's tokenizer.json appends (Qwen3-Embedding's does), or that its
tokenizer_config.json asks for with `add_eos_token` (gte-Qwen2's); packing has no
padding, so the left/right padding of the reference does not matter. Over-long texts are cut
as Hugging Face cuts them: the text loses its end, the appended special tokens stay.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from ..runtime.decoder import Decoder
from ..runtime.device import Placement
from ..runtime.tokenizer import Tokenized
from .base import ModelSpec, family
from .dense import SentenceTransformer

NO_LIMIT = 1 << 62


def special_tail(tok: Tokenizer) -> int:
    """How many special tokens a tokenizer's post-processor appends after the text
    (Qwen3-Embedding's: 1, `<|endoftext|>`; Qwen base tokenizers: 0)."""
    plain = tok.encode("a", add_special_tokens=False).ids
    full = tok.encode("a").ids
    lead = next((i for i in range(len(full)) if full[i:i + len(plain)] == plain), 0)
    return len(full) - lead - len(plain)


def cut(ids: np.ndarray, limit: int, tail: int) -> np.ndarray:
    """Hugging Face's truncation of an encoded text: the content loses its end, the `tail`
    special tokens appended after it stay."""
    if len(ids) <= limit:
        return ids
    return np.concatenate([ids[:limit - tail], ids[len(ids) - tail:]]) if tail else ids[:limit]


def read_prompts(folder: Path) -> tuple[str, str]:
    """(query prompt, document prompt) of a folder's config_sentence_transformers.json."""
    path = folder / "config_sentence_transformers.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    prompts = config.get("prompts") or {}
    default = prompts.get(config.get("default_prompt_name") or "", "")
    query = prompts.get("query", default)
    document = prompts.get("document", prompts.get("passage", default))
    return query, document


def eos_to_append(folder: Path, tok: Tokenizer, tail: int) -> int | None:
    """The EOS id to append when tokenizer_config.json asks for one (`add_eos_token`, as
    gte-Qwen2's own tokenizer class and Llama's fast tokenizer honour it) and tokenizer.json
    does not append it already; else None."""
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    eos = config.get("eos_token")
    eos = eos.get("content") if isinstance(eos, dict) else eos
    if tail or not config.get("add_eos_token") or not eos:
        return None
    eos_id = tok.token_to_id(eos)
    if eos_id is None:
        raise ValueError(f"{folder}: add_eos_token is set but {eos!r} is not in the vocabulary")
    return eos_id


def include_prompt(folder: Path) -> bool:
    modules = json.loads((folder / "modules.json").read_text())
    entry = next((m for m in modules if m["type"].endswith("Pooling")), None)
    if entry is None:
        return True
    return json.loads((folder / entry["path"] / "config.json").read_text()).get(
        "include_prompt", True)


@family("decoder-embedder")
class DecoderEmbedder(SentenceTransformer):
    stack = Decoder
    # /v1/score: the query (with its prompt) and the items encoded, cosine of the dense vectors
    score_types = ("dense",)

    def __init__(self, spec: ModelSpec, folder: Path, placement: Placement) -> None:
        super().__init__(spec, folder, placement)
        self.extra_weights = {}  # an lm_head, if the folder has one, is not needed here
        # truncation happens in prepare(), as Hugging Face's: the tokenizer itself never cuts
        self.tokenizer.max_tokens = NO_LIMIT
        raw = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tail = special_tail(raw)
        self.eos = eos_to_append(folder, raw, self.tail)
        query, document = read_prompts(folder)
        self.query_prompt = spec.query_prefix or query
        self.document_prompt = spec.document_prefix or document
        if not include_prompt(folder) and self.pooling != "lasttoken":
            raise ValueError(f"{folder}: pooling that excludes the prompt tokens "
                             "(include_prompt: false) is not supported")

    def prepare(self, texts: list[str], is_query: bool, instruction: str | None,
                template: str | None = None, limit: int | None = None) -> Tokenized:
        if template is not None:
            texts = self.prefixed(texts, is_query, instruction, template)
        elif instruction is not None:
            texts = [self.spec.instruction_template.format(instruction=instruction, text=t)
                     for t in texts]
        else:
            prompt = self.query_prompt if is_query else self.document_prompt
            if prompt:
                texts = [prompt + t for t in texts]
        tok = self.tokenizer.encode(texts)
        if self.eos is None:
            return Tokenized([cut(ids, self.max_tokens, self.tail) for ids in tok.ids],
                             tok.original_lengths)
        eos = np.array([self.eos], dtype=np.int64)
        return Tokenized([np.concatenate([ids[:self.max_tokens - 1], eos]) for ids in tok.ids],
                         [n + 1 for n in tok.original_lengths])
