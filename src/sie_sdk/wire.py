"""Wire format (docs/API.md): msgpack request bodies; msgpack or JSON responses decoded to numpy."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import msgpack
import numpy as np
import numpy.typing as npt

from .errors import SIEError
from .types import EncodeResult, Item, ScoreResult

MSGPACK = "application/msgpack"


def item_to_wire(item: Item) -> dict[str, str]:
    """`{"text", "id"?}`; the id is left out when None."""
    return {"text": item.text} if item.id is None else {"text": item.text, "id": item.id}


def pack(obj: Any) -> bytes:
    """msgpack-encode a request body."""
    return msgpack.packb(obj, use_bin_type=True)


def encode_request(
    items: Sequence[Item], output_types: Sequence[str] | None = None, options: Mapping[str, Any] | None = None
) -> bytes:
    """Body of `POST /v1/encode/{model}`; unset params are left to the server's defaults."""
    params: dict[str, Any] = {}
    if output_types is not None:
        params["output_types"] = list(output_types)
    if options is not None:
        params["options"] = dict(options)
    return pack({"items": [item_to_wire(i) for i in items], "params": params})


def score_request(
    query: Item, items: Sequence[Item], options: Mapping[str, Any] | None = None, top_k: int | None = None
) -> bytes:
    """Body of `POST /v1/score/{model}`."""
    body: dict[str, Any] = {
        "query": item_to_wire(query),
        "items": [item_to_wire(i) for i in items],
        "options": dict(options or {}),
    }
    if top_k is not None:
        body["top_k"] = top_k
    return pack(body)


def unpack(body: bytes, content_type: str | None) -> Any:
    """Decode a response body: msgpack when the content type says so, else JSON."""
    if content_type and "msgpack" in content_type:
        return msgpack.unpackb(body, raw=False)
    return json.loads(body)


def _array(value: Any, dtype: str, shape: Sequence[int] | None = None) -> npt.NDArray[Any]:
    """Raw little-endian bytes (msgpack) or a list (JSON) -> a native, writable array owning its memory."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        arr = np.frombuffer(value, dtype="<" + dtype)
        return (arr if shape is None else arr.reshape(shape)).astype(dtype)  # astype copies
    return np.asarray(value, dtype=dtype)


def _dense(value: Any) -> npt.NDArray[np.float32]:
    if not isinstance(value, dict):
        return _array(value, "f4")
    arr = _array(value["data"], "f4")
    if arr.size != value["dims"]:
        raise SIEError(f"dense vector has {arr.size} values, expected dims={value['dims']}")
    return arr


def _multivector(value: Any) -> npt.NDArray[np.float32]:
    if isinstance(value, dict):
        return _array(value["data"], "f4", value["shape"])
    arr = _array(value, "f4")
    return arr if arr.ndim == 2 else arr.reshape(len(value), 0)  # JSON `[]`: zero tokens


def decode_encode_item(item: Mapping[str, Any]) -> EncodeResult:
    """One response item (msgpack or JSON form) -> EncodeResult with numpy arrays."""
    result: EncodeResult = {
        "id": item.get("id"),
        "token_count": int(item["token_count"]),
        "truncated": bool(item["truncated"]),
    }
    if "dense" in item:
        result["dense"] = _dense(item["dense"])
    if "sparse" in item:
        sp = item["sparse"]
        result["sparse"] = {"indices": _array(sp["indices"], "i4"), "values": _array(sp["values"], "f4")}
        if result["sparse"]["indices"].shape != result["sparse"]["values"].shape:
            raise SIEError("sparse vector has different numbers of indices and values")
    if "multivector" in item:
        result["multivector"] = _multivector(item["multivector"])
    return result


def decode_encode_response(payload: Mapping[str, Any]) -> list[EncodeResult]:
    """`{"model", "items": [...]}` -> one EncodeResult per item, in order."""
    return [decode_encode_item(i) for i in payload["items"]]


def decode_score_response(payload: Mapping[str, Any]) -> ScoreResult:
    """`{"model", "scores": [{"item_id", "score", "rank", "components"?}], "score_type"?, ...}`
    -> ScoreResult (optional keys are kept when the server sends them)."""
    scores = []
    for s in payload["scores"]:
        entry = {"item_id": s.get("item_id"), "score": float(s["score"]), "rank": int(s["rank"])}
        if "components" in s:
            entry["components"] = {k: float(v) for k, v in s["components"].items()}
        scores.append(entry)
    result: ScoreResult = {"model": payload["model"], "scores": scores}  # type: ignore[typeddict-item]
    for key in ("score_type", "weights", "activation"):
        if key in payload:
            result[key] = payload[key]  # type: ignore[literal-required]
    return result
