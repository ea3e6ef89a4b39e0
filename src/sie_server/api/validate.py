"""Turning request bodies into engine calls; every error names the field at fault."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import InvalidRequest
from .images import ImageInput, parse_images

OUTPUT_TYPES = ("dense", "sparse", "multivector")


@dataclass(frozen=True)
class EncodeCall:
    texts: list[str]
    ids: list[Any]
    output_types: list[str]
    options: dict[str, Any]


def _obj(value: Any, field: str) -> dict:
    if not isinstance(value, dict):
        raise InvalidRequest(f"{field} must be an object")
    return value


def parse_items(value: Any, field: str, max_items: int) -> tuple[list[str], list[Any]]:
    """`[{"id"?, "text"}]` -> (texts, ids)."""
    if not isinstance(value, list):
        raise InvalidRequest(f"{field} must be a list of items")
    if not value:
        raise InvalidRequest(f"{field} must hold at least one item")
    if len(value) > max_items:
        raise InvalidRequest(f"{field} holds {len(value)} items; at most {max_items} per request")
    texts, ids = [], []
    for i, item in enumerate(value):
        text, item_id = parse_item(item, f"{field}[{i}]")
        texts.append(text)
        ids.append(item_id)
    return texts, ids


def parse_item(item: Any, field: str) -> tuple[str | ImageInput, Any]:
    item = _obj(item, field)
    item_id = item.get("id")
    if item_id is not None and not isinstance(item_id, (str, int)):
        raise InvalidRequest(f"{field}.id must be a string")
    if item.get("images") is not None:  # an image item (api/images.py)
        return parse_images(item, field), item_id
    if "text" not in item or item["text"] is None:
        raise InvalidRequest(f"{field}.text is missing")
    if not isinstance(item["text"], str):
        raise InvalidRequest(f"{field}.text must be a string")
    return item["text"], item_id


def parse_encode(body: Any, max_items: int) -> EncodeCall:
    body = _obj(body, "body")
    unknown = set(body) - {"items", "params"}
    if unknown:
        raise InvalidRequest(f"body.{sorted(unknown)[0]} is not a known field")
    if "items" not in body:
        raise InvalidRequest("items is missing")
    texts, ids = parse_items(body["items"], "items", max_items)
    params = _obj(body.get("params") or {}, "params")
    unknown = set(params) - {"output_types", "options"}
    if unknown:
        raise InvalidRequest(f"params.{sorted(unknown)[0]} is not a known field")
    types = params.get("output_types") or ["dense"]
    if not isinstance(types, list) or not all(isinstance(t, str) for t in types):
        raise InvalidRequest("params.output_types must be a list of strings")
    for t in types:
        if t not in OUTPUT_TYPES:
            raise InvalidRequest(f"params.output_types: unknown output type {t!r} "
                                 f"(known: {', '.join(OUTPUT_TYPES)})")
    options = params.get("options") or {}
    _obj(options, "params.options")
    return EncodeCall(texts, ids, list(dict.fromkeys(types)), options)


@dataclass(frozen=True)
class ScoreCall:
    query: str
    texts: list[str]
    ids: list[Any]
    options: dict[str, Any]
    top_k: int | None


def parse_score(body: Any, max_items: int) -> ScoreCall:
    """`{"query": Item, "items": [Item], "options"?, "top_k"?}`."""
    body = _obj(body, "body")
    unknown = set(body) - {"query", "items", "options", "top_k"}
    if unknown:
        raise InvalidRequest(f"body.{sorted(unknown)[0]} is not a known field")
    if body.get("query") is None:
        raise InvalidRequest("query is missing")
    query, _ = parse_item(body["query"], "query")
    if "items" not in body:
        raise InvalidRequest("items is missing")
    texts, ids = parse_items(body["items"], "items", max_items)
    options = _obj(body.get("options") or {}, "options")
    top_k = body.get("top_k")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise InvalidRequest("top_k must be a positive integer")
    return ScoreCall(query, texts, ids, options, top_k)
