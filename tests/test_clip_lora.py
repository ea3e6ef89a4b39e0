"""LoRA on CLIP and SigLIP (both towers, SigLIP's pooling head) against peft's merged models.

Models: the small random-weight `CLIPModel` / `SiglipModel` checkpoints of
scripts/make_clip_test_models.py. Adapters: made with peft 0.21 on those folders (random
non-zero B), on both towers (peft's usual q/k/v/out_proj + fc1/fc2 list, which on SigLIP also
adapts the pooling head's `attention.out_proj` and `mlp.fc1/fc2`; with a rank_pattern and an
alpha_pattern on modules of each tower), on the text tower only, on
part of one vision layer only (rslora), on SigLIP's head only. Reference:
`PeftModel.merge_and_unload()` through transformers' processors and `get_text_features` /
`get_image_features`, L2-normalised. Stated tolerances: dense cosine >= 0.99999 per text and
per image; an item in a packed batch mixing two adapters, the base model, texts and images
equals the item alone within 2e-6 (absolute); base rows bit-for-bit the base model's.
"""

from __future__ import annotations

import json
from concurrent.futures import wait

import numpy as np
import pytest
from clip_reference import Reference, decoded, make_images
from lora_adapters import make_adapter
from make_clip_test_models import build
from texts import SHORT_TEXTS

from sie_server.config import Settings
from sie_server.engine import Engine
from sie_server.errors import AdapterNotFound, InvalidAdapter
from sie_server.runtime.batch import pack
from sie_server.runtime.images import ImageInput

COS = 0.99999
FAMILIES = ["clip", "siglip"]
TEXTS = SHORT_TEXTS[:10]
ALL = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
# name -> (peft target_modules, options, towers it changes: text, image)
ADAPTERS = {
    "both": (ALL, {"r": 4, "rank_pattern": {"vision_model.encoder.layers.0.mlp.fc1": 8},
                   "alpha_pattern": {r"text_model\.encoder\.layers\.1\.self_attn\.v_proj": 3}},
             (True, True)),
    "text": (r"text_model\.encoder\.layers\.\d+\.(self_attn\.(q|v)_proj|mlp\.fc2)", {"r": 8},
             (True, False)),
    "vision": (r"vision_model\.encoder\.layers\.1\.(self_attn\.(k|out)_proj|mlp\.fc1)",
               {"r": 4, "rslora": True}, (False, True)),
}
SIGLIP_HEAD = (r"vision_model\.head\.(attention\.out_proj|mlp\.fc\d)", {"r": 2}, (False, True))


def adapters_of(family: str) -> dict:
    return {**ADAPTERS, **({"head": SIGLIP_HEAD} if family == "siglip" else {})}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return build(tmp_path_factory.mktemp("clip-lora-models"), SHORT_TEXTS)


@pytest.fixture(scope="module")
def images():
    return make_images()[:5]


@pytest.fixture(scope="module")
def made(folders, images, tmp_path_factory):
    """Adapters under `root/<family>/<name>`, and per (family, name or None) the reference
    vectors of TEXTS and the images (None: the base model)."""
    root = tmp_path_factory.mktemp("clip-lora-adapters")
    refs = {}
    for family in FAMILIES:
        ref = Reference(family, folders[family])
        pics = decoded(images)
        refs[family, None] = (ref.texts(TEXTS), ref.images(pics))
        for seed, (name, (targets, opts, _)) in enumerate(adapters_of(family).items()):
            out = make_adapter(folders[family], root / family / name, targets=targets,
                               seed=10 + seed, **opts)
            ref.model = out["merged"]
            refs[family, name] = (ref.texts(TEXTS), ref.images(pics))
    return root, refs


@pytest.fixture(scope="module")
def engine(folders, made):
    eng = Engine(Settings(dtype="float32", device="cpu", default_models=[],
                          adapter_roots=[made[0]], models={k: str(v) for k, v in folders.items()}))
    yield eng
    eng.close()


def items_of(images) -> list:
    return TEXTS + [ImageInput(d, f) for d, f in images]


def dense(results) -> np.ndarray:
    return np.stack([r.dense for r in results])


