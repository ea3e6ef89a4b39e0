"""LoRA adapters: equal to peft's merged models, mixed batches, bad adapters, load/unload.

Adapters are made here with peft (random non-zero B, several ranks and target sets, rslora,
rank/alpha patterns, one with its own BGE-M3 heads) for the BGE-M3-shaped test model and for
all-MiniLM-L6-v2, and compared with `merge_and_unload()` on the same inputs (fp32, CPU).
"""
from __future__ import annotations

import json
import random
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from lora_adapters import (COS, assert_m3_close, cosine, load_base, m3_reference,  # noqa: E402
                           make_adapter, mean_pool_reference, tokenize)
from reference import minilm_dir  # noqa: E402
from texts import SHORT_TEXTS  # noqa: E402

from sie_server.config import Settings  # noqa: E402
from sie_server.engine import Engine  # noqa: E402
from sie_server.errors import (AdapterLoading, AdapterNotFound, InvalidAdapter,  # noqa: E402
                               InvalidRequest)
from sie_server.runtime.batch import pack  # noqa: E402

M3 = "BAAI/bge-m3"
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
ALL = ("dense", "sparse", "multivector")
TEXTS = [SHORT_TEXTS[i] for i in (0, 2, 5, 8, 11, 14, 20, 30)]

# name -> make_adapter keyword arguments (BGE-M3-shaped model: 2 layers, hidden 64, ffn 128)
M3_ADAPTERS = {
    "m3/qv-r4": dict(r=4, targets=["query", "value"], seed=1),
    "m3/all-r8-rslora": dict(r=8, targets=["query", "key", "value", "dense"], rslora=True,
                             seed=2),
    "m3/ffn-r2": dict(r=2, targets=["intermediate.dense", "output.dense"], seed=3),
    "m3/patterns-r6": dict(r=6, targets=r".*\.(query|key|intermediate\.dense)", seed=4,
                           rank_pattern={"key": 3}, alpha_pattern={"intermediate.dense": 2.5}),
    "m3/heads-r4": dict(r=4, targets=["key", "attention.output.dense"], heads=True, seed=5),
    "m3/layer1-r3": dict(r=3, targets=["value", "output.dense"], layers_to_transform=[1],
                         seed=6),
}
MINILM_ADAPTERS = {
    "minilm/qkv-r8": dict(r=8, targets=["query", "key", "value"], seed=11),
    "minilm/ffn-r4-rslora": dict(r=4, targets=["intermediate.dense", "output.dense"],
                                 rslora=True, seed=12),
    "minilm/all-r16": dict(r=16, targets=["query", "key", "value", "dense"], seed=13,
                           b_std=0.05),
}


@pytest.fixture(scope="module")
def m3_dir(tmp_path_factory) -> Path:
    from make_bge_m3_test_model import build

    return build(tmp_path_factory.mktemp("m3") / "bge-m3-test")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("adapters")


@pytest.fixture(scope="module")
def m3_engine(m3_dir, root):
    eng = Engine(Settings(models={M3: str(m3_dir)}, default_models=[], adapter_roots=[root],
                          device="cpu", dtype="float32"))
    eng.registry.get(M3)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def m3_refs(m3_dir, root, m3_engine):
    """Per adapter name (None = base): reference outputs of TEXTS from the merged model (token
    ids from the engine's tokenizer, which the foundation tests compare with FlagEmbedding's)."""
    ids = [t.tolist() for t in m3_engine.registry.get(M3).model.prepare(TEXTS, False, None).ids]
    base_heads = {h: torch.load(m3_dir / f"{h}.pt", weights_only=True)
                  for h in ("colbert_linear", "sparse_linear")}
    refs = {None: m3_reference(load_base(m3_dir), base_heads, ids)}
    for name, kw in M3_ADAPTERS.items():
        made = make_adapter(m3_dir, root / name, **kw)
        refs[name] = m3_reference(made["merged"], made["heads"] or base_heads, ids)
    return refs


@pytest.fixture
def engine(m3_engine, m3_refs):
    """The module's engine with no adapter loaded; settings changed by a test are restored."""
    s = m3_engine.settings
    saved = (s.max_adapters, s.max_adapter_bytes, s.adapter_load_timeout_s)

    def unload_all():
        for a in m3_engine.adapters(M3):
            m3_engine.unload_adapter(M3, a["id"])

    unload_all()
    yield m3_engine
    s.max_adapters, s.max_adapter_bytes, s.adapter_load_timeout_s = saved
    unload_all()


