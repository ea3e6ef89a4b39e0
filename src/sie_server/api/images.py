"""Image items on the wire, as SIE's SDK sends them: `{"images": [{"data", "format"}]}`.

`data` is the encoded file: msgpack bytes, or a standard base64 string in JSON bodies (a bare
value in place of the object is the data alone). `format` (optional) is a media token (`jpeg`,
`png`, `webp`, `gif`, `bmp`, `tiff`; `jpg` and `jpe` mean `jpeg`); it must name a supported
format, but the bytes decide how the image is decoded. One image per item, and an item holds
text or an image, not both. `ImageModel` is the shape (api/validate.py validates items with
it); `image_input` checks what a schema cannot: the base64, the size, the format. No decoding
here; the pixels are checked when the engine decodes them (runtime/images.py).
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Union

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

from ..errors import InvalidRequest
from ..runtime.images import FORMATS, ImageInput

MAX_IMAGE_BYTES = 32 * 1024 * 1024  # one encoded image
_ALIASES = {"jpg": "jpeg", "jpe": "jpeg"}

# bytes in msgpack, base64 text in JSON: one string in the document
ImageData = Annotated[Union[bytes, str], WithJsonSchema(
    {"type": "string", "description": "the encoded file: standard base64 in JSON, bytes in "
                                      "msgpack"})]


class ImageModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    data: ImageData
    format: str | None = Field(None, description="jpeg, png, webp, gif, bmp or tiff (jpg, jpe)")


ItemImages = Annotated[list[Union[ImageModel, ImageData]],
                       Field(min_length=1, max_length=1,
                             description="image models: one image per item")]


def image_input(images: list[ImageModel | bytes | str], text: str | None,
                field: str) -> ImageInput:
    """The image of a validated item (`images` holds one); InvalidRequest naming the field."""
    if text is not None:
        raise InvalidRequest(f"{field}: an item holds text or images, not both; send the text "
                             "and the image as two items")
    value, field = images[0], f"{field}.images[0]"
    image = value if isinstance(value, ImageModel) else ImageModel(data=value)
    data = image.data
    if isinstance(data, str):
        if len(data) > MAX_IMAGE_BYTES * 4 // 3 + 4:
            raise _too_large(field, len(data) * 3 // 4)
        try:
            data = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidRequest(f"{field}.data: a string must be standard base64") from None
    if not data:
        raise InvalidRequest(f"{field}.data is empty (0 bytes)")
    if len(data) > MAX_IMAGE_BYTES:
        raise _too_large(field, len(data))
    fmt = image.format
    if fmt is not None:
        fmt = _ALIASES.get(fmt.lower(), fmt.lower())
        if fmt not in FORMATS:
            raise InvalidRequest(f"{field}.format {image.format[:64]!r} is not supported "
                                 f"(supported: {', '.join(sorted(FORMATS))})")
    return ImageInput(bytes(data), fmt)


def _too_large(field: str, size: int) -> InvalidRequest:
    return InvalidRequest(f"{field}.data is {size} bytes; an image may have at most "
                          f"{MAX_IMAGE_BYTES} bytes")
