"""Image embedding benchmark: the engine vs the transformers loop on one CLIP model.

    PYTHONPATH=src python -m bench.images --device cpu            # one run, JSON on stdout

Model: openai/clip-vit-base-patch32's shape (ViT-B/32 vision tower, 12-layer text tower) with
random weights (speed does not depend on weight values), built by
scripts/make_clip_test_models.py into .cache/bench/clip-b32. Corpus: N encoded JPEGs of
photo-like sizes (640x480, 480x640, 1024x768, 800x800), made here, seeded. Both paths start
from the encoded bytes and include decoding and preprocessing:
- `engine_inprocess`: `Engine.submit` from `--clients` closed-loop threads, `--request-size`
  images per request (images of concurrent requests share vision-tower batches);
- `transformers_loop`: Pillow decode, CLIPProcessor (the slow, Pillow-based image processor),
  `CLIPModel.get_image_features` under inference_mode, batches of 32, in corpus order.
Prints images/s of each, their ratio, and the minimum cosine between the two paths' vectors.
With `--adapters K`: also `engine_lora`, the engine load again with K peft LoRA adapters
(rank `--lora-rank`, every linear of both towers, made here), request i using adapter i mod K,
and its ratio to the engine without adapters.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SIZES = [(640, 480), (480, 640), (1024, 768), (800, 800)]


def corpus(n: int, seed: int = 0) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        small = rng.integers(0, 256, (h // 16, w // 16, 3), dtype=np.uint8)  # blocky, photo-ish
        im = Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def model_folder(cache: Path) -> Path:
    folder = cache / "clip-b32"
    if not (folder / "model.safetensors").exists():
        sys.path.insert(0, str(REPO / "scripts"))
        sys.path.insert(0, str(REPO / "tests"))
        from make_clip_test_models import build_clip
        from texts import SHORT_TEXTS

        build_clip(folder, SHORT_TEXTS, full_size=True)
    return folder


def make_adapters(folder: Path, root: Path, count: int, rank: int) -> list[str]:
    """`count` peft adapters on every linear of both towers (random non-zero B), in root."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import CLIPModel

    ids = []
    for k in range(count):
        torch.manual_seed(k)
        model = get_peft_model(CLIPModel.from_pretrained(folder), LoraConfig(
            r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "k_proj", "v_proj",
                                                          "out_proj", "fc1", "fc2"]))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0.0, 0.02)
        model.save_pretrained(str(root / f"clip-lora-{k}"))
        ids.append(f"clip-lora-{k}")
    return ids


def run_engine(folder: Path, data: list[bytes], device: str, clients: int, size: int,
               adapters: Path | None = None, ids: list[str] = ()):
    """With `ids`: request i uses adapter ids[i % len(ids)] (from the root `adapters`)."""
    from sie_server.config import Settings
    from sie_server.engine import Engine
    from sie_server.runtime.images import ImageInput

    eng = Engine(Settings(models={"clip": str(folder)}, default_models=[], device=device,
                          adapter_roots=[adapters] if adapters else []))
    items = [ImageInput(d, "jpeg") for d in data]
    requests = [items[i:i + size] for i in range(0, len(items), size)]
    options = [{"lora_id": ids[i % len(ids)]} if ids else None for i in range(len(requests))]
    try:
        eng.encode("clip", items[:size])  # load + warm
        for lora_id in ids:
            eng.encode("clip", items[:1], None, {"lora_id": lora_id})
        started = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            results = list(pool.map(lambda i: eng.submit("clip", requests[i], None,
                                                         options[i]).result(),
                                    range(len(requests))))
        wall = time.perf_counter() - started
    finally:
        eng.close()
    return wall, np.stack([r.dense for rs in results for r in rs])


def run_transformers(folder: Path, data: list[bytes], device: str, batch: int = 32):
    import torch
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPModel

    model = CLIPModel.from_pretrained(folder).eval().to(device)
    proc = CLIPImageProcessor.from_pretrained(folder)

    def encode(chunk: list[bytes]) -> np.ndarray:
        images = [Image.open(io.BytesIO(d)).convert("RGB") for d in chunk]
        with torch.inference_mode():
            pixels = proc(images=images, return_tensors="pt").pixel_values.to(device)
            out = model.get_image_features(pixel_values=pixels)
        return torch.nn.functional.normalize(out.float(), dim=-1).cpu().numpy()

    encode(data[:batch])  # warm
    started = time.perf_counter()
    vectors = np.concatenate([encode(data[i:i + batch]) for i in range(0, len(data), batch)])
    return time.perf_counter() - started, vectors


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.images", description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--request-size", type=int, default=8)
    ap.add_argument("--cache", type=Path, default=REPO / ".cache" / "bench")
    ap.add_argument("--quick", action="store_true", help="16 images (a dry run)")
    ap.add_argument("--adapters", type=int, default=0, help="also run with K LoRA adapters")
    ap.add_argument("--lora-rank", type=int, default=16)
    args = ap.parse_args(argv)
    folder = model_folder(args.cache)
    data = corpus(16 if args.quick else args.images)
    ref_s, ref = run_transformers(folder, data, args.device)
    eng_s, got = run_engine(folder, data, args.device, args.clients, args.request_size)
    n = len(data)
    lora = {}
    if args.adapters:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            ids = make_adapters(folder, Path(tmp), args.adapters, args.lora_rank)
            lora_s, _ = run_engine(folder, data, args.device, args.clients, args.request_size,
                                   Path(tmp), ids)
        lora = {"engine_lora": {"adapters": args.adapters, "rank": args.lora_rank,
                                "wall_s": round(lora_s, 3), "images_per_s": round(n / lora_s, 2),
                                "vs_engine": round(eng_s / lora_s, 2)}}
    print(json.dumps({
        "model": "clip-vit-base-patch32 shape, random weights", "device": args.device,
        "images": n, "clients": args.clients, "request_size": args.request_size,
        "engine_inprocess": {"wall_s": round(eng_s, 3), "images_per_s": round(n / eng_s, 2)},
        "transformers_loop": {"wall_s": round(ref_s, 3), "images_per_s": round(n / ref_s, 2)},
        "speedup": round(ref_s / eng_s, 2),
        "cosine_min": float((got * ref).sum(1).min()),
        **lora,
    }, indent=2))


if __name__ == "__main__":
    main()
