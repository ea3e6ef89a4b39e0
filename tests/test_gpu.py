"""CUDA execution (packed varlen attention, bf16/fp16) against the fp32 CPU engine, which
tests/test_equivalence.py proves equal to FlagEmbedding. Skipped where there is no GPU.

Stated tolerances for half precision on GPU (the fp32 tolerances of issue 2 hold on CPU):
dense cosine >= 0.999; multivector rows: same count, mean cosine >= 0.995; sparse: weights
within 0.02 on shared ids, and the id sets differ only in weights below 0.02 (near-zero
weights can flip sign in bf16). fp32 on CUDA keeps the issue-2 tolerances.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from texts import OVER_LIMIT_TEXTS, SHORT_TEXTS

from sie_server.config import Settings
from sie_server.engine import Engine

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

ALL = ["dense", "sparse", "multivector"]
TEXTS = SHORT_TEXTS + OVER_LIMIT_TEXTS


def encode(folder: Path, device: str, dtype: str = "auto") -> list:
    eng = Engine(Settings(models={"BAAI/bge-m3": str(folder)}, default_models=[],
                          device=device, dtype=dtype))
    try:
        return eng.encode("BAAI/bge-m3", TEXTS, ALL)
    finally:
        eng.close()


@pytest.fixture(scope="module")
def cpu_fp32(bge_m3_dir: Path) -> list:
    return encode(bge_m3_dir, "cpu")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_on_cuda_within_stated_tolerances(bge_m3_dir, cpu_fp32, dtype) -> None:
    for i, (g, c) in enumerate(zip(encode(bge_m3_dir, "cuda", dtype), cpu_fp32)):
        assert g.token_count == c.token_count
        assert float(g.dense @ c.dense) >= 0.999, f"text {i} dense"
        assert g.multivector.shape == c.multivector.shape
        assert float((g.multivector * c.multivector).sum(1).mean()) >= 0.995, f"text {i} mv"
        gs, cs = dict(zip(*map(np.ndarray.tolist, g.sparse))), dict(zip(*map(np.ndarray.tolist, c.sparse)))
        for k in gs.keys() & cs.keys():
            assert abs(gs[k] - cs[k]) <= 0.02, f"text {i} sparse id {k}"
        for k in gs.keys() ^ cs.keys():
            assert max(gs.get(k, 0), cs.get(k, 0)) <= 0.02, f"text {i} sparse id {k} only on one side"


def test_fp32_on_cuda_keeps_the_cpu_tolerances(bge_m3_dir, cpu_fp32) -> None:
    for i, (g, c) in enumerate(zip(encode(bge_m3_dir, "cuda", "float32"), cpu_fp32)):
        assert float(g.dense @ c.dense) >= 0.99999, f"text {i}"
        assert np.abs(g.multivector - c.multivector).max() <= 1e-4, f"text {i}"
        np.testing.assert_array_equal(g.sparse[0], c.sparse[0])
        assert np.abs(g.sparse[1] - c.sparse[1]).max() <= 1e-4


def test_batches_of_8192_token_inputs_run(bge_m3_dir) -> None:
    eng = Engine(Settings(models={"BAAI/bge-m3": str(bge_m3_dir)}, default_models=[],
                          device="cuda", max_batch_tokens=32768))
    try:
        out = eng.encode("BAAI/bge-m3", OVER_LIMIT_TEXTS * 4, ALL)
    finally:
        eng.close()
    assert all(r.token_count == 8192 and r.multivector.shape[0] == 8191 for r in out)
