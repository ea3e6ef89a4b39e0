"""`sie-server encode --ray`: the corpus command on Ray Data actors (`sie_server.ray.data.
embed_dataset`) of a real local Ray cluster on 127.0.0.1: every row once, in order, bit-equal
to the in-process engine (one item per batch on both sides), and a rerun resumes / does
nothing like the other backends."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT

pytest.importorskip("ray")
ray_data = pytest.importorskip("sie_server.ray.data")

from sie_server.columns import from_columns  # noqa: E402
from sie_server.config import Settings  # noqa: E402
from sie_server.corpus.backends import RayBackend  # noqa: E402
from sie_server.corpus.readers import expand  # noqa: E402
from sie_server.corpus.run import Job, run  # noqa: E402
from sie_server.corpus.writer import read_output  # noqa: E402
from sie_server.engine import Engine  # noqa: E402
from sie_server.ray import cluster  # noqa: E402
from texts import SHORT_TEXTS  # noqa: E402

MODEL = "mini"
TEXTS = [t for t in SHORT_TEXTS if t.strip()][:45]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_cluster():
    """A local cluster on loopback; its workers import this checkout's sources."""
    import ray

    os.environ.update(cluster.LOCAL_ENV)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT / "src"), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
    os.environ["HF_HUB_OFFLINE"] = "1"
    cluster.connect(num_cpus=2)
    yield
    ray.shutdown()


def test_ray_backend_equals_in_process(ray_cluster, minilm_dir: Path, tmp_path: Path) -> None:
    settings = Settings(dtype="float32", models={MODEL: str(minilm_dir)}, default_models=[], device="cpu",
                        max_batch_items=1)
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({"id": f"doc-{i}", "text": t}) + "\n"
                           for i, t in enumerate(TEXTS)))
    job = Job(files=expand([str(src)]), output=tmp_path / "out", output_types=["dense"],
              id_field="id", shard_rows=20, batch_size=20, concurrency=1)
    backend = RayBackend(None, settings, MODEL, ["dense"], {}, num_actors=1)
    try:
        summary = run(job, backend)
        assert summary["rows"] == len(TEXTS) and summary["shards"] == 3
        assert run(job, backend)["already_complete"]
    finally:
        backend.close()
    eng = Engine(settings)
    try:
        want = eng.encode(MODEL, TEXTS, ["dense"])
    finally:
        eng.close()
    table = read_output(tmp_path / "out")
    assert table.column("id").to_pylist() == [f"doc-{i}" for i in range(len(TEXTS))]
    # Ray's actors run one OpenMP thread (num_cpus <= 1), so float32 sums may round
    # differently from this process: equal within float32 tolerance across backends
    for i, (got, exp) in enumerate(zip(from_columns(table), want, strict=True)):
        assert got.token_count == exp.token_count, i
        np.testing.assert_allclose(got.dense, exp.dense, atol=1e-6, err_msg=str(i))
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["backend"] == "ray" and len(manifest["config"]["model"]["weights_sha256"]) == 64



def test_a_refused_text_fails_its_shard_on_ray(ray_cluster, bge_m3_dir: Path,
                                               tmp_path: Path) -> None:
    """The engine's refusal inside a Ray actor (XLM-R's "z" * 300,000, a 413 in-process)
    reaches the run as the engine's error, naming the rows of its Dataset: Ray runs a
    Dataset per shard (one per text would load the model per text), so even with
    --on-bad-row skip the run stops and says what to do."""
    from sie_server.corpus.run import BadRowError

    settings = Settings(dtype="float32", models={"m3": str(bge_m3_dir)}, default_models=[],
                        device="cpu")
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in
                           [("a", TEXTS[0]), ("huge", "z" * 300_000), ("b", TEXTS[1])]))
    job = Job(files=expand([str(src)]), output=tmp_path / "out", output_types=["dense"],
              id_field="id", shard_rows=10, batch_size=10, concurrency=1, on_bad_row="skip",
              split_refused=False)  # as `encode --ray` runs
    backend = RayBackend(None, settings, "m3", ["dense"], {}, num_actors=1)
    try:
        with pytest.raises(BadRowError, match=r"^rows 0 to 2: one word of more "
                                              r"than 262,144 characters.*--ray encodes whole"):
            run(job, backend)
    finally:
        backend.close()
