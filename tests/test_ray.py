"""The Ray layer on a real local Ray cluster (loopback only, started here, shut down at the end).

Serve: 2 replicas behind the Gateway; SDK results equal the in-process engine's; a second
model loads on demand and is routed to the replica holding it; /metrics names its replica;
a replica killed under load loses no request and is replaced. Ray Data: 2 actors over a few
hundred texts give every row once, in input order, equal to the in-process engine.
Tolerances: float32 noise (atol 1e-5): replicas batch requests differently from the engine
here, and the packed forward is independent of batch composition only up to rounding.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import re
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import LEGAL_LORA, ROOT, free_port
from test_score import ce_bert_dir  # noqa: F401  (the random-weight cross-encoder fixture)
from texts import SHORT_TEXTS, miracl_passages

from sie_server.ray import cluster  # noqa: E402  (imports no ray)

os.environ.update(cluster.LOCAL_ENV)  # before ray is imported: Ray reads them at import
ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

from sie_sdk import SIEAsyncClient, SIEClient  # noqa: E402
from sie_sdk.errors import InvalidRequestError, SIEServerError  # noqa: E402
from sie_sdk.types import Item  # noqa: E402
from sie_server.config import Settings  # noqa: E402
from sie_server.engine import Engine  # noqa: E402
from sie_server.ray.serve import ReplicaOptions, build_app, routed_model, split_args  # noqa: E402

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
BGE = "BAAI/bge-m3"
CE, NLI = "test/ce-bert", "test/nli-bert"
ALL = ["dense", "sparse", "multivector"]
ATOL = 1e-5
RETRYABLE = (429, 503)
REPLICA_LABEL = re.compile(r'^sie_replica\{[^}]*\breplica="([^"]+)"[^}]*\} 1\.0$', re.M)


@pytest.fixture(scope="module")
def nli_dir(tmp_path_factory) -> Path:
    """A random-weight BERT NLI classifier (extraction's zero-shot classifications)."""
    from test_nli_zero_shot import _build

    return _build(tmp_path_factory.mktemp("nli") / "bert", "bert")


@pytest.fixture(scope="module")
def settings(bge_m3_dir: Path, legal_lora, ce_bert_dir: Path, nli_dir: Path) -> Settings:  # noqa: F811
    """MiniLM loaded; BGE-M3, a cross-encoder (the rerank default, not preloaded) and an NLI
    classifier on demand."""
    return Settings(dtype="float32", device="cpu", default_models=[MINILM],
                    models={BGE: str(bge_m3_dir), CE: str(ce_bert_dir), NLI: str(nli_dir)},
                    rerank_model=CE, adapter_roots=[legal_lora["root"]])


@pytest.fixture(scope="module")
def engine(settings: Settings):
    """The in-process engine the Ray results must equal."""
    e = Engine(settings)
    yield e
    e.close()


@pytest.fixture(scope="module")
def ray_cluster():
    """A 2-CPU local cluster on 127.0.0.1; its workers import this checkout's sources."""
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT / "src"), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
    os.environ["HF_HUB_OFFLINE"] = "1"
    cluster.connect(num_cpus=2)
    yield
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def serve_app(ray_cluster, settings: Settings) -> dict:
    port, metrics_port = free_port(), free_port()
    cluster.start_http("127.0.0.1", port)
    app = build_app(settings, ReplicaOptions(metrics_port=metrics_port), num_replicas=2,
                    ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=16,
                    max_queued_requests=512)
    serve.run(app, name="sie", route_prefix="/")
    return {"url": f"http://127.0.0.1:{port}", "metrics_port": metrics_port}


def replica_actors() -> dict[str, str]:
    """Replica id -> actor name of the live SIE replicas."""
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
    return {n.rsplit("#", 1)[1]: n for n in names if n.startswith("SERVE_REPLICA::sie#sie#")}


