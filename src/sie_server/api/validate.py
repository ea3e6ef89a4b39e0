"""Turning SIE request bodies into engine calls; every error names the field at fault.

SIE's request options that the engine has no use for are settled here: `output_dtype` and
`normalize` shape the response (wire layer), `overflow_policy` maps to `truncate`; `profile`
goes on to the engine (engine/profiles.py); `smve` is refused as not supported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..errors import InvalidRequest, shown
from ..quantize import OUTPUT_DTYPES
from .images import ImageInput, parse_images

OUTPUT_TYPES = ("dense", "sparse", "multivector")
MAX_ID_CHARS = 1024
MAX_LORA_ID_CHARS = 512
OVERFLOW_POLICIES = ("default", "truncate_text", "error")
UNSUPPORTED_OPTIONS = ("smve",)


@dataclass(frozen=True)
class EncodeCall:
    texts: list[str | ImageInput]
    ids: list[str | None]
    output_types: list[str] | None  # None: the profile's, else dense
    options: dict[str, Any]  # engine options (engine.EncodeOptions) and `profile`
    output_dtype: str = "float32"
    normalize: bool = False  # L2-normalise dense vectors again (SIE's `normalize: true`)


@dataclass(frozen=True)
class ScoreCall:
    query: str | ImageInput
    query_id: str | None
    texts: list[str | ImageInput]
    ids: list[str | None]
    options: dict[str, Any]  # engine options (scoring.ScoreOptions)
    top_k: int | None


def _obj(value: Any, field: str) -> dict:
    if not isinstance(value, dict):
        raise InvalidRequest(f"{field} must be an object")
    return value


def _known(obj: dict, allowed: set[str], field: str) -> None:
    unknown = [k for k in obj if k not in allowed]
    if unknown:
        raise InvalidRequest(f"{field}.{shown(unknown[0])} is not a known field "
                             f"(known: {', '.join(sorted(allowed))})")


def parse_items(value: Any, field: str,
                max_items: int) -> tuple[list[str | ImageInput], list[str | None]]:
    """`[{"id"?, "text" | "images", "metadata"?}]` -> (texts or images, ids)."""
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


def parse_item(item: Any, field: str) -> tuple[str | ImageInput, str | None]:
    """An item's text, or its image (api/images.py), and its id."""
    item = _obj(item, field)
    _known(item, {"id", "text", "images", "metadata"}, field)
    item_id = item.get("id")
    if item_id is not None:
        if not isinstance(item_id, str):
            raise InvalidRequest(f"{field}.id must be a string")
        if len(item_id) > MAX_ID_CHARS:
            raise InvalidRequest(f"{field}.id is longer than {MAX_ID_CHARS} characters")
    if item.get("metadata") is not None and not isinstance(item["metadata"], dict):
        raise InvalidRequest(f"{field}.metadata must be an object")
    if item.get("images") is not None:
        return parse_images(item, field), item_id
    text = item.get("text")
    if text is None:
        raise InvalidRequest(f"{field}.text is missing")
    check_text(text, f"{field}.text")
    return text, item_id


def check_text(text: Any, field: str) -> None:
    """A string that UTF-8 can carry (JSON's "\\ud800" decodes to a lone surrogate)."""
    if not isinstance(text, str):
        raise InvalidRequest(f"{field} must be a string")
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidRequest(f"{field} is not valid Unicode (a lone surrogate)") from None


def parse_options(value: Any, field: str, instruction: Any = None) -> dict[str, Any]:
    """A request's options with SIE's wire-only keys settled (see the module docstring);
    what is left goes to the engine, which checks it. `instruction` (a top-level field of
    the request) wins over `options.instruction`."""
    options = dict(_obj(value if value is not None else {}, field))
    for key in UNSUPPORTED_OPTIONS:
        if options.get(key) is not None:
            raise InvalidRequest(f"{field}.{key} is not supported by this server")
        options.pop(key, None)
    policy = options.pop("overflow_policy", None)
    if policy is not None:
        if policy not in OVERFLOW_POLICIES:
            raise InvalidRequest(f"{field}.overflow_policy must be one of "
                                 f"{', '.join(OVERFLOW_POLICIES)}")
        if policy == "error":
            options["truncate"] = False
    lora = options.get("lora_id")
    if isinstance(lora, str) and len(lora) > MAX_LORA_ID_CHARS:
        raise InvalidRequest(f"{field}.lora_id is longer than {MAX_LORA_ID_CHARS} characters")
    if instruction is not None:
        if not isinstance(instruction, str):
            raise InvalidRequest("instruction must be a string")
        options["instruction"] = instruction
    return options