def m3_adapter_manager(eng: Engine):
    return eng._adapters(eng.registry.get(M3))


# ------------------------------------------------------------------ equal to peft merged


@pytest.mark.parametrize("name", [None, *M3_ADAPTERS])
def test_m3_adapter_equals_peft_merged(m3_engine, m3_refs, name):
    got = m3_engine.encode(M3, TEXTS, ALL, {"lora_id": name})
    for i, (g, want) in enumerate(zip(got, m3_refs[name])):
        assert_m3_close(g, want, f"{name} text {i}")
    if name is not None:  # the adapter really changes the outputs
        assert cosine(got[0].dense, m3_refs[None][0]["dense"]) < 0.999


def test_minilm_adapters_equal_peft_merged(tmp_path):
    folder = minilm_dir()
    ids = tokenize(folder, TEXTS, max_length=256)
    refs = {None: mean_pool_reference(load_base(folder), ids)}
    for name, kw in MINILM_ADAPTERS.items():
        refs[name] = mean_pool_reference(make_adapter(folder, tmp_path / name, **kw)["merged"],
                                         ids)
    eng = Engine(Settings(models={MINILM: str(folder)}, default_models=[],
                          adapter_roots=[tmp_path], device="cpu", dtype="float32"))
    try:
        for name, want in refs.items():
            got = eng.encode(MINILM, TEXTS, ["dense"], {"lora_id": name})
            for i, (g, w) in enumerate(zip(got, want)):
                c = cosine(g.dense, w)
                assert c >= COS, f"{name} text {i}: cosine {c}"
            if name is not None:
                assert cosine(got[0].dense, refs[None][0]) < 0.9999
        # a mixed batch on this model too: every item as when encoded alone
        names = [None, *MINILM_ADAPTERS]
        futures = [eng.submit(MINILM, [t], ["dense"], {"lora_id": names[i % len(names)]})
                   for i, t in enumerate(TEXTS)]
        for i, f in enumerate(futures):
            assert cosine(f.result()[0].dense, refs[names[i % len(names)]][i]) >= COS
        listed = {a["id"]: a for a in eng.adapters(MINILM)}
        assert set(listed) == set(MINILM_ADAPTERS)
        assert listed["minilm/qkv-r8"]["rank"] == 8
        assert listed["minilm/ffn-r4-rslora"]["rslora"] is True
    finally:
        eng.close()


# ------------------------------------------------------------------ mixed batches


def test_mixed_batch_equals_each_alone(m3_engine, m3_refs):
    """One packed forward with 5 adapters and the base interleaved: each row equals that item
    encoded alone with its adapter; base rows are bit-for-bit the base model's."""
    handle = m3_engine.registry.get(M3)
    model, mgr = handle.model, m3_adapter_manager(m3_engine)
    names = [None, *M3_ADAPTERS]
    slots = {n: (-1 if n is None else mgr.acquire(n)) for n in names}
    try:
        seqs = model.prepare(TEXTS * 2, False, None).ids
        order = [names[(i * 5) % len(names)] for i in range(len(seqs))]  # interleaved
        types = frozenset(ALL)
        mixed = model.forward(pack(seqs, types, np.array([slots[n] for n in order]))).to_host()
        base = model.forward(pack(seqs, types, np.full(len(seqs), -1))).to_host()
        assert len(set(order)) == len(names)
        off_m = np.concatenate([[0], np.cumsum(mixed.multivector[1])])
        off_s = np.concatenate([[0], np.cumsum(mixed.sparse[2])])
        off_b = np.concatenate([[0], np.cumsum(base.sparse[2])])
        for i, (seq, name) in enumerate(zip(seqs, order)):
            alone = model.forward(pack([seq], types, np.array([slots[name]]))).to_host()
            np.testing.assert_allclose(mixed.dense[i], alone.dense[0], atol=2e-6)
            np.testing.assert_allclose(mixed.multivector[0][off_m[i]:off_m[i + 1]],
                                       alone.multivector[0], atol=2e-6)
            sl = slice(off_s[i], off_s[i + 1])
            np.testing.assert_array_equal(mixed.sparse[0][sl], alone.sparse[0])
            np.testing.assert_allclose(mixed.sparse[1][sl], alone.sparse[1], atol=2e-6)
            ref = m3_refs[name][i % len(TEXTS)]
            assert cosine(mixed.dense[i], ref["dense"]) >= COS
            if name is None:  # untouched by the adapters around it
                assert np.array_equal(mixed.dense[i], base.dense[i])
                np.testing.assert_array_equal(mixed.multivector[0][off_m[i]:off_m[i + 1]],
                                              base.multivector[0][off_m[i]:off_m[i + 1]])
                np.testing.assert_array_equal(mixed.sparse[1][sl],
                                              base.sparse[1][off_b[i]:off_b[i + 1]])
    finally:
        for n in names[1:]:
            mgr.release(slots[n])


