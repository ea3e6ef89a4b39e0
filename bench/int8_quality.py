"""int8 quality beside the int8 peers, on all-MiniLM-L6-v2 (what `bench.run` times):

    PYTHONPATH=src python -m bench.int8_quality            # JSON on stdout

Each path's dense vectors against its own float32 on every text of tests/texts.py (91 texts,
13+ languages, one-token and awkward inputs): min and mean cosine, how many texts fall under
0.99 (#25's bar), the worst text; and the Pearson correlation with human similarity on gensim's
Lee corpus (1,225 pairs; all-MiniLM-L6-v2's float32: 0.656) beside its float32's.
- `engine_int8`: `--dtype int8` against the engine in float32. Its weights take the full 8
  bits where this CPU's int8 kernel is exact, and pair-bounded ones where it saturates (no
  VNNI; runtime/int8.py `weight_rule`), so run it again under `ONEDNN_MAX_CPU_ISA=AVX2` to see
  a CPU without VNNI.
- `ort_int8`, `ort_int8_7bit`: onnxruntime's dynamic int8 of the ONNX export (bench.cpu_peers),
  as `bench.run` times it and with `reduce_range` (7-bit weights, onnxruntime's advice for
  CPUs without VNNI), against onnxruntime float32 on the same export. onnxruntime reads the
  CPU itself (no cap holds it), so both run exact here; on a CPU without VNNI the 8-bit one
  would saturate.
- `openvino_int8`: NNCF's static int8, calibrated as `bench.run` does, against the same
  onnxruntime float32.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from . import cpu_peers
from .corpus import load_tokenizer
from .models import minilm_folder
from .roofline import cpu_flags, cpu_model, cpuid_masked, isa_caps
from .run import torch_threads, versions

REPO = Path(__file__).resolve().parent.parent
MAX_LENGTH = 256  # all-MiniLM-L6-v2's sentence-transformers limit, as bench.run cuts


def compare(vecs: np.ndarray, ref: np.ndarray, texts: list[str]) -> dict:
    cos = (vecs * ref).sum(1) / (np.linalg.norm(vecs, axis=1) * np.linalg.norm(ref, axis=1))
    return {"min_cosine": round(float(cos.min()), 4), "mean_cosine": round(float(cos.mean()), 4),
            "texts_under_0.99": int((cos < 0.99).sum()),
            "worst_text": texts[int(cos.argmin())][:40]}


def engine_encoder(folder: Path, dtype: str):
    from sie_server.config import Settings
    from sie_server.engine import Engine

    eng = Engine(Settings(models={"m": str(folder)}, default_models=[], device="cpu",
                          dtype=dtype))
    return lambda texts: np.stack([r.dense for r in eng.encode("m", texts, ["dense"])])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache-dir", type=Path, default=REPO / ".cache" / "bench")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    sys.path.insert(0, str(REPO / "tests"))
    from reference import lee_corpus, lee_pearson
    from texts import TEXTS

    from sie_server.runtime.int8 import weight_rule

    folder = minilm_folder()
    lee = lee_corpus()
    threads = torch_threads()
    calibration = cpu_peers.calibration_texts(load_tokenizer(folder / "tokenizer.json"), 64,
                                              a.seed + 1)
    encoders = {
        "engine_float32": engine_encoder(folder, "float32"),
        "engine_int8": engine_encoder(folder, "int8"),
        "ort_float32": cpu_peers.OrtPeer(folder, MAX_LENGTH, threads),
        "ort_int8": cpu_peers.OrtPeer(folder, MAX_LENGTH, threads, int8_dir=a.cache_dir),
        "ort_int8_7bit": cpu_peers.OrtPeer(folder, MAX_LENGTH, threads, int8_dir=a.cache_dir,
                                           reduce_range=True),
        "openvino_int8": cpu_peers.OpenVinoPeer(folder, MAX_LENGTH, threads,
                                                calibration=calibration),
    }
    refs = {"engine_int8": "engine_float32", "ort_int8": "ort_float32",
            "ort_int8_7bit": "ort_float32", "openvino_int8": "ort_float32"}

    def encode(name: str, texts: list[str]) -> np.ndarray:
        enc = encoders[name]
        return enc(texts) if callable(enc) else enc.run(texts)[1]

    vecs = {name: encode(name, TEXTS) for name in encoders}
    lee_r = {name: lee_pearson(encode(name, lee[0]), lee[1]) for name in encoders} if lee else {}
    out = {"cpu_model": cpu_model(), "flags": cpu_flags(), "cpuid_masked": cpuid_masked(),
           "isa_caps": isa_caps(),
           "versions": versions(), "threads": threads,
           "engine_int8_weight_rule": weight_rule(), "texts": len(TEXTS), "paths": {}}
    for name, ref in refs.items():
        row = {"against": ref, **compare(vecs[name], vecs[ref], TEXTS)}
        if lee_r:
            row |= {"lee_pearson": round(lee_r[name], 4), "lee_pearson_ref": round(lee_r[ref], 4)}
        out["paths"][name] = row
    print(json.dumps(out, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