def _output_dtype(value: Any, field: str) -> str:
    if value is None:
        return "float32"
    if value not in OUTPUT_DTYPES:
        raise InvalidRequest(f"{field} must be one of {', '.join(OUTPUT_DTYPES)}")
    return value


def parse_encode(body: Any, max_items: int) -> EncodeCall:
    """`{"items": [Item], "params"?: {"output_types", "instruction", "output_dtype",
    "options"}}`."""
    body = _obj(body, "body")
    _known(body, {"items", "params"}, "body")
    if "items" not in body:
        raise InvalidRequest("items is missing")
    texts, ids = parse_items(body["items"], "items", max_items)
    params = _obj(body.get("params") or {}, "params")
    _known(params, {"output_types", "instruction", "output_dtype", "options"}, "params")
    types = params.get("output_types") or None
    if types is not None and (not isinstance(types, list)
                              or not all(isinstance(t, str) for t in types)):
        raise InvalidRequest("params.output_types must be a list of strings")
    for t in types or ():
        if t not in OUTPUT_TYPES:
            raise InvalidRequest(f"params.output_types: unknown output type {t[:64]!r}; "
                                 f"'output_types' entries must be one of {list(OUTPUT_TYPES)}")
    options = parse_options(params.get("options"), "params.options", params.get("instruction"))
    dtype = params.get("output_dtype") or options.get("output_dtype")
    dtype = _output_dtype(dtype, "params.output_dtype")
    options.pop("output_dtype", None)
    normalize = options.pop("normalize", None)
    if normalize not in (None, True, False):
        raise InvalidRequest("params.options.normalize must be a boolean")
    if normalize is False:
        raise InvalidRequest("params.options.normalize: false is not supported; this server "
                             "returns normalised vectors")
    return EncodeCall(texts, ids, types and list(dict.fromkeys(types)), options, dtype,
                      bool(normalize))


def parse_score(body: Any, max_items: int) -> ScoreCall:
    """`{"query": Item, "items": [Item], "instruction"?, "options"?, "top_k"?}`."""
    body = _obj(body, "body")
    _known(body, {"query", "items", "instruction", "options", "top_k"}, "body")
    if body.get("query") is None:
        raise InvalidRequest("query is missing")
    query, query_id = parse_item(body["query"], "query")
    if "items" not in body:
        raise InvalidRequest("items is missing")
    texts, ids = parse_items(body["items"], "items", max_items)
    options = parse_options(body.get("options"), "options", body.get("instruction"))
    top_k = body.get("top_k")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise InvalidRequest("top_k must be a positive integer")
    return ScoreCall(query, query_id, texts, ids, options, top_k)


def parse_timeout(value: Any, field: str) -> float:
    """A deadline in seconds: a finite number above 0."""
    try:
        seconds = float(value)
    except (TypeError, ValueError, OverflowError):
        raise InvalidRequest(f"{field} must be a number of seconds") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise InvalidRequest(f"{field} must be a finite number of seconds above 0")
    return seconds


MAX_EXTRACT_LABELS = 1000  # SIE's core/extract_cost.MAX_EXTRACT_LABELS
MAX_LABEL_CHARS = 128  # SIE's adapters/_prompt_limit.MAX_LABEL_CHARS
MAX_ITEM_TEXT_BYTES = 2 * 1024 * 1024  # SIE's types/inputs.DEFAULT_MAX_ITEM_TEXT_BYTES


@dataclass(frozen=True)
class ExtractCall:
    texts: list[str]
    ids: list[str | None]
    labels: list[str] | None
    options: dict[str, Any]  # engine options (engine.extract.ExtractOptions)


