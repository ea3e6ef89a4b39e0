"""Request decoding and response encoding (msgpack or JSON; vectors as raw float32 in msgpack)."""

from __future__ import annotations

import json
from typing import Any

import msgpack
import numpy as np

from ..errors import InvalidRequest
from ..engine.request import ItemResult
from ..engine.scoring import ScoreResult

MSGPACK = "application/msgpack"
JSON = "application/json"


def decode_body(body: bytes, content_type: str) -> Any:
    """Parse a body by its Content-Type (msgpack or JSON; JSON when unspecified)."""
    try:
        if "msgpack" in content_type:
            return msgpack.unpackb(body, raw=False, strict_map_key=True)
        return json.loads(body)
    except Exception as exc:  # noqa: BLE001 - any parse failure is the client's
        kind = "msgpack" if "msgpack" in content_type else "JSON"
        raise InvalidRequest(f"body: not valid {kind} ({type(exc).__name__})") from None


def wants_msgpack(accept: str) -> bool:
    return "msgpack" in accept


def item_to_wire(item_id: Any, r: ItemResult, binary: bool) -> dict[str, Any]:
    """One encode result in wire form."""
    out: dict[str, Any] = {"id": item_id, "token_count": r.token_count, "truncated": r.truncated}
    if r.dense is not None:
        out["dense"] = ({"dims": int(r.dense.shape[0]), "data": _f32(r.dense)} if binary
                        else r.dense.tolist())
    if r.sparse is not None:
        idx, val = r.sparse
        out["sparse"] = ({"indices": idx.astype("<i4").tobytes(), "values": _f32(val)} if binary
                         else {"indices": idx.tolist(), "values": val.tolist()})
    if r.multivector is not None:
        mv = r.multivector
        out["multivector"] = ({"shape": list(mv.shape), "data": _f32(mv)} if binary
                              else mv.tolist())
    return out


def _f32(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a, dtype="<f4").tobytes()


def encode_body(payload: Any, binary: bool) -> bytes:
    if binary:
        return msgpack.packb(payload, use_bin_type=True)
    return json.dumps(payload, separators=(",", ":")).encode()


def score_to_wire(model: str, ids: list[Any], result: ScoreResult) -> dict[str, Any]:
    """A ScoreResult in wire form: best first; `item_id` is the item's id or its position."""
    payload: dict[str, Any] = {"model": model, "score_type": result.score_type}
    if result.weights is not None:
        payload["weights"] = result.weights
    if result.activation is not None:
        payload["activation"] = result.activation
    comps = {k: v.tolist() for k, v in result.components.items()}
    scores = result.scores.tolist()
    entries = []
    for rank, i in enumerate(result.order.tolist()):
        entry: dict[str, Any] = {"item_id": i if ids[i] is None else ids[i],
                                 "score": scores[i], "rank": rank}
        if comps:
            entry["components"] = {k: v[i] for k, v in comps.items()}
        entries.append(entry)
    payload["scores"] = entries
    return payload
