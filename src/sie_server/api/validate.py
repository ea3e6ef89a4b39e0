"""SIE's request bodies: the pydantic definitions below validate them (strictly: `true` is no
integer, `5` no string) and are what /openapi.json shows; `validated` turns the first problem
into a 400 INVALID_INPUT naming the field. After them, code settles only what a schema cannot
say: an item holds text or an image, lone surrogates in its text and id, the per-request
item limit (a setting), an image's base64 and size (api/images.py), and SIE's request
options the engine has no use for: `output_dtype` shapes the response (wire layer),
`overflow_policy` maps to `truncate` (extract: it goes on as it is), `smve` is refused as not
supported. `profile` goes on to the engine (engine/profiles.py), as does the rest of
`options`, which the engine checks (engine/options.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError
from typing_extensions import TypedDict  # pydantic's TypedDict on Python < 3.12

from ..engine.extract import OVERFLOW_POLICIES
from ..errors import InvalidRequest, shown
from ..quantize import OUTPUT_DTYPES
from .images import ImageInput, ItemImages, image_input

OUTPUT_TYPES = ("dense", "sparse", "multivector")
MAX_ID_CHARS = 1024
MAX_LORA_ID_CHARS = 512
UNSUPPORTED_OPTIONS = ("smve",)
MAX_EXTRACT_LABELS = 1000  # SIE's core/extract_cost.MAX_EXTRACT_LABELS
MAX_LABEL_CHARS = 128  # SIE's adapters/_prompt_limit.MAX_LABEL_CHARS
MAX_ITEM_TEXT_BYTES = 2 * 1024 * 1024  # SIE's types/inputs.DEFAULT_MAX_ITEM_TEXT_BYTES


# ------------------------------------------------------------------ validation

def _unicode(text: str) -> str:
    """A string that UTF-8 can carry (JSON's "\\ud800" decodes to a lone surrogate)."""
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("not valid Unicode (a lone surrogate)") from None
    return text


def check_text(text: Any, field: str) -> None:
    """A string UTF-8 can carry, else InvalidRequest naming `field`."""
    if not isinstance(text, str):
        raise InvalidRequest(f"{field} must be a string")
    try:
        _unicode(text)
    except ValueError as exc:
        raise InvalidRequest(f"{field}: {exc}") from None


Text = Annotated[str, AfterValidator(_unicode)]


def validated(model: type[BaseModel], body: Any) -> Any:
    """`body` checked against a request definition (the one the OpenAPI spec is made of);
    the first problem becomes a 400 naming the field."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        # the most specific problem; a union's member names ("str", "list[str]") leave the path
        err = max(exc.errors(include_url=False), key=lambda e: len(e["loc"]))
        loc = [p for p in err["loc"] if not _member(p)]
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{shown(p)}"
                        for p in loc).lstrip(".")
        if err["type"] == "extra_forbidden":  # a top-level one named as SIE did: body.<key>
            where = f"body.{where}" if len(loc) == 1 else where
            raise InvalidRequest(f"{where} is not a known field") from None
        where = where or "body"
        if err["type"] == "missing":
            raise InvalidRequest(f"{where} is missing") from None
        message = err["msg"].removeprefix("Value error, ")
        raise InvalidRequest(f"{where}: {message}{_got(err.get('input'))}") from None


def _member(part: Any) -> bool:
    """A union member's tag in a pydantic error location (not a field name or index)."""
    return isinstance(part, str) and ("[" in part or part in (
        "str", "int", "float", "bool", "bytes", "dict", "list", "none") or part[:1].isupper())


def _got(value: Any) -> str:
    """What the client sent, as an error may echo it: a string cut to 64 characters, a
    number's or other scalar's type; nothing for objects and lists."""
    if isinstance(value, str):
        return f" (got {value[:64]!r})"
    if value is None or isinstance(value, (bool, int, float)):
        return f" (got {type(value).__name__})"
    return ""


# ------------------------------------------------------------------ the bodies

STRICT = ConfigDict(extra="forbid", strict=True)


class Item(TypedDict, total=False):
    """An item (a TypedDict: validated as a dict, several times faster than a model per
    item); `item_inputs` checks what its schema cannot."""
    __pydantic_config__ = STRICT  # type: ignore[misc]
    id: Annotated[str, Field(max_length=MAX_ID_CHARS)] | None
    text: Annotated[str | None, Field(description="an item holds text or images")]
    images: ItemImages | None
    metadata: dict[str, Any] | None


class EncodeParams(BaseModel):
    model_config = STRICT
    output_types: list[Literal[OUTPUT_TYPES]] | None = None  # type: ignore[valid-type]
    instruction: Text | None = None
    output_dtype: Literal[OUTPUT_DTYPES] | None = None  # type: ignore[valid-type]
    options: dict[str, Any] | None = None


class EncodeRequest(BaseModel):
    model_config = STRICT
    items: list[Item] = Field(min_length=1)
    params: EncodeParams | None = None


class ScoreRequest(BaseModel):
    model_config = STRICT
    query: Item
    items: list[Item] = Field(min_length=1)
    instruction: Text | None = None
    options: dict[str, Any] | None = None
    top_k: int | None = Field(None, ge=1)


Label = Annotated[str, Field(max_length=MAX_LABEL_CHARS), AfterValidator(_unicode)]


class ExtractParams(BaseModel):
    model_config = STRICT
    labels: list[Label] | None = Field(None, max_length=MAX_EXTRACT_LABELS)
    output_schema: dict[str, Any] | None = Field(None, description="refused: not served here")
    instruction: Text | None = None
    options: dict[str, Any] | None = None


class ExtractRequest(BaseModel):
    model_config = STRICT
    items: list[Item] = Field(min_length=1)
    params: ExtractParams | None = None


# ------------------------------------------------------------------ what a schema cannot say

@dataclass(frozen=True)
class EncodeCall:
    texts: list[str | ImageInput]
    ids: list[str | None]
    output_types: list[str] | None  # None: the profile's, else dense
    options: dict[str, Any]  # engine options (engine.EncodeOptions) and `profile`
    output_dtype: str = "float32"


@dataclass(frozen=True)
class ScoreCall:
    query: str | ImageInput
    query_id: str | None
    texts: list[str | ImageInput]
    ids: list[str | None]
    options: dict[str, Any]  # engine options (scoring.ScoreOptions)
    top_k: int | None


@dataclass(frozen=True)
class ExtractCall:
    texts: list[str]
    ids: list[str | None]
    labels: list[str] | None
    options: dict[str, Any]  # engine options (engine.extract.ExtractOptions)


def validated_items(model: type[BaseModel], body: Any, max_items: int) -> Any:
    """`validated`, refusing first (before reading them) more than `max_items` items."""
    items = body.get("items") if isinstance(body, dict) else None
    if isinstance(items, list) and len(items) > max_items:
        raise InvalidRequest(f"items holds {len(items)} items; at most {max_items} per request")
    return validated(model, body)


def item_input(item: Item, field: str) -> str | ImageInput:
    """A validated item's text (a string UTF-8 can carry), or its image (api/images.py)."""
    if item.get("id") is not None:
        check_text(item["id"], f"{field}.id")
    if item.get("images") is not None:
        return image_input(item["images"], item.get("text"), field)
    text = item.get("text")
    if text is None:
        raise InvalidRequest(f"{field}.text is missing")
    check_text(text, f"{field}.text")
    return text


def item_inputs(items: list[Item], field: str
                ) -> tuple[list[str | ImageInput], list[str | None]]:
    """Validated items -> (texts or images, ids). An ASCII text with an ASCII id or none (most
    items) needs no more checking; `item_input` checks the rest."""
    texts: list[str | ImageInput] = []
    ids = []
    for i, item in enumerate(items):
        text, item_id = item.get("text"), item.get("id")
        if (text is None or not text.isascii() or "images" in item
                or not (item_id is None or item_id.isascii())):
            text = item_input(item, f"{field}[{i}]")
        texts.append(text)
        ids.append(item_id)
    return texts, ids


def parse_options(value: dict[str, Any] | None, field: str,
                  instruction: str | None = None, policy_key: bool = False) -> dict[str, Any]:
    """A request's options with SIE's wire-only keys settled (see the module docstring);
    what is left goes to the engine, which checks it. `instruction` (a top-level field of
    the request) wins over `options.instruction`. `policy_key`: `overflow_policy` goes on to
    the engine as it is (extract: a model's own overflow rules), not as `truncate`."""
    options = dict(value or {})
    for key, option in options.items():  # strings the tokenizer and logs can carry
        check_text(key, f"{field}: an option's name")
        if isinstance(option, str):
            check_text(option, f"{field}.{shown(key)}")
    for key in UNSUPPORTED_OPTIONS:
        if options.get(key) is not None:
            raise InvalidRequest(f"{field}.{key} is not supported by this server")
        options.pop(key, None)
    policy = options.get("overflow_policy") if policy_key else options.pop("overflow_policy", None)
    if policy is not None:
        if policy not in OVERFLOW_POLICIES:
            raise InvalidRequest(f"{field}.overflow_policy must be one of "
                                 f"{', '.join(OVERFLOW_POLICIES)}")
        if policy == "error" and not policy_key:
            options["truncate"] = False
    lora = options.get("lora_id")
    if isinstance(lora, str) and len(lora) > MAX_LORA_ID_CHARS:
        raise InvalidRequest(f"{field}.lora_id is longer than {MAX_LORA_ID_CHARS} characters")
    if instruction is not None:
        options["instruction"] = instruction
    return options


def parse_encode(body: Any, max_items: int) -> EncodeCall:
    """An EncodeRequest -> EncodeCall; `params.options.output_dtype` stands in for
    `params.output_dtype`."""
    req = validated_items(EncodeRequest, body, max_items)
    texts, ids = item_inputs(req.items, "items")
    params = req.params or EncodeParams()
    options = parse_options(params.options, "params.options", params.instruction)
    dtype = params.output_dtype or options.get("output_dtype")
    if dtype is not None and dtype not in OUTPUT_DTYPES:
        raise InvalidRequest(f"params.output_dtype must be one of {', '.join(OUTPUT_DTYPES)}")
    options.pop("output_dtype", None)
    types = params.output_types or None
    return EncodeCall(texts, ids, types and list(dict.fromkeys(types)), options,
                      dtype or "float32")


def parse_score(body: Any, max_items: int) -> ScoreCall:
    """A ScoreRequest -> ScoreCall."""
    req = validated_items(ScoreRequest, body, max_items)
    texts, ids = item_inputs(req.items, "items")
    options = parse_options(req.options, "options", req.instruction)
    return ScoreCall(item_input(req.query, "query"), req.query.get("id"), texts, ids, options,
                     req.top_k)


def parse_extract(body: Any, max_items: int) -> ExtractCall:
    """An ExtractRequest -> ExtractCall: texts only (no images), each at most SIE's
    MAX_ITEM_TEXT_BYTES of UTF-8; `params.output_schema` is refused (not served)."""
    req = validated_items(ExtractRequest, body, max_items)
    texts, ids = item_inputs(req.items, "items")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise InvalidRequest(f"items[{i}].images: extraction here reads text; send items[{i}].text")
        if len(text) > MAX_ITEM_TEXT_BYTES // 4 and len(text.encode("utf-8")) > MAX_ITEM_TEXT_BYTES:
            raise InvalidRequest(f"items[{i}].text must hold at most {MAX_ITEM_TEXT_BYTES} bytes "
                                 "of UTF-8 text")
    params = req.params or ExtractParams()
    if params.output_schema is not None:
        raise InvalidRequest("params.output_schema: structured extraction is not served by "
                             "this server; send params.labels")
    options = parse_options(params.options, "params.options", params.instruction, policy_key=True)
    return ExtractCall(texts, ids, params.labels, options)  # type: ignore[arg-type]


def parse_timeout(value: Any, field: str) -> float:
    """A deadline in seconds: a finite number above 0."""
    try:
        seconds = float(value)
    except (TypeError, ValueError, OverflowError):
        raise InvalidRequest(f"{field} must be a number of seconds") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise InvalidRequest(f"{field} must be a finite number of seconds above 0")
    return seconds


# ------------------------------------------------------------------ responses, as OpenAPI shows them

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


class ExtractResponse(BaseModel):
    model: str
    items: list[dict[str, Any]] = Field(description="per item: id, entities, relations, "
                                        "classifications, objects, data; error ({code, "
                                        "message}) for an item that could not be read")
    usage: SIEUsage
