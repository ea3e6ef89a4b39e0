"""Test inputs and the transformers reference for the CLIP / SigLIP tests.

Images are made here (noise, gradients, several modes and formats, odd sizes); the reference
decodes the same bytes with Pillow and runs transformers' own processors and
`get_text_features` / `get_image_features`, L2-normalised.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# SigLIP's hub processors have no do_convert_rgb: they are fed RGB images, so the non-RGB
# inputs below are compared for CLIP (whose processor converts) and converted for SigLIP.


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def make_images() -> list[tuple[bytes, str]]:
    """(encoded bytes, wire format) of test images in several sizes, modes and formats."""
    rng = np.random.default_rng(7)
    noise = lambda h, w: Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))  # noqa: E731
    yy, xx = np.mgrid[0:240, 0:320]
    gradient = Image.fromarray(np.stack([xx * 255 // 319, yy * 255 // 239, (xx + yy) % 256],
                                        -1).astype(np.uint8))
    return [
        (_encode(noise(300, 200), "PNG"), "png"),
        (_encode(gradient, "JPEG", quality=90), "jpeg"),
        (_encode(noise(97, 413), "PNG"), "png"),  # wide and small: upscaled
        (_encode(noise(224, 224), "WEBP", lossless=True), "webp"),
        (_encode(gradient.convert("L"), "PNG"), "png"),  # grayscale
        (_encode(noise(64, 128).convert("RGBA"), "PNG"), "png"),
        (_encode(gradient.convert("P"), "GIF"), "gif"),
        (_encode(noise(50, 60), "BMP"), "bmp"),
        (_encode(noise(500, 333), "TIFF"), "tiff"),
    ]


def decoded(images: list[tuple[bytes, str]]) -> list[Image.Image]:
    """The images as Pillow opens them (the reference's input), converted to RGB."""
    return [Image.open(io.BytesIO(data)).convert("RGB") for data, _ in images]


def bomb_png(width: int = 10_000, height: int = 10_000) -> bytes:
    """A real PNG of width x height black RGB pixels (100 MP by default: 300 MB decoded),
    compressed to a few hundred KB; built row by row so making it takes no memory."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    z = zlib.compressobj(9)
    row = bytes(1 + 3 * width)  # filter byte + pixels
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def bad_images() -> list[tuple[str, bytes, str | None, str]]:
    """(case, bytes, wire format, what the error says) for images that must be refused."""
    good = make_images()[0][0]
    return [
        ("empty", b"", "png", "empty"),
        ("corrupt", b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, "png", "corrupt"),
        ("truncated", good[: len(good) // 2], "png", "corrupt or truncated"),
        ("not-an-image", b"hello, this is text and not an image", "jpeg", "not an image"),
        ("zero-size", bomb_png(0, 16), "png", "corrupt or zero-size png"),
        ("bomb", bomb_png(), "png", "megapixels"),
        ("unsupported", _encode(Image.new("RGB", (16, 16)), "ICO"), None, "supported format"),
    ]


class Reference:
    """transformers' CLIPModel / SiglipModel with their processors on a folder."""

    def __init__(self, family: str, folder: Path) -> None:
        from transformers import CLIPModel, CLIPProcessor, SiglipModel, SiglipProcessor

        self.family = family
        model_cls, proc_cls = (CLIPModel, CLIPProcessor) if family == "clip" else \
            (SiglipModel, SiglipProcessor)
        self.model = model_cls.from_pretrained(folder).eval()
        self.processor = proc_cls.from_pretrained(folder)

    @torch.no_grad()
    def texts(self, texts: list[str]) -> np.ndarray:
        padding = True if self.family == "clip" else "max_length"
        inputs = self.processor(text=texts, padding=padding, truncation=True, return_tensors="pt",
                                max_length=77 if self.family == "clip" else 64)
        return _norm(self.model.get_text_features(**inputs))

    @torch.no_grad()
    def images(self, images: list[Image.Image]) -> np.ndarray:
        pixels = self.processor(images=images, return_tensors="pt").pixel_values
        return _norm(self.model.get_image_features(pixel_values=pixels))


def _norm(t: torch.Tensor) -> np.ndarray:
    return torch.nn.functional.normalize(t.float(), dim=-1).numpy()