def parse_extract(body: Any, max_items: int) -> ExtractCall:
    """`{"items": [Item], "params"?: {"labels", "output_schema", "instruction", "options"}}`."""
    body = _obj(body, "body")
    _known(body, {"items", "params"}, "body")
    if "items" not in body:
        raise InvalidRequest("items is missing")
    texts, ids = parse_items(body["items"], "items", max_items)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise InvalidRequest(f"items[{i}].images: extraction here reads text; send items[{i}].text")
        if len(text) > MAX_ITEM_TEXT_BYTES // 4 and len(text.encode("utf-8")) > MAX_ITEM_TEXT_BYTES:
            raise InvalidRequest(f"items[{i}].text must hold at most {MAX_ITEM_TEXT_BYTES} bytes "
                                 "of UTF-8 text")
    params = _obj(body.get("params") or {}, "params")
    _known(params, {"labels", "output_schema", "instruction", "options"}, "params")
    if params.get("output_schema") is not None:
        raise InvalidRequest("params.output_schema: structured extraction is not served by "
                             "this server; send params.labels")
    labels = params.get("labels")
    if labels is not None:
        if not isinstance(labels, list):
            raise InvalidRequest("params.labels must be a list of strings")
        if len(labels) > MAX_EXTRACT_LABELS:
            raise InvalidRequest(f"params.labels must contain at most {MAX_EXTRACT_LABELS} labels")
        for i, label in enumerate(labels):
            check_text(label, f"params.labels[{i}]")
            if len(label) > MAX_LABEL_CHARS:
                raise InvalidRequest(f"params.labels[{i}] may have at most {MAX_LABEL_CHARS} "
                                     "characters")
    options = parse_options(params.get("options"), "params.options", params.get("instruction"))
    return ExtractCall(texts, ids, labels, options)  # type: ignore[arg-type]


# ------------------------------------------------------------------ the wire, as OpenAPI shows it
# The shapes of SIE's bodies for api/openapi.py. The functions above check the same fields by
# hand, with SIE's messages (which its SDK and tests rely on); these definitions describe them.

class ItemModel(BaseModel):
    model_config = ConfigDict(extra="forbid", title="Item")
    id: str | None = Field(None, max_length=MAX_ID_CHARS)
    text: str | None = None
    images: list[Any] | None = Field(None, description="image models: [{data, format}]")
    metadata: dict[str, Any] | None = None


class EncodeParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    output_types: list[Literal["dense", "sparse", "multivector"]] | None = None
    instruction: str | None = None
    output_dtype: Literal[OUTPUT_DTYPES] | None = None  # type: ignore[valid-type]
    options: dict[str, Any] | None = None


class EncodeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    items: list[ItemModel] = Field(min_length=1)
    params: EncodeParams | None = None


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    query: ItemModel
    items: list[ItemModel] = Field(min_length=1)
    instruction: str | None = None
    options: dict[str, Any] | None = None
    top_k: int | None = Field(None, ge=1)


class SIEUsage(BaseModel):
    input_tokens: int


class TimingInfo(BaseModel):
    """SIE's TimingInfo, milliseconds (engine/request.py Timing)."""
    total_ms: float
    queue_ms: float
    tokenization_ms: float
    inference_ms: float
    postprocessing_ms: float | None = None


class EncodeResponse(BaseModel):
    model: str
    items: list[dict[str, Any]] = Field(description="per item: id, dense / sparse / "
                                        "multivector, token_count, truncated")
    timing: TimingInfo | None = None
    usage: SIEUsage


class ScoreEntry(BaseModel):
    item_id: str
    score: float
    rank: int
    components: dict[str, float] | None = None


class ScoreResponse(BaseModel):
    model: str
    query_id: str | None
    score_mode: str
    scores: list[ScoreEntry]
    usage: SIEUsage
    score_weights: dict[str, float] | None = None
    activation: str | None = None
    timing: TimingInfo | None = None


class ErrorDetailModel(BaseModel):
    model_config = ConfigDict(extra="allow", title="SIEErrorDetail")
    code: str
    message: str


class SIEErrorResponse(BaseModel):
    detail: ErrorDetailModel


class ExtractParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    labels: list[str] | None = Field(None, max_length=MAX_EXTRACT_LABELS)
    output_schema: dict[str, Any] | None = Field(None, description="refused: not served here")
    instruction: str | None = None
    options: dict[str, Any] | None = None


class ExtractRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    items: list[ItemModel] = Field(min_length=1)
    params: ExtractParams | None = None


class ExtractResponse(BaseModel):
    model: str
    items: list[dict[str, Any]] = Field(description="per item: id, entities, relations, "
                                        "classifications, objects, data; error ({code, "
                                        "message}) for an item that could not be read")
    usage: SIEUsage
