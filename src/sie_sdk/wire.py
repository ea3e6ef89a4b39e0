"""Wire format (docs/API.md, SIE's protocol): msgpack request bodies; msgpack or JSON
responses decoded to numpy.

msgpack responses carry arrays as msgpack-numpy maps (`{b"nd": True, b"type": "<f4",
b"kind": b"", b"shape": [...], b"data": <bytes>}`); only flat numeric dtypes are accepted
(never `kind` O or V, which would unpickle or build structured dtypes).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import msgpack
import numpy as np
import numpy.typing as npt

from .errors import SIEError
from .types import EncodeResult, ExtractResult, Item, ScoreResult

MSGPACK = "application/msgpack"
# The numpy dtype of each `dtype` name of the wire (JSON lists carry no dtype of their own).
DTYPES = {"float32": "f4", "float16": "f2", "int8": "i1", "uint8": "u1", "binary": "u1",
          "ubinary": "u1"}
_NUMERIC_KINDS = "fiub"


def item_to_wire(item: Item) -> dict[str, Any]:
    """`{"text" | "images", "id"?}`; unset fields are left out."""
    out: dict[str, Any] = {}
    if item.text is not None:
        out["text"] = item.text
    if item.images is not None:
        out["images"] = [i if isinstance(i, dict) else {"data": bytes(i)} for i in item.images]
    if item.id is not None:
        out["id"] = item.id
    return out


def pack(obj: Any) -> bytes:
    """msgpack-encode a request body."""
    return msgpack.packb(obj, use_bin_type=True)


def encode_request(
    items: Sequence[Item],
    output_types: Sequence[str] | None = None,
    options: Mapping[str, Any] | None = None,
    *,
    output_dtype: str | None = None,
    instruction: str | None = None,
) -> bytes:
    """Body of `POST /v1/encode/{model}`; unset params are left to the server's defaults."""
    params: dict[str, Any] = {}
    if output_types is not None:
        params["output_types"] = list(output_types)
    if instruction is not None:
        params["instruction"] = instruction
    if output_dtype is not None:
        params["output_dtype"] = output_dtype
    if options is not None:
        params["options"] = dict(options)
    return pack({"items": [item_to_wire(i) for i in items], "params": params})


def score_request(
    query: Item,
    items: Sequence[Item],
    options: Mapping[str, Any] | None = None,
    top_k: int | None = None,
    *,
    instruction: str | None = None,
) -> bytes:
    """Body of `POST /v1/score/{model}`."""
    body: dict[str, Any] = {
        "query": item_to_wire(query),
        "items": [item_to_wire(i) for i in items],
        "options": dict(options or {}),
    }
    if instruction is not None:
        body["instruction"] = instruction
    if top_k is not None:
        body["top_k"] = top_k
    return pack(body)