@pytest.mark.parametrize("family", FAMILIES)
def test_adapters_equal_peft_merged(engine, made, images, family) -> None:
    refs = made[1]
    base = dense(engine.encode(family, items_of(images)))
    n = len(TEXTS)
    for name, (_, _, changes) in adapters_of(family).items():
        options = {"lora_id": f"{family}/{name}"}
        got = dense(engine.encode(family, items_of(images), options=options))
        want = np.concatenate(refs[family, name])
        cos = (got * want).sum(1)
        assert cos.min() >= COS, (family, name, int(cos.argmin()), float(cos.min()))
        for part, changed in ((slice(0, n), changes[0]), (slice(n, None), changes[1])):
            if changed:  # the adapter really changes what this tower gives
                assert (got[part] * base[part]).sum(1).max() < 0.999, (family, name, part)
            else:  # and leaves the other tower exactly as the base model
                assert np.array_equal(got[part], base[part]), (family, name, part)


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_batch_of_two_adapters_and_the_base(engine, made, images, family) -> None:
    """One packed forward: texts and images interleaved, each with "both", "vision" or no
    adapter; every row equals its item alone and the merged reference."""
    refs = made[1]
    model = engine.registry.get(family).model
    mgr = engine._adapters(engine.registry.get(family))
    names = [None, f"{family}/both", f"{family}/vision"]
    slots = {n: (-1 if n is None else mgr.acquire(n)) for n in names}
    try:
        texts = model.prepare(TEXTS, False, None).ids
        pics = model.prepare_images([ImageInput(d, f) for d, f in images],
                                    [f"items[{i}]" for i in range(len(images))])
        seqs = [s for pair in zip(texts, pics) for s in pair] + texts[len(pics):]
        which = [("text", i) for i in range(len(texts))]
        which = [w for pair in zip(which, [("image", i) for i in range(len(pics))])
                 for w in pair] + which[len(pics):]
        order = [names[i % 3] for i in range(len(seqs))]
        types = frozenset({"dense"})
        mixed = model.forward(pack(seqs, types, np.array([slots[n] for n in order]))).to_host()
        base = model.forward(pack(seqs, types, np.full(len(seqs), -1))).to_host()
        for i, (seq, name, (kind, k)) in enumerate(zip(seqs, order, which)):
            alone = model.forward(pack([seq], types, np.array([slots[name]]))).to_host()
            np.testing.assert_allclose(mixed.dense[i], alone.dense[0], atol=2e-6)
            want = refs[family, None if name is None else name.split("/")[1]]
            ref = want[0 if kind == "text" else 1][k]
            assert float(mixed.dense[i] @ ref) >= COS, (name, kind, k)
            if name is None:
                assert np.array_equal(mixed.dense[i], base.dense[i])
    finally:
        for n in names[1:]:
            mgr.release(slots[n])


def test_concurrent_requests_with_different_adapters(engine, made, images) -> None:
    """Through the scheduler: requests with other adapters share batches."""
    refs = made[1]
    items = items_of(images)
    jobs = [(family, name, i) for i in range(len(items)) for family in FAMILIES
            for name in (None, "both", "text")]
    futures = [engine.submit(f, [items[i]], None, {"lora_id": f"{f}/{n}"} if n else None)
               for f, n, i in jobs]
    wait(futures)
    for (family, name, i), fut in zip(jobs, futures):
        texts, pics = refs[family, name]
        want = texts[i] if i < len(TEXTS) else pics[i - len(TEXTS)]
        assert float(fut.result()[0].dense @ want) >= COS, (family, name, i)


def test_score_text_against_images_with_an_adapter(engine, made, images) -> None:
    texts, pics = made[1]["siglip", "both"]
    got = engine.score("siglip", TEXTS[0], [ImageInput(d, f) for d, f in images],
                       {"lora_id": "siglip/both"})
    np.testing.assert_allclose(got.scores, pics @ texts[0], atol=1e-4)


def _adapter(root, name: str, config: dict, weights: dict | None = None) -> str:
    import torch
    from safetensors.torch import save_file

    folder = root / "bad" / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 4, **config}))
    tensors = {k: torch.randn(*shape) for k, shape in (weights or {}).items()}
    if tensors:
        save_file(tensors, str(folder / "adapter_model.safetensors"))
    return f"bad/{name}"


def test_adapters_the_model_cannot_take_are_refused(engine, made) -> None:
    root = made[0]
    bert = _adapter(root, "bert-style", {"target_modules": ["query", "value"]})
    with pytest.raises(InvalidAdapter, match=r"\['query', 'value'\] name modules this model "
                                             r"does not have.*self_attn\.q_proj"):
        engine.encode("clip", ["hello"], None, {"lora_id": bert})
    # CLIP has no pooling head: SigLIP's head adapter does not fit it
    with pytest.raises(InvalidAdapter, match=r"siglip/head.*matches no module of this model"):
        engine.encode("clip", ["hello"], None, {"lora_id": "siglip/head"})
    key = "base_model.model.text_projection.lora_{}.weight"
    proj = _adapter(root, "projection", {"target_modules": ["text_projection"]},
                    {key.format("A"): (2, 64), key.format("B"): (32, 2)})
    with pytest.raises(InvalidAdapter, match=r"text_projection.*cannot adapt"):
        engine.encode("clip", ["hello"], None, {"lora_id": proj})
    key = "base_model.model.vision_model.encoder.layers.{}.mlp.fc1.lora_{}.weight"
    deep = _adapter(root, "deep", {"target_modules": ["fc1"]},
                    {key.format(5, "A"): (2, 64), key.format(5, "B"): (128, 2)})
    with pytest.raises(InvalidAdapter, match="adapts layer 5 but the model has 2 layers"):
        engine.encode("siglip", ["hello"], None, {"lora_id": deep})
    wide = _adapter(root, "wide", {"target_modules": ["fc1"]},
                    {key.format(0, "A"): (2, 96), key.format(0, "B"): (128, 2)})
    with pytest.raises(InvalidAdapter, match=r"do not fit the model's 64 -> 128 linear"):
        engine.encode("siglip", ["hello"], None, {"lora_id": wide})
    with pytest.raises(AdapterNotFound):
        engine.encode("clip", ["hello"], None, {"lora_id": "no/such-adapter"})
    assert engine.encode("clip", ["hello"])[0].dense is not None  # the model still serves