def kill_a_live_replica(prefer: str | None = None) -> str:
    """Kill one live SIE replica (`prefer`, the id of one, first); its id. The named-actor
    list can still hold a replica that Serve has already replaced: those names fail to
    resolve and are skipped."""
    for _ in range(20):
        for rid, name in sorted(replica_actors().items(), key=lambda kv: kv[0] != prefer):
            try:
                actor = ray.get_actor(name, namespace="serve")
            except ValueError:
                continue
            ray.kill(actor)
            return rid
        time.sleep(0.5)
    pytest.fail(f"no live replica to kill: {replica_actors()}")


def post_encode(url: str, model: str, texts: list[str]) -> httpx.Response:
    return httpx.post(f"{url}/v1/encode/{model}", json={"items": [{"text": t} for t in texts]},
                      timeout=60)


def assert_same(got: dict, want, output_types: list[str]) -> None:
    if "dense" in output_types:
        np.testing.assert_allclose(got["dense"], want.dense, atol=ATOL)
    if "sparse" in output_types:
        np.testing.assert_array_equal(got["sparse"]["indices"], want.sparse[0])
        np.testing.assert_allclose(got["sparse"]["values"], want.sparse[1], atol=ATOL)
    if "multivector" in output_types:
        np.testing.assert_allclose(got["multivector"], want.multivector, atol=ATOL)


def test_ray_data_embeds_every_row_in_order(ray_cluster, engine) -> None:
    import pyarrow as pa
    import ray.data

    from sie_server.ray.data import embed_dataset

    texts = miracl_passages()[:300]
    table = pa.table({"id": list(range(len(texts))), "text": texts})
    ds = ray.data.from_arrow(table).repartition(6)
    out = embed_dataset(ds, BGE, ALL, settings=Settings(dtype="float32", device="cpu",
                                                        models=engine.settings.models,
                                                        default_models=[]),
                        num_actors=2, batch_size=32).to_arrow_refs()
    result = pa.concat_tables(ray.get(out))
    assert result.column("id").to_pylist() == list(range(len(texts)))  # each once, in order
    assert result.column("text").to_pylist() == texts
    want = engine.encode(BGE, texts, ALL)
    dense = np.stack(result.column("dense").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(dense, np.stack([w.dense for w in want]), atol=ATOL)
    for i, w in enumerate(want):
        np.testing.assert_array_equal(result.column("sparse_indices")[i].values.to_numpy(),
                                      w.sparse[0])
        np.testing.assert_allclose(result.column("sparse_values")[i].values.to_numpy(),
                                   w.sparse[1], atol=ATOL)
        mv = np.stack(result.column("multivector")[i].values.to_numpy(zero_copy_only=False))
        np.testing.assert_allclose(mv, w.multivector, atol=ATOL)
    assert result.column("token_count").to_pylist() == [w.token_count for w in want]


def readme_ray_data_example() -> str:
    """The README's Ray Data block (the python fence calling embed_dataset)."""
    fences = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    return next(code for code in fences if "embed_dataset(" in code)


def test_readme_ray_data_example_runs(ray_cluster, engine, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f"passage {i}: {SHORT_TEXTS[i % len(SHORT_TEXTS)]}" for i in range(64)]
    pq.write_table(pa.table({"id": list(range(64)), "text": texts}), tmp_path / "passages.parquet")
    exec(readme_ray_data_example().replace("/data/", f"{tmp_path}/"), {})
    out = pq.read_table(tmp_path / "passages-embedded")
    assert sorted(out.column("id").to_pylist()) == list(range(64))
    assert out.schema.field("dense").type == pa.list_(pa.float16(), 384)
    by_id = dict(zip(out.column("id").to_pylist(), out.column("dense").to_pylist()))
    # the example runs at the default dtype (bf16 on CPUs that compute it natively), stored as
    # float16: against the fp32 engine, bf16's stated dense tolerance (cosine >= 0.999)
    for i, w in enumerate(engine.encode(MINILM, texts)):
        got = np.array(by_id[i], np.float32)
        assert float(got @ w.dense) / float(np.linalg.norm(got)) >= 0.999, i


def test_cluster_stays_on_loopback(ray_cluster) -> None:
    assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}


