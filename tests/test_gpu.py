"""Half precision and CUDA execution (packed varlen attention, bf16/fp16) against the fp32 CPU
engine, which tests/test_equivalence.py proves equal to FlagEmbedding. The CUDA tests are
skipped where there is no GPU; bf16 on the CPU runs everywhere and checks every half-precision
step but the attention kernel (weights, heads, pooling, sparse weights, normalisation).

Stated tolerances for half precision on GPU (the fp32 tolerances of issue 2 hold on CPU):
dense cosine >= 0.999; multivector rows: same count, mean cosine >= 0.995; sparse: cosine of
the weight vectors (over the union of ids) >= 0.995, and ids present on one side only weigh at
most 1% of the text's largest weight (near-zero weights can flip sign in bf16). A per-id
absolute bound does not fit bf16: a sparse weight is a dot product of a hidden state whose
terms are much larger than the result, so a weight of 0.14 came out 0.026 off. fp32 on CUDA
keeps the issue-2 tolerances. Measured on the CPU in bf16 (2026-11-28, 19 texts): dense cosine
>= 0.99992, multivector mean cosine >= 0.99989, sparse cosine >= 0.9984, one-sided ids <= 0.4%.

bf16 on the CPU (what `--dtype auto` picks on CPUs with native bf16 matmuls, issue 12), also
stated: all-MiniLM-L6-v2 (real weights) against sentence-transformers fp32: cosine >= 0.999
(measured 2026-12-01: >= 0.99987); BGE-M3 scores against the fp32 engine, per query: dense and
multivector within 0.01, sparse within 10% and hybrid within 2% of the query's largest fp32
score (measured 0.005, 0.005, 5.0%, 0.8%: on this random test model sparse weights are large
and sums of many bf16 products). SPLADE: tests/test_splade.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from texts import OVER_LIMIT_TEXTS, SHORT_TEXTS, SPECIAL_TOKEN_TEXTS

from sie_server.config import Settings
from sie_server.engine import Engine
from sie_server.runtime import attention
from sie_server.runtime.device import Placement, cpu_bf16_native, cpu_flags

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

ALL = ["dense", "sparse", "multivector"]
TEXTS = SHORT_TEXTS + SPECIAL_TOKEN_TEXTS + OVER_LIMIT_TEXTS


def encode(folder: Path, device: str, dtype: str = "float32") -> list:
    eng = Engine(Settings(models={"BAAI/bge-m3": str(folder)}, default_models=[],
                          device=device, dtype=dtype))
    try:
        return eng.encode("BAAI/bge-m3", TEXTS, ALL)
    finally:
        eng.close()


@pytest.fixture(scope="module")
def cpu_fp32(bge_m3_dir: Path) -> list:
    return encode(bge_m3_dir, "cpu")


def assert_half_close(got: list, want: list) -> None:
    """The stated half-precision tolerances (module docstring)."""
    for i, (g, c) in enumerate(zip(got, want, strict=True)):
        assert g.token_count == c.token_count
        assert float(g.dense @ c.dense) >= 0.999, f"text {i} dense"
        assert g.multivector.shape == c.multivector.shape
        assert float((g.multivector * c.multivector).sum(1).mean()) >= 0.995, f"text {i} mv"
        gs, cs = dict(zip(*map(np.ndarray.tolist, g.sparse))), dict(zip(*map(np.ndarray.tolist, c.sparse)))
        if not cs:
            assert max(gs.values(), default=0.0) <= 0.01, f"text {i} sparse"
            continue
        ids = sorted(gs.keys() | cs.keys())
        u, v = (np.array([d.get(k, 0.0) for k in ids]) for d in (gs, cs))
        assert float(u @ v / np.linalg.norm(u) / np.linalg.norm(v)) >= 0.995, f"text {i} sparse"
        top = max(cs.values())
        for k in gs.keys() ^ cs.keys():
            assert max(gs.get(k, 0), cs.get(k, 0)) <= 0.01 * top, f"text {i} sparse id {k} one-sided"


def test_bfloat16_on_cpu_within_stated_tolerances(bge_m3_dir, cpu_fp32) -> None:
    got = encode(bge_m3_dir, "cpu", "bfloat16")
    assert got[0].dense.dtype == np.float32  # results are fp32 whatever the compute dtype
    assert_half_close(got, cpu_fp32)


def test_auto_dtype_on_cpu_follows_the_cpus_own_flags() -> None:
    """auto is bf16 exactly when the kernel reports a native bf16 matmul flag (x86 AMX-BF16 /
    AVX512-BF16, Arm BF16); explicit dtypes are kept; the reason is given."""
    import platform

    flags = cpu_flags()
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    native = bool({"avx512_bf16", "amx_bf16"} & flags) if x86 else "bf16" in flags
    auto = Placement.resolve("cpu", "auto")
    assert auto.dtype == (torch.bfloat16 if native else torch.float32), auto
    assert ("natively" in auto.reason) == native
    assert Placement.resolve("cpu", "float32").dtype == torch.float32


def test_cpu_bf16_detection_reads_the_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    def native(flags: set[str], machine: str = "x86_64") -> bool:
        return cpu_bf16_native(flags, machine)[0]

    assert not native({"avx2", "avx512f", "avx512_vnni", "avx512bw"})  # AVX-512 alone: emulated
    assert native({"avx512f", "avx512_bf16"}) and native({"amx_tile", "amx_bf16"})
    assert not native({"bf16"}) and native({"asimd", "bf16"}, "aarch64")
    assert not native({"asimd", "fphp"}, "aarch64")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert not native({"avx512_bf16"})


def test_model_info_reports_the_dtype(bge_m3_dir: Path) -> None:
    for dtype in ("float32", "bfloat16"):
        eng = Engine(Settings(models={"BAAI/bge-m3": str(bge_m3_dir)}, default_models=[],
                              device="cpu", dtype=dtype))
        try:
            assert eng.registry.get("BAAI/bge-m3").model.info.dtype == dtype
        finally:
            eng.close()


def test_minilm_bfloat16_on_cpu_within_stated_tolerances(minilm_dir: Path) -> None:
    import reference
    from texts import BERT_SPECIAL_TOKEN_TEXTS

    texts = TEXTS + BERT_SPECIAL_TOKEN_TEXTS
    eng = Engine(Settings(default_models=[], device="cpu", dtype="bfloat16"))
    try:
        ours = np.stack([r.dense for r in eng.encode("sentence-transformers/all-MiniLM-L6-v2",
                                                     texts)])
    finally:
        eng.close()
    cos = (ours * reference.st_encode(minilm_dir, texts)).sum(1)
    assert cos.min() >= 0.999, f"worst cosine {cos.min()} at text {int(cos.argmin())}"


def test_bge_m3_scores_in_bfloat16_within_stated_tolerances(bge_m3_dir: Path) -> None:
    got = {}
    for dtype in ("float32", "bfloat16"):
        eng = Engine(Settings(models={"BAAI/bge-m3": str(bge_m3_dir)}, default_models=[],
                              device="cpu", dtype=dtype))
        try:
            got[dtype] = [eng.score("BAAI/bge-m3", q, SHORT_TEXTS[:40], {"score_mode": "hybrid"})
                          for q in SHORT_TEXTS[:6]]
        finally:
            eng.close()
    for half, full in zip(got["bfloat16"], got["float32"]):
        for key, bound in (("dense", 0.01), ("colbert", 0.01), ("sparse", 0.1),
                           ("hybrid", 0.02)):
            h, f = np.asarray(half.components[key]), np.asarray(full.components[key])
            scale = 1.0 if key in ("dense", "colbert") else np.abs(f).max()
            assert np.abs(h - f).max() <= bound * scale, key


@needs_cuda
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_on_cuda_within_stated_tolerances(bge_m3_dir, cpu_fp32, dtype) -> None:
    assert_half_close(encode(bge_m3_dir, "cuda", dtype), cpu_fp32)


@needs_cuda
def test_fp32_on_cuda_keeps_the_cpu_tolerances(bge_m3_dir, cpu_fp32) -> None:
    for i, (g, c) in enumerate(zip(encode(bge_m3_dir, "cuda", "float32"), cpu_fp32)):
        assert float(g.dense @ c.dense) >= 0.99999, f"text {i}"
        assert np.abs(g.multivector - c.multivector).max() <= 1e-4, f"text {i}"
        np.testing.assert_array_equal(g.sparse[0], c.sparse[0])
        assert np.abs(g.sparse[1] - c.sparse[1]).max() <= 1e-4


@needs_cuda
def test_batches_of_8192_token_inputs_run(bge_m3_dir) -> None:
    eng = Engine(Settings(models={"BAAI/bge-m3": str(bge_m3_dir)}, default_models=[],
                          device="cuda", max_batch_tokens=32768))
    try:
        out = eng.encode("BAAI/bge-m3", OVER_LIMIT_TEXTS * 4, ALL)
    finally:
        eng.close()
    assert all(r.token_count == 8192 and r.multivector.shape[0] == 8191 for r in out)


# ---- CLIP / SigLIP (both towers): bf16 on CPU everywhere, bf16 / fp16 on CUDA ----------------
# Stated tolerance: dense cosine >= 0.999 against the fp32 CPU engine (which tests/test_clip.py
# proves equal to transformers), per text and per image. Measured on the CPU in bf16
# (2026-12-01, the test models, 24 texts + 9 images): min cosine 0.99994 (CLIP), 0.99994 (SigLIP).


@pytest.fixture(scope="module")
def clip_models(tmp_path_factory) -> dict:
    from make_clip_test_models import build

    return build(tmp_path_factory.mktemp("clip-gpu"), SHORT_TEXTS)


def encode_images(folder: Path, device: str, dtype: str,
                  adapters: Path | None = None) -> np.ndarray:
    """Texts and images in one request; with `adapters`, every item once plainly and once under
    each adapter folder in it, all submitted at once (batches mix adapters and the base)."""
    from clip_reference import make_images

    from sie_server.runtime.images import ImageInput

    items = SHORT_TEXTS[:24] + [ImageInput(d, f) for d, f in make_images()]
    eng = Engine(Settings(models={"m": str(folder)}, default_models=[], device=device,
                          dtype=dtype, adapter_roots=[adapters] if adapters else []))
    try:
        if adapters is None:
            return np.stack([r.dense for r in eng.encode("m", items)])
        names = [None, *sorted(p.name for p in adapters.iterdir())]
        futures = [eng.submit("m", [item], None, {"lora_id": n} if n else None)
                   for n in names for item in items]
        return np.stack([f.result()[0].dense for f in futures])
    finally:
        eng.close()


@pytest.fixture(scope="module")
def clip_adapters(clip_models, tmp_path_factory) -> dict:
    """Per family, a folder of two peft adapters: both towers, and the vision tower only."""
    from lora_adapters import make_adapter

    out = {}
    for family, folder in clip_models.items():
        root = tmp_path_factory.mktemp(f"{family}-adapters")
        make_adapter(folder, root / "both", r=4, seed=3,
                     targets=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"])
        make_adapter(folder, root / "vision", r=8, seed=4, targets=r"vision_model.*\.fc\d")
        out[family] = root
    return out


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_clip_siglip_bfloat16_on_cpu(clip_models, family) -> None:
    want = encode_images(clip_models[family], "cpu", "float32")
    got = encode_images(clip_models[family], "cpu", "bfloat16")
    assert (got * want).sum(1).min() >= 0.999


@needs_cuda
@pytest.mark.parametrize("family", ["clip", "siglip"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_clip_siglip_on_cuda(clip_models, family, dtype) -> None:
    want = encode_images(clip_models[family], "cpu", "float32")
    got = encode_images(clip_models[family], "cuda", dtype)
    assert (got * want).sum(1).min() >= (0.99999 if dtype == "float32" else 0.999)


# LoRA (tests/test_clip_lora.py proves the fp32 CPU engine equal to peft's merged models):
# the same stated tolerances, adapters and the base model mixed in the batches. Measured on
# the CPU in bf16 (2026-12-02, 33 items x 3): min cosine 0.99981 (CLIP), 0.99965 (SigLIP).
@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_clip_siglip_lora_bfloat16_on_cpu(clip_models, clip_adapters, family) -> None:
    want = encode_images(clip_models[family], "cpu", "float32", clip_adapters[family])
    got = encode_images(clip_models[family], "cpu", "bfloat16", clip_adapters[family])
    assert (got * want).sum(1).min() >= 0.999


@needs_cuda
@pytest.mark.parametrize("family", ["clip", "siglip"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_clip_siglip_lora_on_cuda(clip_models, clip_adapters, family, dtype) -> None:
    want = encode_images(clip_models[family], "cpu", "float32", clip_adapters[family])
    got = encode_images(clip_models[family], "cuda", dtype, clip_adapters[family])
    assert (got * want).sum(1).min() >= (0.99999 if dtype == "float32" else 0.999)


# ------------------------------------------------------------------ decoders (issue 14)
# Same stated half-precision tolerances for the decoder embedder (dense cosine >= 0.999); the
# LLM reranker's yes/no probabilities within 0.01 in bf16 (fp32 on CUDA: 1e-4, like the CPU).

@pytest.fixture(scope="module")
def decoder_dirs(tmp_path_factory) -> dict[str, Path]:
    import make_decoder_test_models as makers

    root = tmp_path_factory.mktemp("gpu-decoders")
    return {v: makers.build(root / v, v) for v in ("qwen3-embedding", "qwen3-reranker")}


def decoder_outputs(dirs: dict[str, Path], device: str, dtype: str = "auto"):
    from texts import LONG_TEXTS

    eng = Engine(Settings(models={k: str(v) for k, v in dirs.items()}, default_models=[],
                          device=device, dtype=dtype))
    try:
        dense = np.stack([r.dense for r in eng.encode("qwen3-embedding", TEXTS + LONG_TEXTS[:3])])
        scores = eng.score("qwen3-reranker", "What is the capital of France?", SHORT_TEXTS).scores
        return dense, scores
    finally:
        eng.close()


@pytest.fixture(scope="module")
def decoder_cpu_fp32(decoder_dirs):
    return decoder_outputs(decoder_dirs, "cpu")


def assert_decoder_close(got, want, score_tol: float) -> None:
    (gd, gs), (wd, ws) = got, want
    cos = (gd * wd).sum(1)
    assert cos.min() >= (0.999 if score_tol > 1e-4 else 0.99999), f"text {int(cos.argmin())}"
    assert np.abs(gs - ws).max() <= score_tol


def test_decoders_bfloat16_on_cpu(decoder_dirs, decoder_cpu_fp32) -> None:
    assert_decoder_close(decoder_outputs(decoder_dirs, "cpu", "bfloat16"), decoder_cpu_fp32, 0.01)


@needs_cuda
def test_decoders_on_cuda_varlen_causal(decoder_dirs, decoder_cpu_fp32) -> None:
    """bf16 takes varlen_attn with causal masking (GQA); fp32 takes the bucketed SDPA path."""
    assert_decoder_close(decoder_outputs(decoder_dirs, "cuda", "bfloat16"), decoder_cpu_fp32, 0.01)
    assert_decoder_close(decoder_outputs(decoder_dirs, "cuda", "float32"), decoder_cpu_fp32, 1e-4)


@needs_cuda
def test_causal_varlen_equals_bucketed_sdpa() -> None:
    """The two attention paths agree on a packed batch of mixed lengths, GQA and causal."""
    from sie_server.runtime import attention
    from sie_server.runtime.attention import BucketedAttention, VarlenAttention

    if not attention._VARLEN_CAUSAL:
        pytest.skip("this torch's varlen_attn takes no causal flag (bucketed SDPA serves it)")
    torch.manual_seed(0)
    cu = np.array([0, 1, 7, 40, 41, 300], dtype=np.int64)
    q = torch.randn(300, 8, 64, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(300, 2, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for causal in (True, False):
        a = VarlenAttention(cu, torch.device("cuda"), causal=causal)(q, k, v).float()
        b = BucketedAttention(cu, torch.device("cuda"), causal=causal)(q, k, v).float()
        assert (a - b).abs().max() <= 0.02, causal


@needs_cuda
@pytest.mark.parametrize("dtype,tolerance", [("bfloat16", 0.999), ("float32", 0.99999)])
def test_modernbert_on_cuda_matches_the_cpu(tmp_path, dtype, tolerance) -> None:
    """Packed ModernBERT on CUDA (varlen with its local window where torch has one) against
    the fp32 CPU engine, which tests/test_modernbert.py proves equal to transformers."""
    from make_modernbert_test_models import LOCAL_ATTENTION, build

    folder = build(tmp_path / "gte", "gte")

    def dense(device: str, dt: str = "auto") -> tuple[np.ndarray, object]:
        eng = Engine(Settings(models={"gte": str(folder)}, default_models=[], device=device,
                              dtype=dt))
        try:
            vectors = np.stack([r.dense for r in eng.encode("gte", TEXTS)])
            # the attentions of a batch longer than the window
            enc = eng.registry.get("gte").model.encoder
            return vectors, enc.attention(np.array([0, 100, 300]), torch.device(device),
                                          next(enc.parameters()).dtype)
        finally:
            eng.close()

    (want, _), (got, att) = dense("cpu"), dense("cuda", dtype)
    cos = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    assert cos.min() >= tolerance, f"worst cosine {cos.min()} at text {int(cos.argmin())}"
    if dtype == "bfloat16" and "window_size" in attention._VARLEN_ARGS:
        assert isinstance(att.local, attention.VarlenAttention)
        assert att.local.kwargs == {"window_size": (LOCAL_ATTENTION // 2,) * 2}