def test_mixed_requests_through_the_scheduler(m3_engine, m3_refs):
    names = [None, *M3_ADAPTERS]
    for n in names[1:]:
        m3_engine.load_adapter(M3, n)
    jobs = [(names[(i * 2) % len(names)], i) for i in range(len(TEXTS))] * 2
    futures = [m3_engine.submit(M3, [TEXTS[i]], ALL, {"lora_id": n}) for n, i in jobs]
    for (n, i), f in zip(jobs, futures):
        assert_m3_close(f.result(timeout=60)[0], m3_refs[n][i], f"{n} text {i}")


def test_adapter_heads_replace_base_heads_for_its_rows(m3_engine, m3_refs):
    """The adapter with colbert_linear.pt / sparse_linear.pt: its rows use its heads (checked
    against the reference built with those heads), base rows keep the base heads."""
    listed = {a["id"]: a for a in m3_engine.adapters(M3)}
    assert listed["m3/heads-r4"]["heads"] == ["colbert_linear", "sparse_linear"]
    f_heads = m3_engine.submit(M3, TEXTS[:3], ALL, {"lora_id": "m3/heads-r4"})
    f_base = m3_engine.submit(M3, TEXTS[:3], ALL)
    for i, (h, b) in enumerate(zip(f_heads.result(), f_base.result())):
        assert_m3_close(h, m3_refs["m3/heads-r4"][i], f"heads text {i}")
        assert_m3_close(b, m3_refs[None][i], f"base text {i}")


def test_score_with_an_adapter(m3_engine, m3_refs):
    """/v1/score's BGE-M3 path takes lora_id too: its dense score is the dot product of the
    adapter's query and item vectors (the query is encoded as a query: no prefix for BGE-M3)."""
    name = "m3/all-r8-rslora"
    res = m3_engine.score(M3, TEXTS[0], TEXTS[1:4], {"lora_id": name, "score_mode": "dense"})
    want = [float(m3_refs[name][0]["dense"] @ m3_refs[name][i]["dense"]) for i in (1, 2, 3)]
    np.testing.assert_allclose(res.components["dense"], want, atol=1e-5)
    base = m3_engine.score(M3, TEXTS[0], TEXTS[1:4], {"score_mode": "dense"})
    assert not np.allclose(base.components["dense"], want, atol=1e-3)


# ------------------------------------------------------------------ bad adapters


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(folder: Path, **changes) -> None:
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _rename_keys(folder: Path, old: str, new: str) -> None:
    from safetensors.torch import load_file, save_file

    path = folder / "adapter_model.safetensors"
    sd = load_file(str(path))
    save_file({k.replace(old, new): v for k, v in sd.items()}, str(path))