def test_sdk_through_serve_equals_in_process_engine(serve_app, engine, cli_command) -> None:
    texts = SHORT_TEXTS
    want = engine.encode(MINILM, texts)
    with SIEClient(serve_app["url"], max_items_per_request=8) as client:
        got = client.encode(MINILM, [Item(text=t) for t in texts])
    assert len(got) == len(texts)
    for g, w in zip(got, want):
        assert_same(g, w, ["dense"])
    # both replicas serve (power of two choices among the replicas holding the model)
    seen: set[str] = set()
    lock = threading.Lock()

    def one(i: int) -> None:
        r = post_encode(serve_app["url"], MINILM, [texts[i % len(texts)]])
        assert r.status_code == 200, r.text
        with lock:
            seen.add(r.headers["x-sie-replica"])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(24)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert seen == set(replica_actors())


def test_errors_async_sdk_and_openai_client_come_along(serve_app, engine) -> None:
    url = serve_app["url"]
    r = post_encode(url, "no/such-model", ["x"])
    assert r.status_code == 404 and r.json()["detail"]["code"] == "MODEL_NOT_FOUND"
    with SIEClient(url) as client, pytest.raises(InvalidRequestError, match="colour"):
        client.encode(MINILM, Item(text="x"), output_types=["colour"])
    from openai import OpenAI

    want = engine.encode(MINILM, ["hello there"])[0].dense
    openai_client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    got = openai_client.embeddings.create(model=MINILM, input=["hello there"])
    np.testing.assert_allclose(got.data[0].embedding, want, atol=ATOL)

    async def with_async_sdk() -> dict:
        async with SIEAsyncClient(url) as client:
            return await client.encode(MINILM, Item(text="hello there"))

    np.testing.assert_allclose(asyncio.run(with_async_sdk())["dense"], want, atol=ATOL)
    assert httpx.get(f"{url}/readyz").json() == {"status": "ready"}


def test_second_model_loads_on_demand_and_is_routed_by_path(serve_app, engine) -> None:
    url = serve_app["url"]
    texts = SHORT_TEXTS[:12]
    with SIEClient(url) as client:
        got = client.encode(BGE, [Item(text=t) for t in texts], output_types=ALL)
    for g, w in zip(got, engine.encode(BGE, texts, ALL)):
        assert_same(g, w, ALL)
    # a LoRA adapter hot-loads inside the replica, as in the server
    with SIEClient(url) as client:
        adapted = client.encode(BGE, [Item(text=t) for t in texts], output_types=ALL,
                                options={"lora_id": LEGAL_LORA})
    for g, w, base in zip(adapted, engine.encode(BGE, texts, ALL, {"lora_id": LEGAL_LORA}), got):
        assert_same(g, w, ALL)
        assert not np.allclose(g["dense"], base["dense"], atol=1e-3)  # the adapter acts
    holders = set()
    for _ in range(3):  # which replicas loaded it: the one(s) that answered so far
        holders.add(post_encode(url, BGE, ["warm"]).headers["x-sie-replica"])
    time.sleep(1.0)  # replicas report their models to the routers every 0.1 s
    answered = {post_encode(url, BGE, [f"query {i}"]).headers["x-sie-replica"]
                for i in range(8)}
    if len(holders) == 1:  # one replica holds it: sequential requests all go there
        assert answered == holders
    for _ in range(50):  # /v1/models names no model: any replica answers
        r = httpx.get(f"{url}/v1/models")
        if r.headers["x-sie-replica"] in holders:
            assert {m["id"]: m["state"] for m in r.json()["models"]}[BGE] == "loaded"
            break
    else:
        pytest.fail("no holder of the model answered /v1/models")


