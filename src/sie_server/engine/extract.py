"""Options of /v1/extract requests, checked before anything is queued.

SIE's extract options (its GLiNER and NLI adapters): `threshold`, `flat_ner`, `multi_label`,
`merge_adjacent_entities` (GLiNER), `multi_label` and `hypothesis_template` (zero-shot
classification); GLiClass: `classification_type` (single-label or multi-label), `threshold`,
`overflow_policy` (SIE's `default`, `truncate_text` or `error`: what a text too long for the
window gets) and the request's `instruction`; `lora_id` as for encode. A model's own defaults apply to what
a request leaves out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from ..errors import InvalidRequest
from .options import check_options

OVERFLOW_POLICIES = ("default", "truncate_text", "error")  # SIE's; None = "default"
CLASSIFICATION_TYPES = ("single-label", "multi-label")  # GLiClass's


def check_values(options: Mapping[str, Any], prefix: str) -> None:
    """The value checks of extract's options, a request's (`prefix` "params.options.") or a
    profile's (engine/profiles.py); InvalidRequest names the option after `prefix`."""
    threshold = options.get("threshold")
    if threshold is not None and not (math.isfinite(float(threshold)) and 0 <= threshold <= 1):
        raise InvalidRequest(f"{prefix}threshold must be a finite number between 0 and 1")
    template = options.get("hypothesis_template")
    if template is not None and template.count("{}") != 1:
        raise InvalidRequest(f"{prefix}hypothesis_template must hold '{{}}' once, where the "
                             "label goes")
    kind = options.get("classification_type")
    if kind is not None and kind not in CLASSIFICATION_TYPES:
        raise InvalidRequest(f"{prefix}classification_type must be 'single-label' or "
                             "'multi-label'")


@dataclass(frozen=True)
class ExtractOptions:
    threshold: float | None = None
    flat_ner: bool | None = None
    multi_label: bool | None = None
    hypothesis_template: str | None = None
    merge_adjacent_entities: bool | None = None
    lora_id: str | None = None
    timeout_s: float | None = None
    classification_type: str | None = None
    instruction: str | None = None
    overflow_policy: str | None = None
    # the loaded adapter of lora_id (runtime.lora.LoraAdapter), set by the engine: a family
    # running heads after the batch (GLiNER, GLiClass) applies its head updates from it
    adapter: Any = None

    @classmethod
    def parse(cls, options: dict[str, Any] | None) -> "ExtractOptions":
        kinds = {"threshold": (int, float), "flat_ner": bool, "multi_label": bool,
                 "hypothesis_template": str, "merge_adjacent_entities": bool,
                 "lora_id": str, "timeout_s": (int, float),
                 "relation_labels": list, "relation_threshold": (int, float),
                 "instruction": str, "classification_type": str, "overflow_policy": str}
        options = check_options(options, kinds, "params.options")
        if options.get("relation_labels"):
            raise InvalidRequest("params.options.relation_labels: this model does not extract "
                                 "relations; relations need a joint entity-relation model")
        check_values(options, "params.options.")
        policy = options.get("overflow_policy")
        if policy is not None and policy not in OVERFLOW_POLICIES:
            raise InvalidRequest("params.options.overflow_policy must be one of "
                                 f"{', '.join(OVERFLOW_POLICIES)}")
        return cls(**{k: v for k, v in options.items()
                      if v is not None and k in cls.__dataclass_fields__})
