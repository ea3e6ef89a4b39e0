"""Images over HTTP against a real server process: SIE's wire form (`{"images": [{"data",
"format"}]}`, msgpack bytes or base64 in JSON), vectors equal to transformers' (cosine >=
0.99999), scores within 1e-4, and bad images refused with a 400 naming the item, bounded in
memory: a 100-megapixel PNG bomb (300 MB decoded) leaves the server's peak RSS within 64 MB.
"""

from __future__ import annotations

import base64
from pathlib import Path

import httpx
import msgpack
import numpy as np
import pytest
from clip_reference import Reference, bad_images, bomb_png, decoded, make_images
from make_clip_test_models import build
from texts import SHORT_TEXTS

pytestmark = pytest.mark.slow
MSGPACK = {"content-type": "application/msgpack", "accept": "application/msgpack"}
TEXTS = ["a photo of a cat", "Paris is the capital of France.", "ein Hund im Schnee"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return build(tmp_path_factory.mktemp("clip-http"), SHORT_TEXTS)


@pytest.fixture(scope="module")
def server(start_module_server, folders):
    return start_module_server(["--model", f"clip-test={folders['clip']}",
                         "--model", f"siglip-test={folders['siglip']}",
                         "--default-model", "clip-test", "--default-model", "siglip-test",
                         "--default-model", "sentence-transformers/all-MiniLM-L6-v2"])


@pytest.fixture(scope="module")
def images():
    return make_images()[:4]


def post(server, path: str, body: dict, binary: bool = True) -> httpx.Response:
    if binary:
        return httpx.post(f"{server.url}{path}", content=msgpack.packb(body, use_bin_type=True),
                          headers=MSGPACK, timeout=60)
    return httpx.post(f"{server.url}{path}", json=body, timeout=60)


def vectors(resp: httpx.Response) -> np.ndarray:
    assert resp.status_code == 200, resp.text
    items = msgpack.unpackb(resp.content)["items"] if "msgpack" in resp.headers["content-type"] \
        else resp.json()["items"]
    values = [i["dense"]["values"] for i in items]  # msgpack-numpy maps, or JSON lists
    return np.stack([np.frombuffer(v[b"data"], v[b"type"]) if isinstance(v, dict)
                     else np.asarray(v, np.float32) for v in values])


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_encode_images_and_texts_match_transformers(server, folders, images, family) -> None:
    ref = Reference(family, folders[family])
    want = np.concatenate([ref.texts(TEXTS), ref.images(decoded(images))])
    items = [{"text": t} for t in TEXTS] + [{"id": f"img-{i}", "images": [{"data": d, "format": f}]}
                                            for i, (d, f) in enumerate(images)]
    got = vectors(post(server, f"/v1/encode/{family}-test", {"items": items}))
    assert (got * want).sum(1).min() >= 0.99999
    # JSON: the same bytes as standard base64, the format optional
    json_items = [{"text": t} for t in TEXTS] + [
        {"images": [{"data": base64.b64encode(d).decode()}]} for d, _ in images]
    np.testing.assert_allclose(vectors(post(server, f"/v1/encode/{family}-test",
                                            {"items": json_items}, binary=False)), got, atol=1e-6)


def test_score_text_against_images_and_image_against_texts(server, folders, images) -> None:
    ref = Reference("siglip", folders["siglip"])
    want_images, want_texts = ref.images(decoded(images)), ref.texts(TEXTS)
    body = {"query": {"text": TEXTS[0]},
            "items": [{"id": f"img-{i}", "images": [{"data": d, "format": f}]}
                      for i, (d, f) in enumerate(images)]}
    resp = post(server, "/v1/score/siglip-test", body)
    assert resp.status_code == 200, resp.text
    scores = {s["item_id"]: s["score"] for s in msgpack.unpackb(resp.content)["scores"]}
    want = want_images @ want_texts[0]
    np.testing.assert_allclose([scores[f"img-{i}"] for i in range(len(images))], want, atol=1e-4)
    data, fmt = images[2]
    resp = post(server, "/v1/score/siglip-test",
                {"query": {"images": [{"data": data, "format": fmt}]},
                 "items": [{"text": t} for t in TEXTS]})
    got = sorted((s["item_id"], s["score"]) for s in msgpack.unpackb(resp.content)["scores"])
    np.testing.assert_allclose([s for _, s in got], want_texts @ want_images[2], atol=1e-4)


def _error(resp: httpx.Response) -> str:
    assert resp.status_code == 400, (resp.status_code, resp.text)
    return resp.json()["detail"]["message"]  # errors are JSON, as SIE sends them


@pytest.mark.parametrize("case,data,fmt,why", bad_images(), ids=[c[0] for c in bad_images()])
def test_bad_image_gets_a_400_naming_the_item(server, case, data, fmt, why) -> None:
    image = {"data": data} if fmt is None else {"data": data, "format": fmt}
    items = [{"text": "a"}, {"text": "b"}, {"text": "c"}, {"images": [image]}]
    message = _error(post(server, "/v1/encode/clip-test", {"items": items}))
    assert message.startswith("items[3].images[0]"), message
    assert why in message or (case == "empty" and "empty" in message), message


@pytest.mark.parametrize("item,why", [
    ({"images": "not-a-list"}, "items[0].images: Input should be a valid list"),
    ({"images": []}, "items[0].images: List should have at least 1 item"),
    ({"images": [{"data": b"x"}, {"data": b"y"}]}, "items[0].images: List should have at most 1 item"),
    ({"text": "a caption", "images": [{"data": b"x"}]}, "text or images, not both"),
    ({"images": [{"data": b"x", "format": "heic"}]}, "items[0].images[0].format 'heic'"),
    ({"images": [{"format": "png"}]}, "items[0].images[0].data is missing"),
    ({"images": [{"data": b"x", "colour": 1}]}, "items[0].images[0].colour is not a known"),
    ({"images": [42]}, "items[0].images[0]: Input should be a valid"),
])
def test_malformed_image_items_get_a_400_naming_the_field(server, item, why) -> None:
    assert why in _error(post(server, "/v1/encode/clip-test", {"items": [item]}))


def test_json_data_must_be_base64(server) -> None:
    resp = post(server, "/v1/encode/clip-test",
                {"items": [{"images": [{"data": "not base64!", "format": "png"}]}]}, binary=False)
    assert resp.status_code == 400 and "standard base64" in resp.json()["detail"]["message"]


def test_images_where_they_do_not_fit(server, images) -> None:
    pic = {"images": [{"data": images[0][0], "format": "png"}]}
    message = _error(post(server, "/v1/encode/sentence-transformers/all-MiniLM-L6-v2",
                          {"items": [pic]}))
    assert message.startswith("items[0].images:") and "does not embed images" in message
    resp = post(server, "/v1/encode/clip-test",
                {"items": [pic], "params": {"options": {"lora_id": "x/y"}}})
    assert resp.status_code == 404 and resp.json()["detail"]["code"] == "LORA_NOT_FOUND"


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_decompression_bomb_is_refused_within_bounded_memory(server, images) -> None:
    pid = server.proc.pid
    body = {"items": [{"images": [{"data": d, "format": f}]} for d, f in images]}
    assert post(server, "/v1/encode/clip-test", body).status_code == 200  # warm
    before = _peak_rss(pid)
    bomb = bomb_png()  # 100 MP: 300 MB of pixels
    for _ in range(3):
        message = _error(post(server, "/v1/encode/clip-test",
                              {"items": [{"text": "a"}, {"images": [{"data": bomb}]}]}))
        assert message.startswith("items[1].images[0]") and "megapixels" in message
    assert _peak_rss(pid) - before < 64 * 2**20
    models = httpx.get(f"{server.url}/v1/models", timeout=10).json()["models"]
    clip = next(m for m in models if m["id"] == "clip-test")
    assert clip["family"] == "clip" and clip["dims"] == {"dense": 32}
    assert clip["score_modes"] == ["dense"]


def test_our_sdk_sends_images_as_sie_does(server, images) -> None:
    from sie_sdk import SIEClient
    from sie_sdk.types import Item

    (data, fmt), (data2, _) = images[0], images[1]
    items = [{"text": "a photo"}, {"images": [{"data": data, "format": fmt}]}, {"images": [{"data": data2}]}]
    want = vectors(post(server, "/v1/encode/clip-test", {"items": items}))
    with SIEClient(server.url) as client:
        got = client.encode("clip-test", [Item(text="a photo"), Item(images=[{"data": data, "format": fmt}]),
                                          {"images": [data2]}])
    np.testing.assert_array_equal(np.stack([r["dense"] for r in got]), want)
