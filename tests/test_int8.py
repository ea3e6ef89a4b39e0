"""`--dtype int8` (runtime/int8.py) against the same engine in float32, on the same weights.

Tolerances, measured on this project's CPUs (avx512_vnni; the int8 arithmetic is exact
integer work, so other CPUs give the same figures up to float rounding) and set with margin:
- all-MiniLM-L6-v2 (real weights), every text of tests/texts.py: dense cosine to fp32 >= 0.99
  (measured min 0.9924 on an avx512_vnni CPU, 0.9922 on an AMX one, on "?", mean 0.998); Lee
  corpus Pearson within 0.01 of fp32's 0.656.
- BGE-M3-shaped test model (random weights), every text: dense cosine >= 0.998 (measured min
  0.9995); multivector: same token count, every token vector's cosine >= 0.998 (measured min
  0.9994); sparse: every token's weight within 0.075 of fp32's (measured max 0.049, weights
  up to 3.8; rounding moves weights near zero across relu's edge, so a token may be kept on
  one side only) and the sparse vectors' cosine >= 0.95 (measured min 0.972, median 0.9999).
- cross-encoders (BERT and XLM-R heads): |logit - fp32 logit| <= 0.05 x the spread of fp32's
  logits over the documents.
- CPUs without VNNI: see RULE below.
- LoRA on int8: cosine to the fp32 engine with the same adapter >= 0.99; a base row's vectors
  are those of the int8 engine without adapters (LoRA touches only its rows).
- ModernBERT, decoder (Qwen3-style) and CLIP / SigLIP text towers: dense cosine >= 0.99.
- CLIP / SigLIP vision towers (the small random-weight test models of
  scripts/make_clip_test_models.py, tests/clip_reference.py's 9 test images): image vector
  cosine >= 0.999 (measured min 0.9999 for both; random weights, so this bounds the int8
  arithmetic on a ViT, not the quality on a trained checkpoint, of which none is offline).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import reference
import torch
from clip_reference import make_images
from texts import SHORT_TEXTS, TEXTS

from sie_server.config import Settings
from sie_server.engine import Engine
from sie_server.runtime.device import Placement, amx_bf16, cpu_flags
from sie_server.runtime.images import ImageInput
from sie_server.runtime import int8 as int8_mod
from sie_server.runtime.int8 import Int8Linear, quantize_weight, weight_rule
from test_score import DOCS, QUERIES, ce_bert_dir, ce_xlmr_dir  # noqa: F401 - fixtures

ALL = ["dense", "sparse", "multivector"]
LEGAL_LORA = "org/bge-m3-legal-lora"
IMAGE_COS = 0.999  # CLIP / SigLIP image vectors, int8 vs fp32 (module docstring)
# Where the CPU's int8 kernel saturates on 8-bit weights (no VNNI) they are scaled by the
# "pairs" rule (runtime/int8.py), and one bound widens; measured with oneDNN held to AVX2
# (test_int8_without_vnni): BGE-M3 sparse weight error max 0.0749. The rest hold as stated
# above (measured: MiniLM min dense cosine 0.9908 on "?" (0.9931 with CPUID masked), BGE-M3
# dense 0.9996, multivector 0.9992, sparse cosine 0.990, LoRA 0.998, cross-encoder error 0.036
# x the spread).
RULE = weight_rule()
SPARSE_ABS = 0.075 if RULE == "int8" else 0.1


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def engines(models: dict[str, Path], **kw) -> dict[str, Engine]:
    return {d: Engine(Settings(models={k: str(v) for k, v in models.items()}, default_models=[],
                               device="cpu", dtype=d, **kw)) for d in ("float32", "int8")}


def dense(eng: Engine, model: str, texts, options=None) -> np.ndarray:
    return np.stack([r.dense for r in eng.encode(model, texts, ["dense"], options)])


def test_int8_linear_is_close_and_per_token() -> None:
    torch.manual_seed(0)
    lin = torch.nn.Linear(384, 1536)
    x = torch.randn(300, 384)
    x[:, 3] *= 30  # an outlier channel, as BERT LayerNorm outputs have
    x[5] = 2.0     # a constant row
    x[6] = 0.0
    q = Int8Linear(lin)
    with torch.no_grad():
        got, want = q(x), lin(x)
    assert float((got - want).norm() / want.norm()) < 0.03
    assert float(torch.nn.functional.cosine_similarity(got, want).min()) > 0.999
    assert torch.equal(got[6], lin.bias.detach())  # a zero row: the bias
    # each token has its own scales: a row does not depend on the rows beside it
    assert torch.allclose(q(x[7:8]), got[7:8], atol=1e-5)
    nobias = torch.nn.Linear(128, 7, bias=False).requires_grad_(False)
    want = nobias(x[:, :128])
    assert float((Int8Linear(nobias)(x[:, :128]) - want).norm() / want.norm()) < 0.03


def test_int8_linear_from_threads_at_once() -> None:
    """The quantize kernels on numba's pool (runtime/int8.py), entered by three threads at once
    (as by two engines' workers): every output as when computed alone."""
    torch.manual_seed(0)
    q = Int8Linear(torch.nn.Linear(384, 1536))
    xs = [torch.randn(n, 384) for n in (1, 7, 256, 300)]
    want = [q(x) for x in xs]
    wrong: list[int] = []

    def work(i: int) -> None:
        for _ in range(40):
            wrong.extend(i for x, w in zip(xs, want) if not torch.equal(q(x), w))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong


KERNEL_RUN = """
import sys, torch
from sie_server.runtime import int8
torch.manual_seed(0)
q = int8.Int8Linear(torch.nn.Linear(384, 1536))
torch.save(q(torch.randn(300, 384)), sys.argv[1])
print(int8.THREADS)
"""


def test_int8_kernels_without_a_thread_pool(tmp_path: Path) -> None:
    """Where numba loads no thread-safe pool (here for real: the system's libgomp hidden by
    an empty file in a mount namespace, no TBB) the kernels run on the calling thread, with a
    warning, and give the pool's outputs bit for bit."""
    libgomp = {line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines()
               if line.endswith("libgomp.so.1.0.0")}
    if "(omp)" not in int8_mod.THREADS or len(libgomp) != 1 or not shutil.which("unshare"):
        pytest.skip(f"numba's pool here: {int8_mod.THREADS}; needs its OpenMP one and unshare")
    torch.manual_seed(0)
    q = Int8Linear(torch.nn.Linear(384, 1536))
    want = q(torch.randn(300, 384))
    out = tmp_path / "y.pt"
    hide = f"mount --bind /dev/null {libgomp.pop()} && exec \"$@\""
    run = subprocess.run(["unshare", "-m", "sh", "-c", hide, "sh", sys.executable, "-c",
                          KERNEL_RUN, str(out)], capture_output=True, text=True, timeout=120)
    if run.returncode and "mount" in run.stderr and not out.exists():
        pytest.skip(f"no mount namespace here: {run.stderr.strip()[-300:]}")
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split("\n")[-2] == "1 thread", run.stdout
    assert "numba found no thread-safe pool" in run.stderr
    assert torch.equal(torch.load(out), want)


def test_weight_rules_bound_what_the_kernel_adds_in_int16() -> None:
    """Each rule's int8 weights (runtime/int8.py): "int8" uses the full range, "pairs" keeps
    every pair (2j, 2j+1)'s positive and negative parts within 128 (255 x 128 fits in int16)
    while a row whose large weights are not paired keeps 127 levels, "int7" stays in
    [-64, 64]; scale x weights gives back the float weights to half a step."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 385, generator=g)  # an odd width: the last channel has no partner
    w[0, :2] = 20.0  # a large pair of one sign: the "pairs" bound is its sum
    w[1, :2] = torch.tensor([20.0, -20.0])  # opposite signs: max |w| sets the scale
    for rule in ("int8", "pairs", "int7"):
        wq, scale = quantize_weight(w, rule)
        assert wq.dtype == torch.int8 and scale.shape == (64,)
        assert (w - wq.float() * scale[:, None]).abs().le(scale[:, None] / 2 + 1e-6).all(), rule
        peak = wq.abs().amax(dim=1)
        pairs = torch.nn.functional.pad(wq.long(), (0, 1)).view(64, -1, 2)
        pos, neg = pairs.clamp_min(0).sum(-1).amax(), pairs.clamp_max(0).sum(-1).amin()
        if rule == "int8":
            assert peak.eq(127).all() and pos > 128
        elif rule == "pairs":
            assert pos <= 128 and neg >= -128 and peak.max() <= 127
            assert peak[0] == 64 and peak[1] == 127
        else:
            assert peak.eq(64).all()


def test_weight_rule_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first rule whose weights the kernel multiplies exactly; none, or no kernel: an
    error saying so."""
    rule = int8_mod.weight_rule
    for exact, want in (({"int8"}, "int8"), ({"pairs", "int7"}, "pairs"), ({"int7"}, "int7")):
        monkeypatch.setattr(int8_mod, "_exact", lambda r, ok=exact: r in ok)
        rule.cache_clear()
        assert rule() == want
    monkeypatch.setattr(int8_mod, "_exact", lambda r: False)
    rule.cache_clear()
    with pytest.raises(RuntimeError, match="not exact"):
        rule()
    monkeypatch.undo()

    def missing(*args):  # a torch build whose oneDNN has no int8 matmul
        raise RuntimeError("no such kernel")

    monkeypatch.setattr(int8_mod, "matmul", missing)
    rule.cache_clear()
    with pytest.raises(RuntimeError, match="needs oneDNN's int8 matmul.*no such kernel"):
        rule()
    monkeypatch.undo()
    rule.cache_clear()
    assert rule() == RULE


AVX2_ONLY = Path(__file__).resolve().parents[1] / "scripts" / "avx2-only"
CAP_AVX2 = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2",
            "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def avx2_only_prefix() -> list[str] | None:
    """The command prefix that runs a process as on an AVX2-only CPU (CPUID masked), or None
    where this machine cannot (no CPUID faulting or no C compiler)."""
    ok = subprocess.run([str(AVX2_ONLY), "--check"], capture_output=True).returncode == 0
    return [str(AVX2_ONLY)] if ok else None


def test_int8_without_vnni(tmp_path: Path) -> None:
    """This module again in a process that sees an AVX2-only CPU (CPUID masked by
    scripts/avx2-only; where that cannot run, torch's kernels held to AVX2 by environment caps):
    the int8 kernel saturates on 8-bit weights there (the probe must see it, or MiniLM's cosine
    falls to 0.958), pair-bounded weights are exact (also on oneDNN's AVX-512 kernel without
    VNNI), and every test passes at the bounds above."""
    prefix = avx2_only_prefix()
    env = dict(os.environ) if prefix else {**os.environ, **CAP_AVX2}
    prefix = prefix or []
    code = ("import torch; from sie_server.runtime import int8; "
            "print(torch.backends.cpu.get_cpu_capability(), "
            "*map(int8._exact, ('int8', 'pairs', 'int7')), int8.weight_rule())")
    for cmd, cap in ((prefix, env),  # and oneDNN's AVX-512 kernel without VNNI:
                     ([], {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX512_CORE"})):
        probe = subprocess.run([*cmd, sys.executable, "-c", code], env=cap, capture_output=True,
                               text=True, timeout=120)
        assert probe.stdout.split()[1:] == ["False", "True", "True", "pairs"], \
            probe.stdout + probe.stderr[-2000:]
        if cap is env:  # the process saw AVX2 (ATen's vector code included)
            assert probe.stdout.split()[0] == "AVX2", probe.stdout
    # its own --basetemp: no cleanup of numbered temp folders, this run's among them
    run = subprocess.run([*prefix, sys.executable, "-m", "pytest", __file__, "-q",
                          "-p", "no:cacheprovider", "--basetemp", str(tmp_path / "inner"),
                          "-k", "not without_vnni and not without_a_thread_pool"],
                         env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout, run.stdout[-2000:]


def test_int8_is_asked_for_never_auto(caplog: pytest.LogCaptureFixture) -> None:
    """int8 only by name; on a CPU with AMX-BF16 (where bf16 ran ~2x int8's speed, README)
    choosing it logs that it saves memory, not time."""
    with caplog.at_level("WARNING", logger="sie_server.runtime.device"):
        p = Placement.resolve("cpu", "int8")
    assert ("AMX-BF16" in caplog.text) == ("amx_bf16" in cpu_flags())
    assert amx_bf16({"amx_bf16", "amx_tile", "avx512_bf16"})
    assert not amx_bf16({"avx512_bf16", "avx512_vnni", "avx512f"})
    assert (p.dtype, p.quantize, p.dtype_name) == (torch.float32, "int8", "int8")
    assert Placement.resolve("cpu", "auto").quantize is None
    with pytest.raises(ValueError, match="int8 is a CPU path"):
        Placement.resolve("cuda", "int8")


@pytest.fixture(scope="module")
def minilm(minilm_dir: Path):
    engs = engines({"m": minilm_dir})
    yield engs
    for e in engs.values():
        e.close()


def test_minilm_int8_dense_on_every_text(minilm) -> None:
    info = minilm["int8"].registry.get("m").model
    assert info.info.dtype == "int8"
    assert sum(isinstance(m, Int8Linear) for m in info.encoder.modules()) == 6 * 4
    cos = cosines(dense(minilm["int8"], "m", TEXTS), dense(minilm["float32"], "m", TEXTS))
    assert cos.min() >= 0.99, (float(cos.min()), TEXTS[int(cos.argmin())][:40])


def test_minilm_int8_lee_correlation(minilm) -> None:
    """Pearson of cosine vs human similarity over the 1,225 document pairs (upper triangle)."""
    lee = reference.lee_corpus()
    if lee is None:
        pytest.skip("gensim (test extra) is not installed")
    docs, human = lee
    assert len(docs) == 50 and human.shape == (50, 50)
    pearson = {dtype: reference.lee_pearson(dense(eng, "m", docs), human)
               for dtype, eng in minilm.items()}
    assert abs(pearson["float32"] - 0.656) < 0.005, pearson  # FIELD_NOTES section 1
    assert abs(pearson["int8"] - pearson["float32"]) <= 0.01, pearson


@pytest.fixture(scope="module")
def m3(bge_m3_dir: Path, legal_lora):
    engs = engines({"m3": bge_m3_dir}, adapter_roots=[legal_lora["root"]])
    yield engs
    for e in engs.values():
        e.close()


def test_bge_m3_int8_outputs(m3) -> None:
    want = m3["float32"].encode("m3", TEXTS, ALL)
    got = m3["int8"].encode("m3", TEXTS, ALL)
    model = m3["int8"].registry.get("m3").model
    assert not any(isinstance(m, Int8Linear) for m in vars(model).values())  # heads in float
    for text, g, w in zip(TEXTS, got, want):
        label = text[:30]
        assert cosines(g.dense, w.dense) >= 0.998, label
        assert g.multivector.shape == w.multivector.shape, label
        assert cosines(g.multivector, w.multivector).min() >= 0.998, label
        gs, ws = (dict(zip(*map(np.ndarray.tolist, r.sparse))) for r in (g, w))
        for tok in set(gs) | set(ws):
            assert abs(gs.get(tok, 0.0) - ws.get(tok, 0.0)) <= SPARSE_ABS, (label, tok)
        if len(ws) > 0 and len(gs) > 0:
            keys = sorted(set(gs) | set(ws))
            a, b = (np.array([d.get(k, 0.0) for k in keys]) for d in (gs, ws))
            assert cosines(a, b) >= 0.95, label


def test_bge_m3_int8_lora_per_row(m3) -> None:
    texts = SHORT_TEXTS[:12]
    lora = {"lora_id": LEGAL_LORA}
    got, want = dense(m3["int8"], "m3", texts, lora), dense(m3["float32"], "m3", texts, lora)
    assert cosines(got, want).min() >= 0.99
    base = dense(m3["int8"], "m3", texts)
    assert cosines(got, base).min() < 0.999  # the adapter changes the int8 outputs
    # a mixed batch: base rows are the int8 base vectors, adapter rows the adapter's
    futures = [m3["int8"].submit("m3", [t], ["dense"], lora if i % 2 else None)
               for i, t in enumerate(texts)]
    mixed = np.stack([f.result()[0].dense for f in futures])
    expect = np.where((np.arange(len(texts)) % 2 == 1)[:, None], got, base)
    np.testing.assert_allclose(mixed, expect, atol=2e-5)


@pytest.mark.parametrize("name", ["ce-bert", "ce-xlmr"])
def test_cross_encoder_int8_scores(name, ce_bert_dir, ce_xlmr_dir) -> None:
    engs = engines({"ce-bert": ce_bert_dir, "ce-xlmr": ce_xlmr_dir})
    try:
        for query in QUERIES:
            s = {d: e.score(name, query, DOCS, {"activation": "none"}).scores
                 for d, e in engs.items()}
            spread = float(s["float32"].max() - s["float32"].min())
            assert spread > 0
            assert np.abs(s["int8"] - s["float32"]).max() <= 0.05 * spread, (query, s)
    finally:
        for e in engs.values():
            e.close()


def test_every_family_int8(tmp_path_factory) -> None:
    """ModernBERT, a Qwen3-style decoder and CLIP / SigLIP: their blocks' linears all become
    Int8Linear, text vectors stay within 0.99 cosine of fp32, and CLIP / SigLIP image vectors
    within IMAGE_COS."""
    import make_clip_test_models
    import make_decoder_test_models
    import make_modernbert_test_models

    root = tmp_path_factory.mktemp("int8-families")
    folders = {"modernbert": make_modernbert_test_models.build(root / "mb", "gte"),
               "decoder": make_decoder_test_models.build(root / "dec", "qwen3-embedding"),
               **make_clip_test_models.build(root / "clip", SHORT_TEXTS)}
    engs = engines(folders)
    pictures = [ImageInput(data, fmt) for data, fmt in make_images()]
    try:
        for name in folders:
            model = engs["int8"].registry.get(name).model
            stacks = [model.text, model.vision] if hasattr(model, "vision") else [model.encoder]
            for stack in stacks:
                linears = [m for m in stack.modules() if isinstance(m, torch.nn.Linear)]
                int8 = [m for m in stack.modules() if isinstance(m, Int8Linear)]
                assert int8 and len(linears) <= 1, (name, len(int8), len(linears))  # patch embed
            cos = cosines(dense(engs["int8"], name, SHORT_TEXTS),
                          dense(engs["float32"], name, SHORT_TEXTS))
            assert cos.min() >= 0.99, (name, float(cos.min()))
            if hasattr(model, "vision"):  # the vision tower's int8 linears, on every test image
                cos = cosines(dense(engs["int8"], name, pictures),
                              dense(engs["float32"], name, pictures))
                assert cos.min() >= IMAGE_COS, (name, float(cos.min()))
    finally:
        for e in engs.values():
            e.close()