def _ndarray(obj: dict[Any, Any]) -> Any:
    """msgpack object hook: a msgpack-numpy map -> a writable numpy array owning its memory."""
    if b"nd" not in obj:
        return obj
    name = obj.get(b"type")
    try:
        dtype = np.dtype(name if isinstance(name, str) else "O")
    except TypeError:
        raise SIEError("malformed msgpack-numpy array in the response") from None
    data, shape = obj.get(b"data"), obj.get(b"shape")
    if (obj.get(b"nd") is not True or obj.get(b"kind", b"") not in (b"", "")
            or dtype.kind not in _NUMERIC_KINDS or dtype.fields is not None
            or not isinstance(data, bytes) or not isinstance(shape, list)
            or not all(isinstance(d, int) and d >= 0 for d in shape)
            or int(np.prod(shape)) * dtype.itemsize != len(data)):
        raise SIEError("malformed msgpack-numpy array in the response")
    return np.frombuffer(data, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def unpack(body: bytes, content_type: str | None) -> Any:
    """Decode a response body: msgpack when the content type says so, else JSON."""
    if content_type and "msgpack" in content_type:
        return msgpack.unpackb(body, raw=False, object_hook=_ndarray)
    return json.loads(body)


def _array(value: Any, dtype: str) -> npt.NDArray[Any]:
    """A decoded msgpack array as is; a JSON list in the wire `dtype`."""
    if isinstance(value, np.ndarray):
        return value
    return np.asarray(value, dtype=DTYPES.get(dtype, dtype))


def decode_encode_item(item: Mapping[str, Any]) -> EncodeResult:
    """One response item (msgpack or JSON form) -> EncodeResult with numpy arrays."""
    result: EncodeResult = {
        "id": item.get("id"),
        "token_count": int(item.get("token_count", 0)),
        "truncated": bool(item.get("truncated", False)),
    }
    if item.get("dense") is not None:
        d = item["dense"]
        result["dense"] = _array(d["values"], d.get("dtype", "float32"))
    if item.get("sparse") is not None:
        sp = item["sparse"]
        result["sparse"] = {"indices": _array(sp["indices"], "i4"),
                            "values": _array(sp["values"], sp.get("dtype", "float32"))}
        if result["sparse"]["indices"].shape != result["sparse"]["values"].shape:
            raise SIEError("sparse vector has different numbers of indices and values")
    if item.get("multivector") is not None:
        mv = item["multivector"]
        rows = _array(mv["values"], mv.get("dtype", "float32"))
        if rows.ndim != 2:  # JSON `[]`: zero tokens
            rows = rows.reshape(int(mv.get("num_tokens", 0)), -1 if rows.size else 0)
        result["multivector"] = rows
    return result


def decode_encode_response(payload: Mapping[str, Any]) -> list[EncodeResult]:
    """`{"model", "items": [...], "timing"?, "usage"?}` -> one EncodeResult per item, in
    order; each carries the request's `timing`, as SIE's SDK hands it on."""
    results = [decode_encode_item(i) for i in payload["items"]]
    if payload.get("timing"):
        for r in results:
            r["timing"] = payload["timing"]
    return results


def decode_score_response(payload: Mapping[str, Any]) -> ScoreResult:
    """`{"model", "scores": [{"item_id", "score", "rank", "components"?}], "query_id"?,
    "score_mode"?, "score_weights"?, "activation"?, "usage"?, "timing"?}` -> ScoreResult
    (optional keys are kept when the server sends them)."""
    scores = []
    for s in payload["scores"]:
        entry = {"item_id": s.get("item_id"), "score": float(s["score"]), "rank": int(s["rank"])}
        if "components" in s:
            entry["components"] = {k: float(v) for k, v in s["components"].items()}
        scores.append(entry)
    result: ScoreResult = {"model": payload["model"], "scores": scores}  # type: ignore[typeddict-item]
    for key in ("query_id", "score_mode", "score_weights", "activation", "usage", "timing"):
        if payload.get(key) is not None:
            result[key] = payload[key]  # type: ignore[literal-required]
    return result


def extract_request(
    items: Sequence[Item],
    labels: Sequence[str] | None,
    options: Mapping[str, Any] | None = None,
    *,
    instruction: str | None = None,
    output_schema: Mapping[str, Any] | None = None,
) -> bytes:
    """Body of `POST /v1/extract/{model}`: `{"items", "params"?: {"labels", "instruction",
    "output_schema", "options"}}`, params only when set (as SIE's SDK sends it)."""
    params: dict[str, Any] = {}
    if labels is not None:
        params["labels"] = list(labels)
    if output_schema is not None:
        params["output_schema"] = dict(output_schema)
    if instruction is not None:
        params["instruction"] = instruction
    if options:
        params["options"] = dict(options)
    body: dict[str, Any] = {"items": [item_to_wire(i) for i in items]}
    if params:
        body["params"] = params
    return msgpack.packb(body, use_bin_type=True)


def decode_extract_response(payload: Mapping[str, Any]) -> list[ExtractResult]:
    """`{"model", "items": [ExtractResult]}` -> one ExtractResult per item, `model` set on each."""
    results: list[ExtractResult] = []
    for item in payload["items"]:
        result: ExtractResult = {
            "entities": [{"text": e["text"], "label": e["label"], "score": float(e["score"]),
                          "start": e.get("start"), "end": e.get("end"), "bbox": e.get("bbox")}
                         for e in item.get("entities", [])],
            "relations": list(item.get("relations", [])),
            "classifications": [{"label": c["label"], "score": float(c["score"])}
                                for c in item.get("classifications", [])],
            "objects": list(item.get("objects", [])),
        }
        if item.get("data"):  # as sie-sdk: only when there is some
            result["data"] = dict(item["data"])
        if item.get("id") is not None:
            result["id"] = item["id"]
        if item.get("error") is not None:  # an item the server could not read
            result["error"] = {"code": item["error"]["code"], "message": item["error"]["message"]}
        if payload.get("model"):
            result["model"] = payload["model"]
        results.append(result)
    return results