@pytest.fixture(scope="module")
def bad(root, m3_refs) -> dict[str, tuple[type, str]]:
    """lora_id -> (error class, fragment its message must hold), folders made under root."""
    good = root / "m3/qv-r4"
    out: dict[str, tuple[type, str]] = {"bad/missing": (AdapterNotFound, "not under the adapter roots"),
                                       "missing-here": (AdapterNotFound, "not a folder")}

    f = _copy(good, root / "bad/truncated")
    data = (f / "adapter_model.safetensors").read_bytes()
    (f / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    out["bad/truncated"] = (InvalidAdapter, "corrupt or truncated")

    f = _copy(good, root / "bad/garbage")
    (f / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 100)
    out["bad/garbage"] = (InvalidAdapter, "corrupt or truncated")

    f = _copy(good, root / "bad/rank")
    _edit_config(f, r=8)
    out["bad/rank"] = (InvalidAdapter, "rank 4")

    f = root / "bad/shape"  # a MiniLM (hidden 384) adapter, its base folder unknown
    make_adapter(minilm_dir(), f, r=2, targets=["query"], seed=21)
    _edit_config(f, base_model_name_or_path="/nonexistent/trained-elsewhere")
    out["bad/shape"] = (InvalidAdapter, "do not fit")

    f = root / "bad/other-base-folder"  # made for MiniLM, whose folder is here to compare
    make_adapter(minilm_dir(), f, r=2, targets=["query"], seed=22)
    out["bad/other-base-folder"] = (InvalidAdapter, "another base model")

    f = _copy(good, root / "bad/other-base-hub")
    _edit_config(f, base_model_name_or_path="sentence-transformers/all-MiniLM-L6-v2")
    out["bad/other-base-hub"] = (InvalidAdapter, "made for base model")

    f = _copy(good, root / "bad/targets-config")
    _edit_config(f, target_modules=["q_proj", "v_proj"])
    out["bad/targets-config"] = (InvalidAdapter, "q_proj")

    f = _copy(good, root / "bad/targets-weights")
    _rename_keys(f, "attention.self.query", "self_attn.q_proj")
    _edit_config(f, target_modules=["query", "value", "q_proj"])
    out["bad/targets-weights"] = (InvalidAdapter, "q_proj")

    f = _copy(good, root / "bad/layer")
    _rename_keys(f, "layer.1.", "layer.7.")
    out["bad/layer"] = (InvalidAdapter, "layer 7")

    f = _copy(good, root / "bad/no-config")
    (f / "adapter_config.json").unlink()
    out["bad/no-config"] = (InvalidAdapter, "adapter_config.json")

    f = _copy(good, root / "bad/dora")
    _edit_config(f, use_dora=True)
    out["bad/dora"] = (InvalidAdapter, "DoRA")

    f = _copy(good, root / "bad/heads")
    torch.save({"weight": torch.zeros(3, 64), "bias": torch.zeros(3)}, f / "colbert_linear.pt")
    out["bad/heads"] = (InvalidAdapter, "colbert_linear.pt")

    (root / "outside").mkdir()
    out["../outside"] = (InvalidRequest, "'..'")
    out[str(Path("/etc").resolve())] = (InvalidRequest, "outside the adapter roots")
    return out


def test_bad_adapters_give_4xx_and_leave_nothing(m3_engine, bad):
    mgr = m3_adapter_manager(m3_engine)
    before = {a["id"] for a in m3_engine.adapters(M3)}
    for lora_id, (cls, fragment) in bad.items():
        with pytest.raises(cls) as info:
            m3_engine.encode(M3, ["hello"], ["dense"], {"lora_id": lora_id})
        err = info.value
        assert 400 <= err.status < 500, (lora_id, err.status)
        assert fragment in err.message, (lora_id, err.message)
        if cls is not InvalidRequest:
            assert repr(lora_id) in err.message, err.message  # names the adapter
        # the server carries on: base and a good adapter still work
        ok = m3_engine.encode(M3, ["hello"], ["dense"], {"lora_id": "m3/qv-r4"})
        assert ok[0].dense is not None
    after = {a["id"] for a in m3_engine.adapters(M3)}
    assert after == before | {"m3/qv-r4"}
    assert not any(i.startswith("bad/") for i in after)
    wait_until(lambda: not mgr._refs)
    assert all(a.name in before | {"m3/qv-r4"} for a in mgr._by_slot.values())
    assert not mgr._refs and not mgr._retired


def test_adapter_over_the_byte_limit_is_refused(engine):
    engine.settings.max_adapter_bytes = 1000
    with pytest.raises(InvalidAdapter, match="memory limit"):
        engine.encode(M3, ["x"], ["dense"], {"lora_id": "m3/qv-r4"})
    assert engine.adapters(M3) == []


# ------------------------------------------------------------------ loading and unloading


def test_concurrent_first_requests_load_once_and_timeout(engine, m3_refs, monkeypatch):
    import sie_server.engine.adapters as adapters_mod

    calls = []
    real = adapters_mod.load_adapter

    def slow_load(*args, **kwargs):
        calls.append(args[0])
        time.sleep(0.6)
        return real(*args, **kwargs)

    monkeypatch.setattr(adapters_mod, "load_adapter", slow_load)
    eng = engine
    results, errors = [], []

    def client():
        try:
            results.append(eng.encode(M3, [TEXTS[1]], ["dense"], {"lora_id": "m3/ffn-r2"}))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=client) for _ in range(6)]
    for t in threads:
        t.start()
    base = eng.encode(M3, [TEXTS[1]], ["dense"])  # served while the adapter loads
    assert cosine(base[0].dense, m3_refs[None][1]["dense"]) >= COS
    for t in threads:
        t.join()
    assert not errors and len(results) == 6
    assert calls == ["m3/ffn-r2"]
    for r in results:
        assert cosine(r[0].dense, m3_refs["m3/ffn-r2"][1]["dense"]) >= COS

    # a load slower than adapter_load_timeout_s: 503 adapter_loading, the load goes on
    eng.settings.adapter_load_timeout_s = 0.1
    with pytest.raises(AdapterLoading) as info:
        eng.encode(M3, [TEXTS[1]], ["dense"], {"lora_id": "m3/qv-r4"})
    assert info.value.status == 503 and "m3/qv-r4" in info.value.message
    eng.settings.adapter_load_timeout_s = 30
    got = eng.encode(M3, [TEXTS[1]], ["dense"], {"lora_id": "m3/qv-r4"})
    assert cosine(got[0].dense, m3_refs["m3/qv-r4"][1]["dense"]) >= COS
    assert calls == ["m3/ffn-r2", "m3/qv-r4"]


