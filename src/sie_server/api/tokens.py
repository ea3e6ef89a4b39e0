"""`POST /v1/tokens/{model}`: the tokens a model computes on for texts, and token ids as text.

For reading outputs (the page at `/` uses it): a multivector output has one row per token of
its text, the last `num_tokens` of the tokens listed here (BGE-M3 drops `<s>`), and a sparse
index is a token id. The tokenizer is the server's, so nothing is guessed on the client.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..engine import Engine
from ..engine.options import check_options
from ..errors import InvalidRequest
from .validate import _known, _obj, parse_items

MAX_IDS = 65536


@dataclass(frozen=True)
class TokensCall:
    texts: list[str]
    ids: list[int]
    options: dict[str, Any]  # is_query, instruction: as in encode


def parse(body: Any, max_items: int) -> TokensCall:
    """`{"items"?: [Item], "ids"?: [int], "options"?: {"is_query", "instruction"}}`."""
    body = _obj(body, "body")
    _known(body, {"items", "ids", "options"}, "body")
    texts: list[Any] = []
    if body.get("items") is not None:
        texts, _ = parse_items(body["items"], "items", max_items)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise InvalidRequest(f"items[{i}]: only texts are tokenized")
    ids = body.get("ids")
    if ids is None:
        ids = []
    if not isinstance(ids, list):
        raise InvalidRequest("ids must be a list of token ids")
    if len(ids) > MAX_IDS:
        raise InvalidRequest(f"ids holds {len(ids)} token ids; at most {MAX_IDS} per request")
    for i, token_id in enumerate(ids):
        if isinstance(token_id, bool) or not isinstance(token_id, int):
            raise InvalidRequest(f"ids[{i}] must be an integer token id")
    options = check_options(body.get("options"), {"is_query": bool, "instruction": str},
                            "options")
    return TokensCall(texts, ids, options)


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
