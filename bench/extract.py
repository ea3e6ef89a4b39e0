"""Entity extraction benchmark: the engine vs gliner's own batched loop on one GLiNER model.

    PYTHONPATH=src python -m bench.extract --device cpu           # one run, JSON on stdout

Model: a GLiNER uni-encoder span checkpoint with random weights (speed does not depend on
weight values) built by scripts/make_gliner_test_models.py into the cache folder: `--size
small` (hidden 256, 4 layers; for CPUs) or `base` (hidden 768, 12 layers: gliner_multi-v2.1's
mDeBERTa-v3-base shape). Corpus: the multilingual passages of the bge-m3-lite data package
(each under the model's 384-word window, so both paths read the same words), five labels.
- `engine_inprocess`: `Engine.submit_extract` from `--clients` closed-loop threads,
  `--request-size` texts per request (rows of concurrent requests share token-budget batches);
- `gliner_batch_predict`: `GLiNER.batch_predict_entities` (= `inference`, batch size 8, its
  default) over the corpus in order, under inference_mode.
Prints texts/s of each, their ratio, and how many entities the two paths agree on.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LABELS = ["person", "organization", "location", "date", "event"]
SIZES = {"small": (256, 4), "base": (768, 12)}


def model_folder(cache: Path, size: str) -> Path:
    folder = cache / f"gliner-{size}"
    if not (folder / "gliner_config.json").exists():
        sys.path.insert(0, str(REPO / "scripts"))
        from make_gliner_test_models import build

        hidden, layers = SIZES[size]
        build(folder, "deberta", hidden=hidden, layers=layers)
    return folder


def corpus(n: int) -> list[str]:
    sys.path.insert(0, str(REPO / "tests"))
    from texts import miracl_passages

    passages = [p for p in miracl_passages() if len(p.split()) < 300]
    return [passages[i % len(passages)] for i in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--texts", type=int, default=128)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--request-size", type=int, default=8)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--cache", type=Path, default=REPO / ".cache" / "bench")
    parser.add_argument("--quick", action="store_true", help="16 texts, the small model")
    args = parser.parse_args()
    if args.quick:
        args.texts, args.size = 16, "small"
    import torch
    from gliner import GLiNER

    from sie_server.config import Settings
    from sie_server.engine import Engine

    folder = model_folder(args.cache, args.size)
    texts = corpus(args.texts)
    options = {"threshold": 0.5}
    engine = Engine(Settings(device=args.device, dtype=args.dtype, default_models=[],
                             models={"gliner": str(folder)}))
    engine.extract("gliner", texts[:4], LABELS, options)  # load and warm up
    requests = [texts[i:i + args.request_size] for i in range(0, len(texts), args.request_size)]
    started = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as pool:
        ours = [r for part in pool.map(lambda t: engine.extract("gliner", t, LABELS, options)[0],
                                       requests) for r in part]
    engine_s = time.perf_counter() - started
    engine.close()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = GLiNER.from_pretrained(str(folder), local_files_only=True).to(args.device)
        if args.dtype in ("bfloat16", "float16"):
            ref = ref.to(dtype=getattr(torch, args.dtype))
        with torch.inference_mode():
            ref.batch_predict_entities(texts[:4], LABELS, threshold=0.5)
            started = time.perf_counter()
            theirs = ref.batch_predict_entities(texts, LABELS, threshold=0.5)
            ref_s = time.perf_counter() - started
    key = lambda e: (e["start"], e["end"], e["label"])  # noqa: E731
    same = sum(len({key(e) for e in o["entities"]} & {key(e) for e in t})
               for o, t in zip(ours, theirs))
    total = sum(len(t) for t in theirs)
    print(json.dumps({
        "model": f"gliner {args.size} (random weights)", "device": args.device,
        "dtype": args.dtype, "texts": len(texts), "labels": len(LABELS),
        "engine_inprocess_texts_s": round(len(texts) / engine_s, 2),
        "gliner_batch_predict_texts_s": round(len(texts) / ref_s, 2),
        "ratio": round(ref_s / engine_s, 2),
        "entities_agreeing": f"{same}/{total}",
    }, indent=2))


if __name__ == "__main__":
    main()
