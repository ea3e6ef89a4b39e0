"""Kill-and-resume: the real `sie-server encode` subprocess is SIGKILLed at random points of
several runs (during start-up, between shards, in the middle of a shard's write); the same
command then finishes the job. The final output holds every row exactly once, in input
order, and equals an uninterrupted run bit for bit (one item per batch on both sides, so no
batch-shape rounding enters)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest

from sie_server.corpus.writer import read_output
from texts import SHORT_TEXTS

ROOT = Path(__file__).resolve().parent.parent
ROWS, SHARD_ROWS = 150, 10


def command(src: Path, out: Path, minilm_dir: Path) -> list[str]:
    return [sys.executable, "-m", "sie_server.cli", "encode", str(src), "--model",
            f"mini={minilm_dir}", "--output", str(out), "--device", "cpu", "--dtype", "float32",
            "--id-field", "id",
            "--shard-rows", str(SHARD_ROWS), "--batch-size", "4", "--concurrency", "4",
            "--max-batch-items", "1", "--log-every", "3600"]


ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}


def shards(out: Path) -> int:
    return len(list(out.glob("part-*.parquet")))


def kill_when(cmd: list[str], out: Path, min_shards: int, extra_s: float,
              log: Path) -> int:
    """Start `cmd`; SIGKILL it `extra_s` seconds after `out` holds `min_shards` finished
    shards (0: after start). Returns the shard count at the kill (-1: it finished first)."""
    with open(log, "ab") as f:
        proc = subprocess.Popen(cmd, env=ENV, stdout=f, stderr=f)
    deadline = time.monotonic() + 240
    while shards(out) < min_shards and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(extra_s)
    if proc.poll() is not None:
        return -1
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return shards(out)


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume(minilm_dir: Path, tmp_path: Path) -> None:
    rng = random.Random(int(os.environ.get("SIE_TEST_SEED", "15")))
    texts = [t for t in SHORT_TEXTS if t.strip()]
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"id": f"doc-{i}", "text": texts[i % len(texts)]}) + "\n"
                           for i in range(ROWS)))
    n_shards = -(-ROWS // SHARD_ROWS)
    log = tmp_path / "runs.log"

    ref = tmp_path / "ref"
    done = subprocess.run(command(src, ref, minilm_dir), env=ENV, capture_output=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr.decode()

    out = tmp_path / "out"
    kills = [kill_when(command(src, out, minilm_dir), out, 0, rng.uniform(1.0, 4.0), log)]
    for _ in range(2):  # later kills: after a random number of new shards, at a random instant
        target = min(shards(out) + rng.randint(1, 4), n_shards - 1)
        kills.append(kill_when(command(src, out, minilm_dir), out, target,
                               rng.uniform(0.0, 0.3), log))
    final = subprocess.run(command(src, out, minilm_dir), env=ENV, capture_output=True,
                           timeout=300)
    assert final.returncode == 0, final.stderr.decode() + log.read_text()
    summary = json.loads(final.stdout)
    print("kills at shard counts", kills, "then", summary)
    assert any(k > 0 for k in kills), f"no kill landed mid-run: {kills}"

    table, want = read_output(out), read_output(ref)
    ids = table.column("id").to_pylist()
    assert ids == [f"doc-{i}" for i in range(ROWS)]  # every row exactly once, in order
    assert table.equals(want)  # bit-equal to the uninterrupted run
    assert not list(out.glob("*.tmp"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["rows"] == ROWS
    assert len(manifest["shards"]) == n_shards

    # a finished run rerun does nothing
    again = subprocess.run(command(src, out, minilm_dir), env=ENV, capture_output=True,
                           timeout=300)
    assert again.returncode == 0 and json.loads(again.stdout)["already_complete"]
    assert isinstance(table.schema.field("dense").type, pa.FixedSizeListType)
