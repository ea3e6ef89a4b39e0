"""Image items on the wire, as SIE's SDK sends them: `{"images": [{"data", "format"}]}`.

`data` is the encoded file: msgpack bytes, or a standard base64 string in JSON bodies.
`format` (optional) is a media token (`jpeg`, `png`, `webp`, `gif`, `bmp`, `tiff`; `jpg` and
`jpe` mean `jpeg`); it must name a supported format, but the bytes decide how the image is
decoded. One image per item, and an item holds text or an image, not both. These checks cost
no decoding; the pixels are checked when the engine decodes them (runtime/images.py).
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from ..errors import InvalidRequest, shown
from ..runtime.images import FORMATS, ImageInput

MAX_IMAGE_BYTES = 32 * 1024 * 1024  # one encoded image
_ALIASES = {"jpg": "jpeg", "jpe": "jpeg"}


def parse_images(item: dict, field: str) -> ImageInput:
    """The image of an item dict that has `images`; InvalidRequest naming the field."""
    images = item["images"]
    if item.get("text") is not None:
        raise InvalidRequest(f"{field}: an item holds text or images, not both; send the text "
                             "and the image as two items")
    if not isinstance(images, list) or not images:
        raise InvalidRequest(f"{field}.images must be a list holding one image")
    if len(images) > 1:
        raise InvalidRequest(f"{field}.images holds {len(images)} images; one image per item "
                             "(send each image as its own item)")
    return _image(images[0], f"{field}.images[0]")


def _image(value: Any, field: str) -> ImageInput:
    if isinstance(value, (bytes, str)):  # a bare value: the data alone
        value = {"data": value}
    if not isinstance(value, dict):
        raise InvalidRequest(f"{field} must be an object {{\"data\": bytes, \"format\": str}}")
    unknown = [k for k in value if k not in ("data", "format")]
    if unknown:
        raise InvalidRequest(f"{field}.{shown(unknown[0])} is not a known field")
    data = value.get("data")
    if isinstance(data, str):
        if len(data) > MAX_IMAGE_BYTES * 4 // 3 + 4:
            raise _too_large(field, len(data) * 3 // 4)
        try:
            data = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidRequest(f"{field}.data: a string must be standard base64") from None
    if not isinstance(data, (bytes, bytearray)):
        raise InvalidRequest(f"{field}.data is missing or not bytes (base64 in JSON)")
    if not data:
        raise InvalidRequest(f"{field}.data is empty (0 bytes)")
    if len(data) > MAX_IMAGE_BYTES:
        raise _too_large(field, len(data))
    fmt = value.get("format")
    if fmt is not None:
        if not isinstance(fmt, str):
            raise InvalidRequest(f"{field}.format must be a string")
        fmt = _ALIASES.get(fmt.lower(), fmt.lower())
        if fmt not in FORMATS:
            raise InvalidRequest(f"{field}.format {value['format']!r} is not supported "
                                 f"(supported: {', '.join(sorted(FORMATS))})")
    return ImageInput(bytes(data), fmt)


def _too_large(field: str, size: int) -> InvalidRequest:
    return InvalidRequest(f"{field}.data is {size} bytes; an image may have at most "
                          f"{MAX_IMAGE_BYTES} bytes")
