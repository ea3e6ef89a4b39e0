"""The in-process engine: validate, tokenize, queue, and wait for results. No HTTP here."""

from __future__ import annotations

import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Sequence

from ..config import Settings
from ..errors import InputTooLong, InvalidRequest
from ..runtime.device import Placement
from .registry import ModelRegistry
from .request import ItemResult, Request


@dataclass(frozen=True)
class EncodeOptions:
    truncate: bool = True
    is_query: bool = False
    instruction: str | None = None
    lora_id: str | None = None
    timeout_s: float | None = None  # deadline, counted from submission

    @classmethod
    def parse(cls, options: dict[str, Any] | None) -> "EncodeOptions":
        """Validate a request's options dict; errors name the offending field."""
        options = options or {}
        if not isinstance(options, dict):
            raise InvalidRequest("params.options must be an object")
        kinds = {"truncate": bool, "is_query": bool, "instruction": str, "lora_id": str,
                 "timeout_s": (int, float)}
        for key, value in options.items():
            if key not in kinds:
                raise InvalidRequest(f"params.options.{key} is not a known option "
                                     f"(known: {', '.join(kinds)})")
            expected = kinds[key]
            if value is not None and (not isinstance(value, expected) or
                                      (expected != bool and isinstance(value, bool))):
                raise InvalidRequest(f"params.options.{key} has the wrong type")
        if options.get("timeout_s") is not None and options["timeout_s"] <= 0:
            raise InvalidRequest("params.options.timeout_s must be positive")
        return cls(**{k: v for k, v in options.items() if v is not None})


class Engine:
    """Serves encode requests for every registered model; thread-safe."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings()
        self.placement = Placement.resolve(self.settings.device, self.settings.dtype)
        self.registry = ModelRegistry(self.settings, self.placement)

    def start(self) -> None:
        """Load the default models (blocking)."""
        for name in self.registry.defaults:
            self.registry.get(name)

    def close(self) -> None:
        """Finish everything queued, then stop the workers."""
        self.registry.close()

    def submit(self, model: str, texts: Sequence[str], output_types: Sequence[str] | None = None,
               options: dict[str, Any] | EncodeOptions | None = None) -> Future:
        """Queue texts for encoding; the future resolves to one ItemResult per text, in order."""
        opts = options if isinstance(options, EncodeOptions) else EncodeOptions.parse(options)
        types = list(output_types) if output_types else ["dense"]
        handle = self.registry.get(model)
        m = handle.model
        m.check_output_types(types)
        if not texts:
            raise InvalidRequest("items must hold at least one item")
        slot = self._adapter_slot(handle, opts.lora_id)
        tok = m.prepare(list(texts), opts.is_query, opts.instruction)
        if not opts.truncate:
            for i, n in enumerate(tok.original_lengths):
                if n > m.max_tokens:
                    raise InputTooLong(f"items[{i}].text has {n} tokens; {model} takes at most "
                                       f"{m.max_tokens} (set options.truncate to true to cut it)")
        deadline = time.monotonic() + opts.timeout_s if opts.timeout_s else None
        request = Request(tok.ids, tok.original_lengths, frozenset(types), slot, deadline)
        handle.scheduler.submit(request)
        return request.future

    def encode(self, model: str, texts: Sequence[str], output_types: Sequence[str] | None = None,
               options: dict[str, Any] | EncodeOptions | None = None) -> list[ItemResult]:
        """Blocking encode."""
        return self.submit(model, texts, output_types, options).result()

    def _adapter_slot(self, handle, lora_id: str | None) -> int:
        if lora_id is None:
            return -1
        raise InvalidRequest(f"params.options.lora_id: LoRA adapters are not supported by this "
                             f"server version (asked for {lora_id!r})")