def test_metrics_name_their_replica(serve_app) -> None:
    r = httpx.get(f"{serve_app['url']}/metrics")
    label = REPLICA_LABEL.search(r.text)
    assert label and label.group(1) == r.headers["x-sie-replica"]
    # every replica on this node also serves its own /metrics on metrics_port + local rank
    scraped = set()
    for rank in range(2):
        text = httpx.get(f"http://127.0.0.1:{serve_app['metrics_port'] + rank}/metrics").text
        scraped.add(REPLICA_LABEL.search(text).group(1))
    assert scraped == set(replica_actors())


def test_replica_killed_under_load_loses_nothing(serve_app, engine) -> None:
    url = serve_app["url"]
    texts = [f"request {i}: {SHORT_TEXTS[i % len(SHORT_TEXTS)]}" for i in range(320)]
    want = {t: r.dense for t, r in zip(texts, engine.encode(MINILM, texts))}
    before = replica_actors()
    got: dict[str, np.ndarray] = {}
    statuses: list[int] = []
    failures: list[BaseException] = []
    finished: list[float] = []
    lock = threading.Lock()

    def client_loop(mine: list[str]) -> None:
        with SIEClient(url, timeout=120) as client:
            for t in mine:
                for _ in range(10):  # what a caller does with a retryable status
                    try:
                        vector = client.encode(MINILM, Item(text=t))["dense"]
                        break
                    except SIEServerError as err:
                        with lock:
                            statuses.append(err.status)
                        if err.status not in RETRYABLE:
                            failures.append(err)
                            return
                        time.sleep(err.retry_after or 0.5)
                with lock:
                    got[t] = vector
                    finished.append(time.monotonic())

    # 16 clients keep both replicas busy (each holds ~8 requests), so the victim dies with
    # some; the kill waits for a quarter of the answers, however fast the machine
    threads = [threading.Thread(target=client_loop, args=(texts[i::16],)) for i in range(16)]
    [t.start() for t in threads]
    deadline = time.monotonic() + 120
    while len(finished) < len(texts) // 4 and time.monotonic() < deadline:
        time.sleep(0.02)
    # a replica that serves this model now (multiplexing may keep it off the other replica,
    # which then dies idle: a flaky failure of the check below in one full run)
    busy = post_encode(url, MINILM, ["which replica serves it"]).headers.get("x-sie-replica")
    victim = kill_a_live_replica(prefer=busy)
    killed_at = time.monotonic()
    [t.join() for t in threads]
    assert min(finished) < killed_at < max(finished)  # the kill came mid-load
    # requests were on the victim when it died: the Gateway retried one ("replica died during
    # a request"), or Serve's router saw one fail and re-sent it itself (under load in full
    # runs the victim's requests can all still be queued there)
    logs = Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"  # Serve's
    deadline = time.monotonic() + 10  # the Gateway's log file may lag its requests
    seen = ("replica died during a request", f"Replica(id='{victim}', deployment='sie', "
            "app='sie') will not be considered for future requests because it has died")
    while not any(line in f.read_text(errors="replace") for f in
                  logs.glob("replica_sie_gateway_*.log") for line in seen):
        assert time.monotonic() < deadline, "no request was on the victim when it died"
        time.sleep(0.2)
    assert not failures, failures
    assert set(statuses) <= set(RETRYABLE)
    assert set(got) == set(texts)
    for t in texts:
        np.testing.assert_allclose(got[t], want[t], atol=ATOL)
    # Serve starts a replacement, and it serves
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline:
        r = post_encode(url, MINILM, ["after the kill"])
        new = r.headers.get("x-sie-replica")
        if r.status_code == 200 and new not in before:
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"no replacement replica answered; replicas now {replica_actors()}")
    assert victim not in replica_actors()
    np.testing.assert_allclose(np.array(r.json()["items"][0]["dense"]["values"], dtype=np.float32),
                               engine.encode(MINILM, ["after the kill"])[0].dense, atol=ATOL)


