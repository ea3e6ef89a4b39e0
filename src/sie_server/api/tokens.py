"""`POST /v1/tokens/{model}`: the tokens a model computes on for texts, and token ids as text.

For reading outputs (the page at `/` uses it): a multivector output has one row per token of
its text, the last `num_tokens` of the tokens listed here (BGE-M3 drops `<s>`), and a sparse
index is a token id. The tokenizer is the server's, so nothing is guessed on the client.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, Field

from ..engine import Engine
from ..errors import InvalidRequest
from .validate import STRICT, Item, Text, item_inputs, validated_items

MAX_IDS = 65536


@dataclass(frozen=True)
class TokensCall:
    texts: list[str]
    ids: list[int]
    options: dict[str, Any]  # is_query, instruction: as in encode


class TokensOptions(BaseModel):
    model_config = STRICT
    is_query: bool | None = None
    instruction: Text | None = None


class TokensRequest(BaseModel):
    model_config = STRICT
    items: list[Item] | None = Field(None, min_length=1)
    ids: list[int] | None = Field(None, max_length=MAX_IDS)
    options: TokensOptions | None = None


def parse(body: Any, max_items: int) -> TokensCall:
    """A TokensRequest -> TokensCall (texts only: images are not tokenized)."""
    req = validated_items(TokensRequest, body, max_items)
    texts, _ = item_inputs(req.items or [], "items")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise InvalidRequest(f"items[{i}]: only texts are tokenized")
    options = req.options.model_dump(exclude_none=True) if req.options else {}
    return TokensCall(texts, req.ids or [], options)  # type: ignore[arg-type]


def run(engine: Engine, model: str, call: TokensCall) -> dict[str, Any]:
    """The response body (blocking: may load the model)."""
    asked = engine.vocab(model, call.ids)  # first: a bad id is refused before any tokenizing
    rows = engine.tokenize(model, call.texts, bool(call.options.get("is_query")),
                           call.options.get("instruction")) if call.texts else []
    seen = sorted({t for row in rows for t in row})
    pieces = {t: piece for t, (piece, _) in zip(seen, engine.vocab(model, seen))}
    return {"model": model,
            "items": [{"ids": row, "tokens": [pieces[t] for t in row]} for row in rows],
            "ids": [{"id": t, "token": piece, "text": text}
                    for t, (piece, text) in zip(call.ids, asked)]}
