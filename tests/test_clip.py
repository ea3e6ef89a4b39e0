"""CLIP and SigLIP in the engine against transformers 4.57 on the same weights (CPU, fp32).

Models: small random-weight `CLIPModel` / `SiglipModel` checkpoints in the hub layout
(scripts/make_clip_test_models.py). Reference: transformers' processors (CLIPProcessor,
SiglipProcessor with padding="max_length") and `get_text_features` / `get_image_features`,
L2-normalised, on the same Pillow-decoded images. Stated tolerances: dense cosine >= 0.99999
per text and per image; a packed batch mixing texts and images equals each item encoded
alone within 1e-5 (absolute, per component); scores within 1e-4 of the reference's.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from clip_reference import Reference, bad_images, decoded, make_images
from make_clip_test_models import build
from texts import SHORT_TEXTS

from sie_server.config import Settings
from sie_server.engine import Engine
from sie_server.engine.catalog import detect_family
from sie_server.engine.sources import missing_files
from sie_server.errors import InvalidRequest
from sie_server.runtime.images import ImageInput
from sie_server.runtime.spm_tokenizer import SiglipTextTokenizer

FAMILIES = ["clip", "siglip"]
LONG = " ".join(["a long caption that runs past the text tower's limit"] * 12)
TEXTS = SHORT_TEXTS + ["<|startoftext|>CLIP's <|endoftext|> inside a text", LONG]
# SigLIP's text pipeline: case, punctuation, whitespace, "▁", final sigma, empty strings
TRICKY = ["", "   ", "Hello, World!!", "  leading and trailing  ", "tab\tand\nnewline",
          "▁already▁marked", "ΟΔΟΣ Σίσυφος", "İstanbul", "!!!", "emoji 🎉 ok", "a" * 200, LONG,
          # special-token strings inside texts: split out as transformers does
          "</s> leading", "trailing </s>", "a </s></s> b", "<unk> and <UNK>", "</S> upper",
          "word</s>word", "</s>", " </s> ", "ends with eos</s>", "x " * 70 + "</s>"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return build(tmp_path_factory.mktemp("clip-models"), SHORT_TEXTS)


@pytest.fixture(scope="module")
def engine(folders):
    eng = Engine(Settings(dtype="float32", models={k: str(v) for k, v in folders.items()}, default_models=[],
                          device="cpu"))
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def images():
    return make_images()


@pytest.fixture(scope="module")
def reference(folders, images):
    """Per family: reference vectors of TEXTS and of the images."""
    out = {}
    for name in FAMILIES:
        ref = Reference(name, folders[name])
        out[name] = (ref, ref.texts(TEXTS), ref.images(decoded(images)))
    return out


def image_items(images) -> list[ImageInput]:
    return [ImageInput(data, fmt) for data, fmt in images]


def dense(results) -> np.ndarray:
    return np.stack([r.dense for r in results])


@pytest.mark.parametrize("name", FAMILIES)
def test_vectors_match_transformers(engine, reference, images, name) -> None:
    _, want_texts, want_images = reference[name]
    got = engine.encode(name, TEXTS + image_items(images))
    cos = (dense(got) * np.concatenate([want_texts, want_images])).sum(1)
    assert cos.min() >= 0.99999, (name, int(cos.argmin()), float(cos.min()))
    assert np.allclose(np.linalg.norm(dense(got), axis=1), 1, atol=1e-6)
    assert got[-1].token_count == engine.registry.get(name).model.vision.cfg.grid  # patches
    assert got[len(TEXTS) - 1].truncated and not got[0].truncated


@pytest.mark.filterwarnings("ignore:This sequence already has")
def test_siglip_token_ids_equal_siglip_tokenizer(folders) -> None:
    from transformers import SiglipTokenizer

    ref = SiglipTokenizer.from_pretrained(folders["siglip"])
    texts = TRICKY + TEXTS
    want = ref(texts, padding="max_length", truncation=True, max_length=64).input_ids
    got = SiglipTextTokenizer(folders["siglip"], 64).encode(texts)
    assert [ids.tolist() for ids in got.ids] == want


_PIECES = list("aAbZzΣσςé🎉.,!?'-_ ▁\t\n") + ["</s>", "<unk>", "</S>", " the ", "Photo"]


@pytest.mark.filterwarnings("ignore:This sequence already has")
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(_PIECES), max_size=40).map("".join))
def test_siglip_token_ids_on_generated_texts(folders, text) -> None:
    ref, ours = _siglip_tokenizers(folders["siglip"])
    want = ref([text], padding="max_length", truncation=True, max_length=64).input_ids
    assert [ours.encode([text]).ids[0].tolist()] == want


@functools.lru_cache(maxsize=1)
def _siglip_tokenizers(folder):
    from transformers import SiglipTokenizer

    return SiglipTokenizer.from_pretrained(folder), SiglipTextTokenizer(folder, 64)


def test_clip_truncation_keeps_the_end_of_text_token(engine, reference) -> None:
    ref = reference["clip"][0]
    want = ref.processor(text=[LONG], truncation=True, max_length=77).input_ids[0]
    tok = engine.registry.get("clip").model.prepare([LONG], False, None)
    assert tok.ids[0].tolist() == want and tok.original_lengths[0] > 77


@pytest.mark.parametrize("name", FAMILIES)
def test_packed_mixed_batch_equals_items_alone(engine, images, name) -> None:
    pics = image_items(images)[:4]
    items = [x for pair in zip(TEXTS[:4], pics) for x in pair] + TEXTS[4:8] + [LONG]
    together = dense(engine.encode(name, items))
    alone = np.stack([engine.encode(name, [item])[0].dense for item in items])
    np.testing.assert_allclose(together, alone, atol=1e-5)
    # other requests in flight at once share batches; results stay the same
    futures = [engine.submit(name, [item]) for item in items]
    np.testing.assert_allclose(np.stack([f.result()[0].dense for f in futures]), alone, atol=1e-5)


@pytest.mark.parametrize("name", FAMILIES)
def test_score_text_against_images_and_back(engine, reference, images, name) -> None:
    ref, want_texts, want_images = reference[name]
    query = "a photo of a red square"
    q = ref.texts([query])[0]
    got = engine.score(name, query, image_items(images))
    want = want_images @ q
    np.testing.assert_allclose(got.scores, want, atol=1e-4)
    assert got.score_mode == "dense"
    assert list(got.order) == list(np.argsort(-got.scores, kind="stable"))
    back = engine.score(name, image_items(images)[1], TEXTS[:10], top_k=3)
    want = want_texts[:10] @ want_images[1]
    np.testing.assert_allclose(back.scores, want, atol=1e-4)
    assert len(back.order) == 3


@pytest.mark.parametrize("case,data,fmt,why", bad_images(), ids=[c[0] for c in bad_images()])
def test_bad_image_is_an_invalid_request_naming_the_item(engine, case, data, fmt, why) -> None:
    with pytest.raises(InvalidRequest, match=rf"^items\[2\]\.images\[0\]: the image .*{why}"):
        engine.submit("clip", ["a", "b", ImageInput(data, fmt)])
    with pytest.raises(InvalidRequest, match=r"^query\.images\[0\]: the image"):
        engine.submit_score("siglip", ImageInput(data, fmt), ["a"])


def test_images_refused_where_they_do_not_fit(engine, images, minilm_dir) -> None:
    pic = image_items(images)[0]
    eng = Engine(Settings(dtype="float32", models={"minilm": str(minilm_dir)}, default_models=[], device="cpu"))
    try:
        with pytest.raises(InvalidRequest, match=r"^items\[1\]\.images: minilm .*does not embed"):
            eng.submit("minilm", ["a", pic])
    finally:
        eng.close()


def test_patch_size_not_dividing_the_image_size(tmp_path, images) -> None:
    """so400m-patch14-384: 384 px is 27 patches of 14 and 6 px the convolution drops."""
    from make_clip_test_models import build_siglip

    folder = build_siglip(tmp_path / "siglip-62", TEXTS[:20], image_size=62, patch_size=14)
    want = Reference("siglip", folder).images(decoded(images[:3]))
    eng = Engine(Settings(dtype="float32", models={"s": str(folder)}, default_models=[], device="cpu"))
    try:
        got = eng.encode("s", image_items(images[:3]))
    finally:
        eng.close()
    assert got[0].token_count == 16
    assert (dense(got) * want).sum(1).min() >= 0.99999


def test_clip_with_a_real_eos_token_id(tmp_path, images) -> None:
    """Newer CLIP configs name the real end-of-text id: pooling at its first position."""
    from make_clip_test_models import build_clip

    folder = build_clip(tmp_path / "clip-eos", TEXTS[:30], legacy_eos=False)
    ref = Reference("clip", folder)
    assert ref.model.config.text_config.eos_token_id != 2
    texts = TEXTS[:30] + TEXTS[-2:]
    want = np.concatenate([ref.texts(texts), ref.images(decoded(images[:2]))])
    eng = Engine(Settings(dtype="float32", models={"c": str(folder)}, default_models=[], device="cpu"))
    try:
        got = dense(eng.encode("c", texts + image_items(images[:2])))
    finally:
        eng.close()
    assert (got * want).sum(1).min() >= 0.99999


def test_catalog_detects_and_requires_the_family_files(folders) -> None:
    assert detect_family(str(folders["clip"])) == "clip"
    assert detect_family(str(folders["siglip"])) == "siglip"
    assert missing_files(folders["clip"], "clip") == []
    assert missing_files(folders["siglip"], "siglip") == []  # spiece.model, no tokenizer.json
    assert missing_files(folders["siglip"], "clip") == ["tokenizer.json"]


def test_causal_bucketed_attention_equals_per_sequence_sdpa() -> None:
    """CLIP's text tower: causal attention over packed sequences (padded groups and not)."""
    import torch
    import torch.nn.functional as F

    from sie_server.runtime.attention import BucketedAttention

    lengths = np.array([1, 5, 7, 7, 20, 3])
    cu = np.r_[0, np.cumsum(lengths)]
    q, k, v = torch.randn(3, int(cu[-1]), 4, 8, generator=torch.Generator().manual_seed(0))
    for slack in (None, 1.25, 4.0):  # CPU's one-length groups, and groups with padding
        got = BucketedAttention(cu, torch.device("cpu"), causal=True, slack=slack)(q, k, v)
        for a, b in zip(cu[:-1], cu[1:]):
            part = [t[a:b].transpose(0, 1) for t in (q, k, v)]
            want = F.scaled_dot_product_attention(*part, is_causal=True).transpose(0, 1)
            torch.testing.assert_close(got[a:b], want, atol=1e-5, rtol=1e-5)


def test_image_items_limits_and_aliases() -> None:
    import base64

    from sie_server.api import images as wire
    from sie_server.api.validate import EncodeRequest, validated

    def one(image, field: str = "items[0]") -> ImageInput:
        return wire.image_input([image], None, field)

    assert one(wire.ImageModel(data=b"x", format="JPG")) == ImageInput(b"x", "jpeg")
    assert one(base64.b64encode(b"xy").decode(), "q") == ImageInput(b"xy", None)
    big = bytes(wire.MAX_IMAGE_BYTES + 1)
    for data in (big, base64.b64encode(big).decode()):
        with pytest.raises(InvalidRequest, match=r"^items\[2\]\.images\[0\]\.data is \d+ bytes"):
            one(wire.ImageModel(data=data), "items[2]")
    with pytest.raises(InvalidRequest, match=r"^items\[0\]\.images\[0\]\.format: .*string"):
        validated(EncodeRequest, {"items": [{"images": [{"data": "eA==", "format": 3}]}]})