def test_app_builder_arguments(bge_m3_dir: Path) -> None:
    """`serve run sie_server.ray:app key=value` passes strings; config files pass values."""
    s, replica, gateway, deployment = split_args({
        "device": "cpu", "models": f'{{"{BGE}": "{bge_m3_dir}"}}', "num_replicas": "2",
        "ray_actor_options": {"num_cpus": 1, "num_gpus": 0.5}, "adapter_roots": ["/a"],
        "switch_interval_ms": "1", "retries": 5})
    assert s.device == "cpu" and s.models == {BGE: str(bge_m3_dir)}
    assert s.adapter_roots == [Path("/a")]
    assert deployment == {"num_replicas": 2, "ray_actor_options": {"num_cpus": 1, "num_gpus": 0.5}}
    assert replica.switch_interval_ms == 1 and gateway.retries == 5
    with pytest.raises(ValueError, match="unknown argument 'replicas'"):
        split_args({"replicas": 2})
    # the path `serve run sie_server.ray:app k=v` takes: import, then Serve calls the builder
    from ray._common.utils import import_attr
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    built = call_user_app_builder_with_args_if_necessary(
        import_attr("sie_server.ray:app"), {"device": "cpu", "num_replicas": "2"})
    assert isinstance(built, serve.Application)


def test_serve_config_file_is_valid() -> None:
    """deploy/ray/serve.yaml (and the RayService's serveConfigV2) pass Serve's own schema,
    and their args build the application."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(
        yaml.safe_load((ROOT / "deploy/ray/serve.yaml").read_text()))
    assert {a.import_path for a in config.applications} == {"sie_server.ray:app"}
    from sie_server.ray import app

    for application in config.applications:
        assert isinstance(app(application.args), serve.Application)
    # the KubeRay manifest's serveConfigV2 too (its CRD check needs KubeRay's CRD file:
    # deploy/ray/check_rayservice.py, see docs/RAY.md)
    import importlib.util

    spec = importlib.util.spec_from_file_location("check_rayservice",
                                                  ROOT / "deploy/ray/check_rayservice.py")
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    manifest = yaml.safe_load((ROOT / "deploy/ray/rayservice.yaml").read_text())
    assert check.check_serve_config(manifest) == 1
    manifest["spec"]["serveConfigV2"] = manifest["spec"]["serveConfigV2"].replace(
        "num_gpus: 1", "num_gpu: 1")
    with pytest.raises(ValueError, match="num_gpu"):
        check.check_serve_config(manifest)


@pytest.fixture(scope="module")
def cli_command(serve_app, tmp_path_factory):
    """`sie-server ray --address <this cluster>` with a second application under /cli,
    started early: it deploys while the other tests run."""
    import subprocess
    import sys

    port = serve_app["url"].rsplit(":", 1)[1]
    log_path = tmp_path_factory.mktemp("cli") / "sie-server-ray.log"
    log = log_path.open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "sie_server.cli", "ray", "--address",
         ray.get_runtime_context().gcs_address, "--port", port, "--name", "cli",
         "--route-prefix", "/cli", "--device", "cpu", "--dtype", "float32",
         "--default-model", MINILM,
         "--num-cpus", "0.25", "--num-replicas", "1",
         "--max-ongoing-requests", "1", "--max-queued-requests", "1"],
        env=os.environ.copy(), stdout=log, stderr=subprocess.STDOUT)
    yield {"proc": proc, "log": log_path, "port": port, "url": f"{serve_app['url']}/cli"}
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    log.close()


def test_sie_server_ray_command_joins_the_cluster(cli_command, engine) -> None:
    """The command deploys its application on the running cluster, serves under its route
    prefix, and deletes it on SIGTERM (exit 0)."""
    import signal

    proc, log_path, url = cli_command["proc"], cli_command["log"], cli_command["url"]
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if "serving on" in log_path.read_text():  # deployed and answering
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"the command did not serve: {proc.poll()}\n{log_path.read_text()}")
        with SIEClient(url) as client:
            got = client.encode(MINILM, [Item(text=t) for t in SHORT_TEXTS[:5]])
        for g, w in zip(got, engine.encode(MINILM, SHORT_TEXTS[:5])):
            assert_same(g, w, ["dense"])
        # one request at a time and one queued (--max-ongoing/queued-requests 1): the rest
        # of a burst gets SIE's 503 QUEUE_FULL with Retry-After, the SDK's OverloadedError
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            burst = list(pool.map(lambda i: post_encode(url, MINILM, SHORT_TEXTS[:16]), range(12)))
        refused = [r for r in burst if r.status_code == 503]
        assert refused and {r.status_code for r in burst} == {200, 503}
        assert refused[0].json()["detail"]["code"] == "QUEUE_FULL"
        assert refused[0].headers["retry-after"] == "1"
        # the same refusal on OpenAI's route comes in OpenAI's envelope (api/envelopes.py)
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            burst = list(pool.map(lambda i: httpx.post(f"{url}/v1/embeddings", json={
                "model": MINILM, "input": SHORT_TEXTS[:16]}, timeout=60), range(12)))
        refused = [r for r in burst if r.status_code == 503]
        assert refused and {r.status_code for r in burst} == {200, 503}
        assert refused[0].json()["error"]["code"] == "QUEUE_FULL"
        assert refused[0].headers["x-sie-error-code"] == "QUEUE_FULL"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    output = log_path.read_text()
    assert proc.returncode == 0, output
    assert f"serving on http://127.0.0.1:{cli_command['port']}/cli" in output
    assert httpx.get(f"{url}/readyz").status_code == 404


# ---------------------------------------------------------------- every protocol through Serve

@pytest.fixture(scope="module")
def direct_server(start_module_server, settings: Settings):
    """`sie-server serve` with the Serve application's settings."""
    args = [a for name, folder in settings.models.items() for a in ("--model", f"{name}={folder}")]
    return start_module_server([*args, "--default-model", MINILM, "--rerank-model", settings.rerank_model,
                         "--adapter-root", str(settings.adapter_roots[0])])


