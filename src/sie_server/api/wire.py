"""SIE's wire format: request bodies in, response bodies out (msgpack or JSON).

msgpack carries arrays as msgpack-numpy maps (`{b"nd": True, b"type": "<f4", b"kind": b"",
b"shape": [...], b"data": <bytes>}`), which is what SIE's public SDK decodes; JSON carries the
same keys with plain lists. One encoder per output type below; adding an output format is one
function here.
"""

from __future__ import annotations

import json
import math
from typing import Any

import msgpack
import numpy as np

from ..engine.request import ItemResult
from ..engine.scoring import ScoreResult
from ..errors import InvalidRequest, SIEError
from ..quantize import quantize_rows, quantize_sparse_values

MSGPACK = "application/msgpack"
JSON = "application/json"
# The sie-server release whose protocol this server speaks: sent as X-SIE-Server-Version,
# which SIE's SDK compares with its own version.
SIE_PROTOCOL_VERSION = "0.10.1"


def decode_body(body: bytes, content_type: str) -> Any:
    """Parse a body by its Content-Type (msgpack or JSON; JSON when unspecified)."""
    binary = "msgpack" in content_type
    try:
        if binary:
            return msgpack.unpackb(body, raw=False, strict_map_key=True)
        return json.loads(body)
    except Exception as exc:  # noqa: BLE001 - any parse failure is the client's
        kind = "msgpack" if binary else "JSON"
        raise InvalidRequest(f"body: not valid {kind} ({type(exc).__name__})") from None


def wants_msgpack(accept: str) -> bool:
    return "msgpack" in accept


def nd(array: np.ndarray, binary: bool) -> Any:
    """An array as msgpack-numpy (little-endian) or, for JSON, as nested lists."""
    if not binary:
        return array.tolist()
    dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
    a = np.ascontiguousarray(array, dtype=dtype)
    return {b"nd": True, b"type": a.dtype.str, b"kind": b"", b"shape": list(a.shape),
            b"data": a.tobytes()}


def dense_to_wire(vector: np.ndarray, dtype: str, binary: bool) -> dict[str, Any]:
    return {"dims": int(vector.shape[-1]), "dtype": dtype,
            "values": nd(quantize_rows(vector, dtype), binary)}


def sparse_to_wire(sparse: tuple[np.ndarray, np.ndarray], vocab: int | None, dtype: str,
                   binary: bool) -> dict[str, Any]:
    idx, val = sparse
    values = quantize_sparse_values(val, dtype)
    return {"dims": vocab, "dtype": str(values.dtype),
            "indices": nd(np.asarray(idx, dtype=np.int32), binary), "values": nd(values, binary)}


def multivector_to_wire(rows: np.ndarray, dtype: str, binary: bool) -> dict[str, Any]:
    return {"token_dims": int(rows.shape[1]), "num_tokens": int(rows.shape[0]), "dtype": dtype,
            "values": nd(quantize_rows(rows, dtype), binary)}


def item_to_wire(item_id: str | None, r: ItemResult, output_dtype: str, sparse_dims: int | None,
                 binary: bool) -> dict[str, Any]:
    """One encode result: SIE's item layout, plus our `token_count` and `truncated`."""
    out: dict[str, Any] = {} if item_id is None else {"id": item_id}
    if r.dense is not None:
        out["dense"] = dense_to_wire(r.dense, output_dtype, binary)
    if r.sparse is not None:
        out["sparse"] = sparse_to_wire(r.sparse, sparse_dims, output_dtype, binary)
    if r.multivector is not None:
        out["multivector"] = multivector_to_wire(r.multivector, output_dtype, binary)
    out["token_count"] = r.token_count
    out["truncated"] = r.truncated
    return out


def encode_response(model: str, ids: list[str | None], results: list[ItemResult],
                    output_dtype: str, sparse_dims: int | None, binary: bool,
                    timing: dict[str, float] | None = None) -> dict[str, Any]:
    items = [item_to_wire(i, r, output_dtype, sparse_dims, binary) for i, r in zip(ids, results)]
    return {"model": model, "items": items, "timing": timing,
            "usage": {"input_tokens": sum(r.token_count for r in results)}}