def test_lru_eviction_and_unload_keep_requests_in_flight(engine, m3_dir, root):
    eng = engine
    eng.settings.max_adapters = 2
    mgr = m3_adapter_manager(eng)
    held = mgr.acquire("m3/qv-r4")  # as a queued request would
    eng.load_adapter(M3, "m3/ffn-r2")
    eng.load_adapter(M3, "m3/all-r8-rslora")  # over the count: the idle one goes first
    assert [a["id"] for a in eng.adapters(M3)] == ["m3/qv-r4", "m3/all-r8-rslora"]
    eng.settings.max_adapters = 1
    eng.load_adapter(M3, "m3/ffn-r2")  # then the one in use
    assert [a["id"] for a in eng.adapters(M3)] == ["m3/ffn-r2"]
    assert held in mgr._by_slot and held in mgr._retired  # retired, still usable
    batch = pack([np.array([0, 35378, 8999, 38, 2])], frozenset({"dense"}), np.array([held]))
    out = eng.registry.get(M3).model.forward(batch).to_host()
    want = m3_reference_hello(m3_dir, root)
    assert cosine(out.dense[0], want) >= COS
    mgr.release(held)
    assert held not in mgr._by_slot and not mgr._retired

    info = eng.unload_adapter(M3, "m3/ffn-r2")
    assert info == {"id": "m3/ffn-r2", "in_use": 0}
    assert eng.adapters(M3) == []
    with pytest.raises(AdapterNotFound):
        eng.unload_adapter(M3, "m3/ffn-r2")


def m3_reference_hello(m3_dir: Path, root: Path) -> np.ndarray:
    """Dense output of "Hello world!" with m3/qv-r4, from peft loading the saved adapter."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_base(m3_dir), str(root / "m3/qv-r4")).eval()
    with torch.no_grad():
        h = model(input_ids=torch.tensor([[0, 35378, 8999, 38, 2]])).last_hidden_state[0]
    return torch.nn.functional.normalize(h[0], dim=-1).numpy()


def test_load_and_unload_under_traffic_lose_and_mix_nothing(engine, m3_refs):
    """Clients encode with random adapters (and none) while another thread preloads and
    unloads adapters and the LRU (max 2) evicts: every result is its own adapter's."""
    eng = engine
    eng.settings.max_adapters = 2
    names = [None, "m3/qv-r4", "m3/all-r8-rslora", "m3/ffn-r2", "m3/heads-r4"]
    stop = time.monotonic() + 3.0
    failures: list[str] = []
    counts = {n: 0 for n in names}

    def client(seed: int) -> None:
        rng = random.Random(seed)
        while time.monotonic() < stop:
            picks = rng.sample(range(len(TEXTS)), rng.randint(1, 3))
            name = rng.choice(names)
            try:
                got = eng.submit(M3, [TEXTS[i] for i in picks], ALL,
                                 {"lora_id": name}).result(timeout=30)
                for i, g in zip(picks, got):
                    assert_m3_close(g, m3_refs[name][i], f"{name} text {i}")
                counts[name] += 1
            except Exception as exc:  # noqa: BLE001
                failures.append(f"{name}: {type(exc).__name__}: {exc}")

    def admin() -> None:
        rng = random.Random(99)
        while time.monotonic() < stop:
            name = rng.choice(names[1:])
            try:
                if rng.random() < 0.5:
                    eng.load_adapter(M3, name)
                else:
                    eng.unload_adapter(M3, name)
            except AdapterNotFound:
                pass  # not loaded at the moment
            except Exception as exc:  # noqa: BLE001
                failures.append(f"admin {name}: {type(exc).__name__}: {exc}")
            time.sleep(0.01)

    threads = [threading.Thread(target=client, args=(s,)) for s in range(4)]
    threads.append(threading.Thread(target=admin))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures[:5]
    assert all(counts[n] > 0 for n in names), counts
    mgr = m3_adapter_manager(eng)
    wait_until(lambda: not mgr._refs)  # the last releases run in done-callbacks
    assert not mgr._refs and not mgr._retired
    assert len(mgr._by_slot) == len(eng.adapters(M3)) <= 2