def test_gateway_routes_by_the_model_each_route_names(settings: Settings) -> None:
    """Every POST / DELETE route of the app's operation table: one with a `model` path
    parameter routes by it (a profile suffix by its model), one whose request has a `model`
    field by the body's, else by --embed-model / --rerank-model; any other names no model."""
    import dataclasses
    import threading
    import typing

    from sie_server.api.app import operations
    from sie_server.api.calls import Calls

    routing = dataclasses.replace(settings, embed_model="E", rerank_model="R",
                                  infinity_prefix="/inf")
    engine = Engine(dataclasses.replace(routing, default_models=[]))
    try:
        ops = operations(Calls(engine), threading.Event(), [])
    finally:
        engine.close()
    checked = set()
    for op in ops:
        if op.method not in ("POST", "DELETE") or op.tag == "not served":
            continue
        path = op.path.replace(":path", "")
        members = typing.get_args(op.request) or (op.request,)
        if "model" in op.path_params or "path" in op.path_params:
            url = path.replace("{model}", "org/m:fast").replace("{path}", "org/m/adapters/a")
            assert routed_model(op.method, url, b"", routing) == "org/m", op.path
        elif any("model" in getattr(m, "model_fields", {}) for m in members):
            assert routed_model(op.method, path, b'{"model": "org/b:p"}', routing) == "org/b"
            assert routed_model(op.method, path, b'{"inputs": "x"}', routing) in ("E", "R")
        else:
            assert routed_model(op.method, path, b'{"model": "org/b"}', routing) is None, path
        checked.add(path)
    assert {"/v1/extract/{model}", "/v1/tokens/{model}", "/embed", "/", "/rerank",
            "/inf/rerank", "/inf/embeddings", "/v2/rerank", "/v1/embeddings"} <= checked
    assert [routed_model("POST", p, b"{}", routing) for p in ("/embed", "/predict", "/rerank")] \
        == ["E", "R", "R"]
    assert routed_model("POST", "/embeddings", b'{"model": "default/not-specified"}', routing) == "E"
    assert routed_model("GET", "/v1/models/org/m/adapters/a", b"", routing) is None