def timing_headers(timing: dict[str, float]) -> dict[str, str]:
    """SIE's timing headers (milliseconds, two decimals) for a TimingInfo."""
    return {"X-Queue-Time": f"{timing['queue_ms']:.2f}",
            "X-Tokenization-Time": f"{timing['tokenization_ms']:.2f}",
            "X-Inference-Time": f"{timing['inference_ms']:.2f}",
            "X-Postprocessing-Time": f"{timing['postprocessing_ms']:.2f}",
            "X-Total-Time": f"{timing['total_ms']:.2f}"}


def encode_body(payload: Any, binary: bool) -> bytes:
    """msgpack or JSON bytes. JSON never carries NaN/Infinity (it is not JSON): a non-finite
    number here is a bug upstream, refused as an internal error rather than sent."""
    if binary:
        return msgpack.packb(payload, use_bin_type=True)
    try:
        return json.dumps(payload, separators=(",", ":"), allow_nan=False).encode()
    except ValueError:
        raise SIEError("internal error: a result was not a finite number") from None


def error_body(err: SIEError, request_id: str | None = None) -> dict[str, Any]:
    """SIE's error envelope: `{"detail": {"code", "message", ...}}`."""
    detail: dict[str, Any] = {"code": err.code, "message": err.message, **err.detail}
    if request_id is not None:
        detail["request_id"] = request_id
    return {"detail": detail}


def score_to_wire(model: str, query_id: str | None, ids: list[str | None], result: ScoreResult,
                  input_tokens: int, timing: dict[str, float] | None = None) -> dict[str, Any]:
    """A ScoreResult, best first: SIE's layout (`item_id` defaults to "item-{i}", `query_id`,
    `usage`) plus `timing` (SIE sends it in headers only for score), our `score_mode`,
    `score_weights`/`activation` and per-item `components`."""
    scores = result.scores.tolist()
    if not all(map(math.isfinite, scores)):
        raise InvalidRequest("the scores are not finite numbers: lower options.score_weights")
    payload: dict[str, Any] = {"model": model, "query_id": query_id,
                               "score_mode": result.score_mode}
    if result.score_weights is not None:
        payload["score_weights"] = result.score_weights
    if result.activation is not None:
        payload["activation"] = result.activation
    comps = {k: v.tolist() for k, v in result.components.items()}
    entries = []
    for rank, i in enumerate(result.order.tolist()):
        entry: dict[str, Any] = {"item_id": f"item-{i}" if ids[i] is None else ids[i],
                                 "score": scores[i], "rank": rank}
        if comps:
            entry["components"] = {k: v[i] for k, v in comps.items()}
        entries.append(entry)
    payload["scores"] = entries
    payload["usage"] = {"input_tokens": input_tokens}
    if timing is not None:
        payload["timing"] = timing
    return payload


def extract_to_wire(model: str, ids: list[str | None], results: list[dict[str, Any]],
                    input_tokens: int) -> dict[str, Any]:
    """SIE's ExtractResponse: per item `id` ("item-{i}" when it had none), `entities` (text,
    label, score, start, end, bbox), `relations`, `classifications`, `objects`, `data`, and
    `error` ({code, message}) for an item that could not be read."""
    items = []
    for i, (item_id, r) in enumerate(zip(ids, results)):
        items.append({
            "id": f"item-{i}" if item_id is None else item_id,
            "entities": [{"text": e["text"], "label": e["label"], "score": e["score"],
                          "start": e["start"], "end": e["end"], "bbox": None}
                         for e in r.get("entities", [])],
            "relations": [],
            "classifications": r.get("classifications", []),
            "objects": [],
            "data": {},
        })
        if "error" in r:
            items[-1]["error"] = r["error"]
    return {"model": model, "items": items, "usage": {"input_tokens": input_tokens}}
