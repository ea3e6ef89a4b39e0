"""oneDNN-packed float linears (runtime/packed.py) against nn.Linear, and when the engine uses
them. Tolerances: float32 within 1e-5 of the output's scale (measured 2e-6: another summation
order), bfloat16 within 2e-2 (one bf16 rounding of outputs up to ~8)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sie_server.config import Settings
from sie_server.engine import Engine
from sie_server.runtime.device import Placement, cpu_flags, onednn_packs
from sie_server.runtime.encoder import Encoder
from sie_server.runtime.packed import PackedLinear
from test_int8 import avx2_only_prefix

AVX512 = {"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq"}


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_linear_equals_linear(dtype, tol, bias) -> None:
    if not onednn_packs(dtype):  # oneDNN refuses to pack bf16 weights without AVX-512
        pytest.skip(f"{dtype} linears are not packed on this CPU")
    torch.manual_seed(0)
    lin = torch.nn.Linear(384, 1536, bias=bias).to(dtype).requires_grad_(False)
    packed = PackedLinear(lin)
    for x in (torch.randn(700, 384), torch.randn(3, 5, 384), torch.randn(384, 64).t(),
              torch.randn(1, 384)):
        x = x.to(dtype)
        want = lin(x).float()
        got = packed(x)
        assert got.shape == want.shape and got.dtype == dtype
        assert float((got.float() - want).abs().max()) <= tol * float(want.abs().max())


def test_when_linears_are_packed(monkeypatch) -> None:
    f32, bf16 = torch.float32, torch.bfloat16
    assert onednn_packs(f32, AVX512) and onednn_packs(bf16, AVX512)
    assert onednn_packs(f32, {"avx2", "fma"}) and not onednn_packs(bf16, {"avx2", "fma"})
    assert not onednn_packs(f32, {"avx2"}) and not onednn_packs(f32, {"asimd", "bf16"})
    assert not onednn_packs(bf16, AVX512 - {"avx512bw"})
    assert not onednn_packs(torch.float16, AVX512)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert onednn_packs(f32, AVX512) and not onednn_packs(bf16, AVX512)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "SSE41")
    assert not onednn_packs(f32, AVX512)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_VNNI")
    assert onednn_packs(bf16, AVX512)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    assert Placement.resolve("cpu", "float32").packed == onednn_packs(f32)
    assert Placement.resolve("cpu", "bfloat16").packed == onednn_packs(bf16)
    assert not Placement.resolve("cpu", "int8").packed


def test_cpu_choices_follow_cpuid() -> None:
    """The flags that decide auto's dtype and packing are those CPUID reports to the process:
    under scripts/avx2-only (CPUID without AVX-512 / VNNI / BF16 / AMX) a CPU whose
    /proc/cpuinfo lists AVX-512 computes as an AVX2-only one does (float32, packed; bfloat16
    not packed), and oneDNN's AVX2 kernel for the packed linear agrees with nn.Linear to 1e-5
    of the output's scale."""
    prefix = avx2_only_prefix()
    if prefix is None:
        pytest.skip("no CPUID faulting or no C compiler here (scripts/avx2-only --check)")
    code = ("import torch; from sie_server.runtime.packed import PackedLinear; "
            "torch.manual_seed(0); lin = torch.nn.Linear(384, 1536).requires_grad_(False); "
            "x = torch.randn(700, 384); want = lin(x); "
            "err = float((PackedLinear(lin)(x) - want).abs().max() / want.abs().max()); "
            "from sie_server.runtime.device import Placement, cpu_flags; "
            "p, b = Placement.resolve('cpu', 'auto'), Placement.resolve('cpu', 'bfloat16'); "
            "print(p.dtype, p.packed, b.packed, err, "
            "sorted(f for f in cpu_flags() if f.startswith(('avx', 'amx'))))")
    out = subprocess.run([*prefix, sys.executable, "-c", code], capture_output=True,
                         text=True, timeout=120)
    words = out.stdout.split(maxsplit=4)
    assert words[:3] == ["torch.float32", "True", "False"], out.stderr[-2000:]
    assert float(words[3]) <= 1e-5  # oneDNN's AVX2 kernel as exact as nn.Linear's
    assert "'avx2'" in out.stdout and "avx512" not in out.stdout and "amx" not in out.stdout
    here = cpu_flags()
    assert ("avx512f" in here) == torch.cpu._is_avx512_supported()


def test_engine_packs_its_blocks_linears(minilm_dir: Path) -> None:
    """On an x86 CPU with AVX2 every float32 block linear of all-MiniLM-L6-v2 is packed (and none
    elsewhere), counted in its memory; the vectors equal those of the same engine with its
    encoder rebuilt on nn.Linear (cosine >= 0.99999)."""
    texts = ["the cat sat on the mat", "Où se trouve la bibliothèque ?", "?"]
    eng = Engine(Settings(models={"m": str(minilm_dir)}, default_models=[], device="cpu",
                          dtype="float32"))
    try:
        model = eng.registry.get("m").model
        packed = [m for m in model.encoder.modules() if isinstance(m, PackedLinear)]
        assert len(packed) == (6 * 4 if onednn_packs(torch.float32) else 0)
        got = torch.tensor(np.stack([r.dense for r in eng.encode("m", texts, ["dense"])]))
        plain, _ = Encoder.from_folder(minilm_dir)
        plain = Placement(torch.device("cpu"), torch.float32).place(plain)
        assert not any(isinstance(m, PackedLinear) for m in plain.modules())
        assert model.memory_bytes >= sum(p.numel() * 4 for p in plain.parameters())
        model.encoder = plain
        want = torch.tensor(np.stack([r.dense for r in eng.encode("m", texts, ["dense"])]))
    finally:
        eng.close()
    cos = torch.nn.functional.cosine_similarity(got, want)
    assert float(cos.min()) >= 0.99999, cos