def _comparable(r: httpx.Response):
    """A response body without what differs between two servers by design: top-level `id`
    (a fresh uuid), and `created`, `request_id` and `timing` wherever they are."""
    if not r.headers.get("content-type", "").startswith("application/json"):
        return r.text

    def strip(node, top=False):
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items()
                    if k not in ("created", "request_id", "timing") and not (top and k == "id")}
        return [strip(v) for v in node] if isinstance(node, list) else node
    return strip(r.json(), top=True)


def _assert_close(got, want, where: str = "") -> None:
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), where
        for k in want:
            _assert_close(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            _assert_close(g, w, f"{where}[{i}]")
    elif isinstance(want, float):
        assert got == pytest.approx(want, abs=ATOL), where
    else:
        assert got == want, where


def test_every_protocol_through_serve_equals_a_direct_server(serve_app, direct_server) -> None:
    """One request per route of the other protocols and SIE's model-in-path routes, through
    Serve's Gateway and straight to `sie-server serve` with the same settings: the same status
    and answer (vectors and scores within float32 noise, ATOL), TEI's timing headers along."""
    q, texts = "Where is the cat?", SHORT_TEXTS[:3]
    requests = [
        ("POST", f"/v1/score/{CE}", {"query": {"text": q}, "items": [{"text": t} for t in texts]}),
        ("POST", f"/v1/extract/{NLI}", {"items": [{"text": texts[0]}],
                                        "params": {"labels": ["sports", "weather"]}}),
        ("POST", f"/v1/tokens/{MINILM}", {"items": [{"text": texts[0]}], "ids": [101, 102]}),
        ("POST", "/embed", {"inputs": texts}),
        ("POST", "/embed_sparse", {"inputs": texts, "model": BGE}),
        ("POST", "/embed_all", {"inputs": texts[:1], "model": BGE}),
        ("POST", "/similarity", {"inputs": {"source_sentence": q, "sentences": texts}}),
        ("POST", "/rerank", {"query": q, "texts": texts, "return_text": True}),  # TEI's
        ("POST", "/predict", {"inputs": [[q, t] for t in texts]}),
        ("POST", "/tokenize", {"inputs": texts[0]}),
        ("POST", "/decode", {"ids": [101, 7592, 102]}),
        ("POST", "/", {"inputs": texts[0]}),
        ("GET", "/info", None),
        ("POST", "/v1/rerank", {"model": BGE, "query": q, "documents": texts,
                                "return_documents": True}),
        ("POST", "/v2/rerank", {"model": CE, "query": q, "documents": texts, "top_n": 2}),
        ("POST", "/rerank", {"query": q, "documents": texts, "return_documents": True}),
        ("POST", "/embeddings", {"input": texts}),  # infinity's
        ("GET", "/models", None),
        ("POST", "/v1/embeddings", {"input": texts, "model": BGE}),
        ("GET", "/openapi.json", None),
        ("GET", "/docs", None),
    ]
    timed = {"/embed", "/embed_sparse", "/embed_all", "/similarity", "/rerank", "/predict", "/",
             "/embeddings", "/v1/embeddings"}
    for method, path, body in requests:
        through = httpx.request(method, serve_app["url"] + path, json=body, timeout=120)
        direct = httpx.request(method, direct_server.url + path, json=body, timeout=120)
        assert through.status_code == direct.status_code == 200, (path, through.text[:300])
        assert "x-sie-replica" in through.headers
        _assert_close(_comparable(through), _comparable(direct), path)
        if path in timed and "documents" not in body:  # infinity's /rerank: not TEI's
            assert int(through.headers["x-total-time"]) >= int(through.headers["x-inference-time"])