def test_adapter_listing_names_towers(engine) -> None:
    engine.encode("siglip", ["x"], None, {"lora_id": "siglip/both"})
    info = next(a for a in engine.adapters("siglip") if a["id"] == "siglip/both")
    assert {"text.self_attn.q_proj", "vision.mlp.fc2", "head.attention.out_proj",
            "head.mlp.fc1"} <= set(info["targets"])
    assert info["layers"] == 5  # 2 text, 2 vision layers, the head


@pytest.mark.slow
def test_http_encode_and_score_with_adapters(start_server, folders, made, images) -> None:
    """A real server (float32): texts and images with SigLIP's "both" adapter and CLIP's
    "vision" one equal peft's merged models; text-vs-image scores with the adapter; an
    adapter the model cannot take is a 422 naming it."""
    import httpx
    import msgpack

    root, refs = made
    server = start_server(["--model", f"clip-test={folders['clip']}",
                           "--model", f"siglip-test={folders['siglip']}",
                           "--adapter-root", str(root)])
    wire = [{"text": t} for t in TEXTS] + [{"id": f"img-{i}", "images": [{"data": d, "format": f}]}
                                           for i, (d, f) in enumerate(images)]
    headers = {"content-type": "application/msgpack", "accept": "application/msgpack"}

    def post(path: str, body: dict) -> dict:
        r = httpx.post(f"{server.url}{path}", content=msgpack.packb(body, use_bin_type=True),
                       headers=headers, timeout=60)
        assert r.status_code == 200, r.text
        return msgpack.unpackb(r.content)

    for family, name in (("siglip", "both"), ("clip", "vision")):
        out = post(f"/v1/encode/{family}-test",
                   {"items": wire, "params": {"options": {"lora_id": f"{family}/{name}"}}})
        got = np.stack([np.frombuffer(i["dense"]["values"][b"data"], "<f4") for i in out["items"]])
        want = np.concatenate(refs[family, name])
        assert (got * want).sum(1).min() >= COS, (family, name)
    texts, pics = refs["siglip", "both"]
    out = post("/v1/score/siglip-test", {"query": {"text": TEXTS[0]}, "items": wire[len(TEXTS):],
                                         "options": {"lora_id": "siglip/both"}})
    scores = {s["item_id"]: s["score"] for s in out["scores"]}
    np.testing.assert_allclose([scores[f"img-{i}"] for i in range(len(images))],
                               pics @ texts[0], atol=1e-4)
    r = httpx.post(f"{server.url}/v1/encode/clip-test", timeout=60, json={
        "items": [{"text": "x"}], "params": {"options": {"lora_id": "siglip/head"}}})
    assert r.status_code == 422, r.text
    err = r.json()["detail"]
    assert err["code"] == "INVALID_ADAPTER" and "siglip/head" in err["message"], err


def test_adapter_of_a_wrapped_model_applies_the_same(engine, made, images) -> None:
    """Module paths with a wrapper's prefix in front of `vision_model.` (a CLIPModel inside
    another module) find their tower as the plain ones do."""
    import shutil

    from safetensors.torch import load_file, save_file

    root = made[0]
    src, dst = root / "clip" / "vision", root / "wrapped" / "clip-vision"
    shutil.copytree(src, dst)
    state = load_file(str(src / "adapter_model.safetensors"))
    save_file({k.replace("base_model.model.", "base_model.model.wrapper.clip."): v
               for k, v in state.items()}, str(dst / "adapter_model.safetensors"))
    items = items_of(images)[-3:]
    want = dense(engine.encode("clip", items, options={"lora_id": "clip/vision"}))
    got = dense(engine.encode("clip", items, options={"lora_id": "wrapped/clip-vision"}))
    np.testing.assert_array_equal(got, want)
