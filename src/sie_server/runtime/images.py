"""Images: bounded decoding and the model's own preprocessing (`preprocessor_config.json`).

Decoding reads the header first (`Image.open` is lazy) and refuses empty data, unknown formats,
unreadable (corrupt or zero-size) headers and anything over `MAX_IMAGE_PIXELS` before a pixel
is decoded, so a decompression bomb costs a header parse; truncated or corrupt data fails in
`load()`. Every refusal is an
`ImageError` whose message the engine prefixes with the item's field.

Preprocessing follows Hugging Face's CLIPImageProcessor / SiglipImageProcessor step by step:
convert to RGB, resize with Pillow (shortest edge to `size.shortest_edge`, or to
`size.height x size.width`) with the config's `resample`, center crop (`crop_size`) on the
host, giving uint8 patches (one row per patch, channel-row-column inside a patch) for the
vision tower's patch matmul; rescale and normalize with `image_mean` / `image_std`
(`normalize_patches`) run on the device in float32. Queued images so take 1 byte per value
(a 224 x 224 image 147 KiB) and cross to the device as bytes.
"""

from __future__ import annotations

import io
import json
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

# Largest image decoded, in pixels (width x height): 50 MP is a 8660 x 5773 photo; a 100 MP
# decompression bomb is refused from its header. Decoded, an image takes 3 bytes per pixel.
MAX_IMAGE_PIXELS = 50_000_000
# Images decoded at once in this process (each holds up to 3 bytes a pixel, and a copy while
# converting to RGB): so concurrent requests cannot add up to more than this many bombs' worth.
DECODE_SLOTS = threading.BoundedSemaphore(max(2, os.cpu_count() or 2))
# Wire `format` names -> Pillow's format names (the decoders allowed).
FORMATS = {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP", "gif": "GIF", "bmp": "BMP",
           "tiff": "TIFF"}
_PILLOW_FORMATS = tuple(sorted(set(FORMATS.values())))
_SIGNATURES = {b"\xff\xd8\xff": "jpeg", b"\x89PNG\r\n\x1a\n": "png", b"GIF87a": "gif",
               b"GIF89a": "gif", b"BM": "bmp", b"II*\x00": "tiff", b"MM\x00*": "tiff"}


