"""`GET /v1/models` entries: SIE's ModelInfo fields, ours beside them, and OpenAI's view.

Dims, output types and the sequence limit are known before a model loads (from its
config.json, `ModelRegistry.describe`), so a client can size its vector store first.
"""

from __future__ import annotations

import os
import time
from typing import Any

from ..engine import Engine
from ..engine.registry import ModelHandle
from ..models import FAMILIES

# SIE's lifecycle words for our registry states.
STATES = {"registered": "available", "loading": "loading", "ready": "loaded",
          "failed": "failed", "evicted": "available"}
INSTANCE_ID = os.urandom(16).hex()  # this process, as SIE's `runtime_instance_id`
STARTED = int(time.time())


def entry(engine: Engine, h: ModelHandle) -> dict[str, Any]:
    """One model: SIE's ModelInfo plus this server's own fields."""
    info = engine.registry.describe(h)
    model = h.model
    cls = FAMILIES[h.spec.family]
    score_modes = list(cls.score_types)
    outputs = list(info.output_types) if info is not None else []
    if score_modes:
        outputs.append("score")
    if cls.extracts:
        outputs.append("json")  # SIE's output of extract models
    error = h.error if h.state == "failed" else None
    out: dict[str, Any] = {
        "name": h.spec.name, "inputs": ["text"], "outputs": outputs,
        "dims": info.dims if info is not None else {},
        "loaded": h.state == "ready", "state": STATES[h.state],
        "last_error": None if error is None else {
            "code": error.code, "message": error.message,
            "attempts": error.detail.get("attempts", 1), "permanent": False},
        "max_sequence_length": info.max_input_tokens if info is not None else None,
        "profiles": {name: profile_info(name == "default") for name in h.spec.profiles},
        "revision": None, "capabilities": None,
        "routing": {"policy": None, "upstream_kind": None},
        # this server's own fields
        "id": h.spec.name, "family": h.spec.family, "pinned": h.pinned,
        "memory_bytes": h.memory_bytes, "adapter_bytes": h.adapter_bytes,
        "last_used": h.last_used or None,
        "output_types": list(info.output_types) if info is not None else None,
        "score_modes": score_modes,
        "tasks": [t for t, on in (("encode", bool(cls.output_types)), ("score", bool(score_modes)),
                                  ("extract", bool(cls.extracts))) if on],
        "dtype": info.dtype if info is not None else None,  # set once the model is loaded
    }
    if model is not None:
        out["adapters"] = engine.adapters(h.spec.name)
    if h.error is not None:
        out["error"] = h.error.message
    return out


def profile_info(is_default: bool) -> dict[str, Any]:
    return {"is_default": is_default, "identity": None, "remote_contract_sha256": None,
            "remote_execution_sha256": None, "runtime_instance_id": INSTANCE_ID}


def variants(e: dict[str, Any], h: ModelHandle) -> list[dict[str, Any]]:
    """SIE lists each non-default profile also as a model of its own, `model:profile`, whose
    only profile is its default; ours add `runtime`, the profile's defaults."""
    return [variant(e, h, name) for name in h.spec.profiles if name != "default"]


def variant(e: dict[str, Any], h: ModelHandle, profile: str) -> dict[str, Any]:
    name = f"{h.spec.name}:{profile}"
    return {**e, "name": name, "id": name, "profiles": {"default": profile_info(True)},
            "runtime": h.spec.profiles[profile]}


def openai_entry(e: dict[str, Any]) -> dict[str, Any]:
    """The same model as OpenAI's `client.models.list()` reads it."""
    return {"id": e["name"], "object": "model", "created": STARTED, "owned_by": "sie"}