def wait_until(cond, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not cond() and time.monotonic() < end:
        time.sleep(0.01)


def test_adapter_ids_are_confined_to_the_roots(tmp_path, m3_dir):
    from sie_server.engine.adapters import resolve_adapter

    r = tmp_path / "root"
    (r / "org/a").mkdir(parents=True)
    (tmp_path / "secret").mkdir()
    (r / "escape").symlink_to(tmp_path / "secret")
    assert resolve_adapter("org/a", [r], False) == (r / "org/a").resolve()
    assert resolve_adapter(str(r / "org/a"), [r], False) == (r / "org/a").resolve()
    for bad_id in ("../secret", "org/../../secret", str(tmp_path / "secret"), "escape", "",
                   "a\\b"):
        with pytest.raises(InvalidRequest):
            resolve_adapter(bad_id, [r], False)
    with pytest.raises(AdapterNotFound, match="downloading it is not allowed"):
        resolve_adapter("some-org/not-cached-lora", [r], False)


@pytest.mark.parametrize("n_adapters", [1, 3, 7])
def test_segmented_hook_equals_a_per_row_loop(n_adapters):
    """BatchLora against the definition, row by row: ranks differ, some adapters lack some
    linears, sequences of all lengths, base rows interleaved and left bit-for-bit alone."""
    from sie_server.runtime.lora import BatchLora, Delta, LoraAdapter, StackCache, batch_lora

    g = torch.Generator().manual_seed(n_adapters)
    hidden, out_f = 16, 24
    adapters = {}
    for k in range(n_adapters):
        r = 1 + 3 * k
        deltas = {(0, "ffn_in"): Delta(torch.randn(r, hidden, generator=g),
                                       torch.randn(out_f, r, generator=g))}
        if k % 2 == 0:
            deltas[(1, "ffn_in")] = Delta(torch.randn(r, hidden, generator=g),
                                          torch.randn(out_f, r, generator=g))
        slot = 10 + 5 * k
        adapters[slot] = LoraAdapter(f"a{k}", Path("."), deltas, r, 1.0, False, (), (0,),
                                     uid=slot)
    lengths = [int(x) for x in torch.randint(1, 40, (23,), generator=g)]
    choices = [-1, *adapters, 999]  # 999: a slot no longer known, treated as base
    slots = np.array([choices[int(i)] for i in torch.randint(0, len(choices), (23,),
                                                               generator=g)])
    batch = pack([np.zeros(n, dtype=np.int64) for n in lengths], frozenset({"dense"}), slots)
    # loaded but used by no row: first in the stacked table, so every index must be mapped
    adapters[3] = LoraAdapter("idle", Path("."), {(0, "ffn_in"): Delta(
        torch.randn(2, hidden, generator=g), torch.randn(out_f, 2, generator=g))}, 2, 1.0,
        False, (), (0,), uid=3)
    hook = batch_lora(batch, adapters, torch.device("cpu"), StackCache())
    assert isinstance(hook, BatchLora)
    x = torch.randn(batch.num_tokens, hidden, generator=g)
    seq_of_token = np.repeat(np.arange(len(lengths)), lengths)
    for layer in (0, 1, 2):
        y0 = torch.randn(batch.num_tokens, out_f, generator=g)
        y = hook(layer, "ffn_in", x, y0.clone())
        for t in range(batch.num_tokens):
            a = adapters.get(int(slots[seq_of_token[t]]))
            d = a.deltas.get((layer, "ffn_in")) if a else None
            if d is None:
                assert torch.equal(y[t], y0[t])  # bit-for-bit untouched
            else:
                torch.testing.assert_close(y[t], y0[t] + (x[t] @ d.a.T) @ d.b.T, atol=1e-4,
                                           rtol=1e-5)
