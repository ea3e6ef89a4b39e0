"""`sie-server encode --server URL` against a real server process on a loopback port: the
output equals the in-process backend's bit for bit (one item per batch on both sides), the
API key is sent, 503 QUEUE_FULL refusals from a tiny queue are retried, and a server killed and restarted
mid-run is waited out (the run then completes) or, with a short retry window, the run fails
and the rerun resumes."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

import conftest
from sie_server.columns import from_columns
from sie_server.config import Settings
from sie_server.corpus.backends import ServerBackend
from sie_server.corpus.readers import expand
from sie_server.corpus.run import Job, run
from sie_server.corpus.writer import read_output
from sie_server.engine import Engine
from sie_sdk.errors import SIEConnectionError, UnauthorizedError
from texts import SHORT_TEXTS

ROOT = Path(__file__).resolve().parent.parent
MODEL = "mini"
KEY = "corpus-secret"
TEXTS = [t for t in SHORT_TEXTS if t.strip()]
pytestmark = pytest.mark.slow


def server_args(minilm_dir: Path, *extra: str) -> list[str]:
    return ["--model", f"{MODEL}={minilm_dir}", "--default-model", MODEL, "--api-key", KEY,
            "--max-batch-items", "1", *extra]


@pytest.fixture(scope="module")
def expected(minilm_dir: Path) -> list:
    eng = Engine(Settings(dtype="float32", models={MODEL: str(minilm_dir)}, default_models=[], device="cpu",
                          max_batch_items=1))
    try:
        return eng.encode(MODEL, [TEXTS[i % len(TEXTS)] for i in range(200)], ["dense"])
    finally:
        eng.close()


def corpus(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps({"id": f"doc-{i}", "text": TEXTS[i % len(TEXTS)]}) + "\n"
                            for i in range(n)))
    return path


def assert_output(out: Path, expected: list, n: int) -> None:
    table = read_output(out)
    assert table.column("id").to_pylist() == [f"doc-{i}" for i in range(n)]
    for i, (got, want) in enumerate(zip(from_columns(table), expected[:n], strict=True)):
        assert got.token_count == want.token_count, i
        assert (got.dense == want.dense).all(), i


def job(src: Path, out: Path, **kw) -> Job:
    return Job(files=expand([str(src)]), output=out, output_types=["dense"], id_field="id",
               **{"shard_rows": 20, "batch_size": 4, "concurrency": 4, **kw})


def test_cli_with_queue_full_refusals_retried(start_server, minilm_dir: Path, expected, tmp_path: Path) -> None:
    """The real command with --server and --api-key; the server's queue holds 300 tokens (one request of 4 texts fits), so
    most of the 8 concurrent requests get 503 QUEUE_FULL and are retried."""
    server = start_server(server_args(minilm_dir, "--max-queued-tokens", "300"))
    src = corpus(tmp_path / "d.jsonl", 120)
    cmd = [sys.executable, "-m", "sie_server.cli", "encode", str(src), "--model", MODEL,
           "--server", server.url, "--api-key", KEY, "--output", str(tmp_path / "out"),
           "--id-field", "id", "--shard-rows", "25", "--batch-size", "4", "--concurrency", "8"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["rows"] == 120
    assert_output(tmp_path / "out", expected, 120)
    metrics = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    rejected = sum(float(v) for v in re.findall(r"^sie_rejected_total\{[^}]*\} (\S+)", metrics,
                                                re.M))
    assert rejected > 0, "no refusal happened: the test did not test retries"
    assert "QUEUE_FULL" in done.stderr  # the retry warnings


def test_wrong_api_key_fails_without_retrying(start_server, minilm_dir: Path,
                                              tmp_path: Path) -> None:
    server = start_server(server_args(minilm_dir))
    backend = ServerBackend(server.url, MODEL, ["dense"], {}, api_key="wrong")
    started = time.monotonic()
    try:
        with pytest.raises(UnauthorizedError):
            run(job(corpus(tmp_path / "d.jsonl", 5), tmp_path / "out"), backend)
    finally:
        backend.close()
    assert time.monotonic() - started < 30


def test_requests_over_the_body_limit_are_split(start_server, minilm_dir: Path, expected,
                                                tmp_path: Path) -> None:
    """The server refuses a request over --max-body-bytes (413). The batch is split and sent
    again in parts: every row is encoded, but a text over the limit alone, which fails the
    run naming its row, or is skipped with --on-bad-row skip."""
    from sie_server.corpus.run import BadRowError

    server = start_server(server_args(minilm_dir, "--max-body-bytes", "100000"))
    rows = [json.dumps({"id": f"doc-{i}", "text": TEXTS[i % len(TEXTS)]}) for i in range(10)]
    rows.insert(6, json.dumps({"id": "huge", "text": "word " * 30_000}))
    src = tmp_path / "d.jsonl"
    src.write_text("\n".join(rows) + "\n")
    backend = ServerBackend(server.url, MODEL, ["dense"], {}, api_key=KEY)
    try:
        with pytest.raises(BadRowError, match=r"^row 6 \(id huge\): 413 "):
            run(job(src, tmp_path / "fail"), backend)
        summary = run(job(src, tmp_path / "out", on_bad_row="skip"), backend)
        assert summary["skipped"] == 1 and summary["skipped_first_ids"] == ["huge"]
        assert_output(tmp_path / "out", expected, 10)
        # four texts of 30,000 characters: no two fit in one request, each fits alone
        texts = [f"{i} " + "word " * 6000 for i in range(4)]
        src.write_text("".join(json.dumps({"id": f"doc-{i}", "text": t}) + "\n"
                               for i, t in enumerate(texts)))
        summary = run(job(src, tmp_path / "parts"), backend)
    finally:
        backend.close()
    assert summary["rows"] == 4 and summary["skipped"] == 0
    eng = Engine(Settings(dtype="float32", models={MODEL: str(minilm_dir)}, default_models=[],
                          device="cpu", max_batch_items=1))
    try:
        assert_output(tmp_path / "parts", eng.encode(MODEL, texts, ["dense"]), 4)
    finally:
        eng.close()


def _restart_on_same_port(start_server, server, args: list[str], down_s: float,
                          monkeypatch) -> None:
    server.proc.kill()  # no graceful drain: in-flight requests lose their connection
    server.proc.wait()
    time.sleep(down_s)
    monkeypatch.setattr(conftest, "free_port", lambda: server.port)
    start_server(args)
    monkeypatch.undo()


def test_server_restart_mid_run_is_waited_out(start_server, minilm_dir: Path, expected,
                                              tmp_path: Path, monkeypatch, caplog) -> None:
    args = server_args(minilm_dir)
    server = start_server(args)
    src, out = corpus(tmp_path / "d.jsonl", 200), tmp_path / "out"
    backend = ServerBackend(server.url, MODEL, ["dense"], {}, api_key=KEY, concurrency=2,
                            retry_s=120)
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(run(job(src, out), backend)))
    caplog.set_level(logging.WARNING, "sie.corpus")
    worker.start()
    while len(list(out.glob("part-*.parquet"))) < 2 and worker.is_alive():
        time.sleep(0.01)
    assert worker.is_alive(), "the run ended before the restart"
    _restart_on_same_port(start_server, server, args, 1.0, monkeypatch)
    worker.join(240)
    backend.close()
    assert result["rows"] == 200
    assert result["rows_this_run"] == 200
    assert any("retrying" in r.getMessage() for r in caplog.records)
    assert_output(out, expected, 200)


def test_server_gone_fails_then_rerun_resumes(start_server, minilm_dir: Path, expected,
                                              tmp_path: Path, monkeypatch) -> None:
    args = server_args(minilm_dir)
    server = start_server(args)
    src, out = corpus(tmp_path / "d.jsonl", 200), tmp_path / "out"
    backend = ServerBackend(server.url, MODEL, ["dense"], {}, api_key=KEY, concurrency=2,
                            retry_s=0.5)
    errors: list = []

    def go() -> None:
        try:
            run(job(src, out), backend)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    worker = threading.Thread(target=go)
    worker.start()
    while len(list(out.glob("part-*.parquet"))) < 2 and worker.is_alive():
        time.sleep(0.01)
    _restart_on_same_port(start_server, server, args, 0.0, monkeypatch)
    worker.join(120)
    backend.close()
    assert errors and isinstance(errors[0], SIEConnectionError), errors
    kept = len(list(out.glob("part-*.parquet")))
    assert 2 <= kept < 10
    backend = ServerBackend(server.url, MODEL, ["dense"], {}, api_key=KEY)
    try:
        summary = run(job(src, out), backend)
    finally:
        backend.close()
    assert summary["rows_this_run"] == 200 - 20 * kept
    assert_output(out, expected, 200)
