"""LoRA over HTTP: preload / unload routes, GET /v1/models, errors, and the SDK's
`client.encode(..., options={"lora_id": ...})` against a real server (all-MiniLM-L6-v2)."""
from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lora_adapters import COS, cosine, make_adapter, mean_pool_reference, tokenize  # noqa: E402
from reference import minilm_dir  # noqa: E402

from sie_server.api.app import create_app, split_adapter_path  # noqa: E402
from sie_server.config import Settings  # noqa: E402
from sie_server.engine import Engine  # noqa: E402

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
LORA = "team/adapters/legal-r4"  # holds "/adapters/" itself: the route must still split right
TEXTS = ["What is the statute of limitations for a contract claim?", "Hello world!"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    made = make_adapter(minilm_dir(), root / LORA, r=4, targets=["query", "value", "dense"],
                        seed=7)
    (root / "broken").mkdir()
    (root / "broken/adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8}))
    (root / "broken/adapter_model.safetensors").write_bytes(b"not a safetensors file")
    want = mean_pool_reference(made["merged"], tokenize(minilm_dir(), TEXTS, 256))
    engine = Engine(Settings(models={MODEL: str(minilm_dir())}, default_models=[MODEL],
                             adapter_roots=[root], device="cpu", dtype="float32"))
    engine.start()
    yield engine, want
    engine.close()


@pytest.fixture(scope="module")
def http(setup):
    from starlette.testclient import TestClient

    engine, _ = setup
    with TestClient(create_app(engine, load_defaults=False)) as client:
        yield client


def encode(http, lora_id=None):
    options = {"lora_id": lora_id} if lora_id else {}
    r = http.post(f"/v1/encode/{MODEL}", json={"items": [{"text": t} for t in TEXTS],
                                                "params": {"options": options}})
    assert r.status_code == 200, r.text
    return [np.array(i["dense"]["values"], dtype=np.float32) for i in r.json()["items"]]


def test_split_adapter_path():
    models = {"BAAI/bge-m3", "org/adapters"}
    assert split_adapter_path("BAAI/bge-m3/adapters/org/lora", models) == ("BAAI/bge-m3", "org/lora")
    assert split_adapter_path("org/adapters/adapters/x/adapters/y", models) == (
        "org/adapters", "x/adapters/y")
    assert split_adapter_path("unknown/m/adapters/a", models) == ("unknown/m", "a")


def test_preload_list_encode_unload(http, setup):
    _, want = setup
    url = f"/v1/models/{MODEL}/adapters/{LORA}"
    r = http.post(url)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == MODEL and body["adapter"]["id"] == LORA
    assert body["adapter"]["rank"] == 4 and body["adapter"]["state"] == "ready"

    models = {m["id"]: m for m in http.get("/v1/models").json()["models"]}
    assert [a["id"] for a in models[MODEL]["adapters"]] == [LORA]
    assert models[MODEL]["adapter_bytes"] == body["adapter"]["bytes"] > 0  # in the budget

    got, base = encode(http, LORA), encode(http)
    for g, w, b in zip(got, want, base):
        assert cosine(g, w) >= COS
        assert cosine(b, w) < 0.9999

    r = http.delete(url)
    assert r.status_code == 200 and r.json()["unloaded"] == {"id": LORA, "in_use": 0}
    models = {m["id"]: m for m in http.get("/v1/models").json()["models"]}
    assert models[MODEL]["adapters"] == [] and models[MODEL]["adapter_bytes"] == 0
    r = http.delete(url)
    assert r.status_code == 404 and r.json()["detail"]["code"] == "LORA_NOT_FOUND"

    # the first encode request loads it again by itself
    assert all(cosine(g, w) >= COS for g, w in zip(encode(http, LORA), want))


@pytest.mark.parametrize("path, status, code, fragment", [
    (f"{MODEL}/adapters/broken", 422, "INVALID_ADAPTER", "'broken'"),
    (f"{MODEL}/adapters/nope", 404, "LORA_NOT_FOUND", "'nope'"),
    (f"{MODEL}/adapters/%2E%2E/etc", 400, "INVALID_INPUT", "'..'"),  # not normalised away
    ("no/such-model/adapters/x", 404, "MODEL_NOT_FOUND", "no/such-model"),
    (f"{MODEL}/nothing-here", 404, "NOT_FOUND", "/adapters/"),
])
def test_adapter_route_errors(http, path, status, code, fragment):
    r = http.post(f"/v1/models/{path}")
    assert r.status_code == status, r.text
    err = r.json()["detail"]
    assert err["code"] == code and fragment in err["message"], err
    r = http.post(f"/v1/encode/{MODEL}", json={"items": [{"text": "x"}],
                                                "params": {"options": {"lora_id": "broken"}}})
    assert r.status_code == 422 and "corrupt or truncated" in r.json()["detail"]["message"]
    assert http.get("/healthz").status_code == 200


def test_sdk_encode_with_lora_id(setup):
    """The README snippet: client.encode(model, text, options={"lora_id": ...})."""
    import uvicorn

    from sie_sdk import SIEClient

    engine, want = setup
    config = uvicorn.Config(create_app(engine, load_defaults=False), host="127.0.0.1", port=0,
                            log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        port = server.servers[0].sockets[0].getsockname()[1]
        with SIEClient(f"http://127.0.0.1:{port}") as client:
            one = client.encode(MODEL, TEXTS[0], options={"lora_id": LORA})
            many = client.encode(MODEL, TEXTS, options={"lora_id": LORA})
        assert cosine(one["dense"], want[0]) >= COS
        assert all(cosine(r["dense"], w) >= COS for r, w in zip(many, want))
    finally:
        server.should_exit = True
        thread.join(timeout=10)