def sniff(data: bytes) -> str | None:
    """The format the file's first bytes announce (None: none we decode)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return next((fmt for magic, fmt in _SIGNATURES.items() if data.startswith(magic)), None)


@dataclass(frozen=True)
class ImageInput:
    """One image item as it came on the wire: the encoded file and its declared format
    (a hint: the content decides; None when not given)."""

    data: bytes
    format: str | None = None


class ImageError(ValueError):
    """An image that cannot be used; the message says why."""


def decode(image: ImageInput, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """The image as RGB, or ImageError (empty, unknown format, zero size, too many pixels,
    corrupt or truncated)."""
    if not image.data:
        raise ImageError("is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we check below
            im = Image.open(io.BytesIO(image.data), formats=_PILLOW_FORMATS)
    except UnidentifiedImageError:
        fmt = sniff(image.data)
        if fmt is not None:  # Pillow never opens a 0 x 0 image: it lands here too
            raise ImageError(f"is a corrupt or zero-size {fmt} file (its header cannot be "
                             "read)") from None
        raise ImageError("is not an image in a supported format "
                         f"({', '.join(sorted(FORMATS))})") from None
    except Image.DecompressionBombError as exc:
        raise ImageError(f"is too large to decode ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - Pillow's header parsers raise many types
        raise ImageError(f"has a corrupt header ({type(exc).__name__})") from None
    width, height = im.size
    if width * height > max_pixels:
        raise ImageError(f"is {width} x {height} = {width * height / 1e6:.0f} megapixels; "
                         f"at most {max_pixels / 1e6:.0f} are decoded")
    try:
        im.load()
        return im if im.mode == "RGB" else im.convert("RGB")
    except Exception as exc:  # noqa: BLE001 - truncated/corrupt data: OSError, SyntaxError, ...
        raise ImageError(f"is corrupt or truncated ({type(exc).__name__}: {exc})") from None


@dataclass(frozen=True)
class ImageProcessor:
    """The steps of a CLIP / SigLIP `preprocessor_config.json`."""

    shortest_edge: int | None  # resize keeping the aspect ratio, or
    resize_to: tuple[int, int] | None  # (height, width)
    resample: int
    crop: tuple[int, int] | None  # (height, width)
    rescale: float | None
    mean: np.ndarray | None
    std: np.ndarray | None

    @classmethod
    def from_file(cls, path: Path) -> "ImageProcessor":
        c = json.loads(path.read_text())
        shortest, exact, crop = None, None, None
        if c.get("do_resize", True):
            size = c["size"]
            if isinstance(size, int) or "shortest_edge" in size:
                shortest = size if isinstance(size, int) else size["shortest_edge"]
            else:
                exact = (size["height"], size["width"])
        if c.get("do_center_crop", False):
            cs = c["crop_size"]
            crop = (cs, cs) if isinstance(cs, int) else (cs["height"], cs["width"])
            if shortest is not None and max(crop) > shortest:
                raise ValueError(f"{path}: crop_size {crop} exceeds the resize {shortest}")
        norm = c.get("do_normalize", True)
        return cls(shortest, exact, int(c.get("resample", Image.Resampling.BICUBIC)), crop,
                   c.get("rescale_factor", 1 / 255) if c.get("do_rescale", True) else None,
                   np.asarray(c["image_mean"], np.float32) if norm else None,
                   np.asarray(c["image_std"], np.float32) if norm else None)

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        """(height, width) of the processed image."""
        if self.crop is not None:
            return self.crop
        if self.resize_to is not None:
            return self.resize_to
        return self._shortest(width, height)[::-1]

    def _shortest(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) with the short edge at `shortest_edge` (the long one truncated)."""
        short, long = sorted((width, height))
        s, lg = self.shortest_edge, int(self.shortest_edge * long / short)
        return (s, lg) if width <= height else (lg, s)

    def __call__(self, im: Image.Image) -> np.ndarray:
        """(3, height, width) uint8 pixels of an RGB image, resized and cropped."""
        if self.shortest_edge is not None:
            im = im.resize(self._shortest(*im.size), resample=self.resample)
        elif self.resize_to is not None:
            im = im.resize(self.resize_to[::-1], resample=self.resample)
        x = np.asarray(im)
        if self.crop is not None:
            h, w = self.crop
            top, left = (x.shape[0] - h) // 2, (x.shape[1] - w) // 2
            x = x[top:top + h, left:left + w]
        return np.ascontiguousarray(x.transpose(2, 0, 1))

    def normalize_patches(self, x: torch.Tensor, patch: int) -> torch.Tensor:
        """Rescale and normalize uint8 patches (..., 3*p*p), channel-major, in float32."""
        x = x.float()
        if self.rescale is not None:
            x = x * self.rescale
        if self.mean is not None:
            per_value = lambda v: torch.from_numpy(np.repeat(v, patch * patch)).to(x.device)  # noqa: E731
            x = (x - per_value(self.mean)) / per_value(self.std)
        return x


def to_patches(pixels: np.ndarray, patch: int) -> np.ndarray:
    """(C, H, W) -> (H//p * W//p, C*p*p): row-major patches, each flattened channel, row,
    column (the layout of a Conv2d weight (out, C, p, p) flattened). Edge pixels that fill no
    whole patch are dropped, as the stride-p convolution drops them (SigLIP so400m: 384 px in
    14 px patches)."""
    c, h, w = pixels.shape
    gh, gw = h // patch, w // patch
    x = pixels[:, :gh * patch, :gw * patch].reshape(c, gh, patch, gw, patch)
    return np.ascontiguousarray(x.transpose(1, 3, 0, 2, 4).reshape(gh * gw, c * patch * patch))
