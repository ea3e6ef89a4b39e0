"""A newcomer's first run: `--version`, the config file, the start-up line about address and
auth, corrupt model folders answered with the file and the fix, and the documented catalog
with its matryoshka models (issue 17, items 4-7). Servers are real processes on loopback."""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from dataclasses import MISSING, fields
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT

from sie_server import cli
from sie_server.config import Settings
from sie_server.engine.catalog import load_catalog
from sie_server.models.base import ModelSpec

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
EXAMPLE_CONFIG = ROOT / "examples" / "sie-server.yaml"
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src")}


# --- item 6: --version and --config ---------------------------------------------------------

def test_version_prints_the_package_version() -> None:
    out = subprocess.run([sys.executable, "-m", "sie_server.cli", "--version"], env=ENV,
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == f"sie-server {importlib.metadata.version('sie')}"


def _args(argv: list[str]):
    return cli.apply_config_file(cli.parser().parse_args(argv), argv)


def test_example_config_holds_every_serve_flag_and_parses() -> None:
    flags = {o[2:] for a in cli._subparser(cli.parser(), "serve")._actions
             for o in a.option_strings if o.startswith("--")} - {"help", "config"}
    keys = set(yaml.safe_load(EXAMPLE_CONFIG.read_text()))
    assert keys == flags, f"missing {flags - keys}, unknown {keys - flags}"
    args = _args(["serve", "--config", str(EXAMPLE_CONFIG)])
    assert args.port == 8080 and args.model == [("BAAI/bge-m3", "/models/bge-m3")]
    assert args.default_models == [MINILM] and args.max_batch_tokens is None


def test_config_precedence_file_then_env_then_flags(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("port: 9001\nmax_batch_tokens: 512\nmax-items-per-request: 3\n"
                 "allow-download: true\nmodel: {a/b: /x}\n")
    monkeypatch.setenv("SIE_MAX_BATCH_TOKENS", "777")
    argv = ["serve", "--config", str(f), "--max-items-per-request", "5"]
    a = _args(argv)
    s = Settings.from_env(port=a.port, max_batch_tokens=a.max_batch_tokens,
                          max_items_per_request=a.max_items_per_request,
                          allow_download=a.allow_download, models=dict(a.model))
    assert (s.port, s.max_batch_tokens, s.max_items_per_request) == (9001, 777, 5)
    assert s.allow_download and s.models == {"a/b": "/x"}


@pytest.mark.parametrize("text, message", [
    ("colour: red\n", "unknown key 'colour'"),
    ("port: abc\n", "config key 'port'"),
    ("allow-download: 1\n", "must be true or false"),
    ("- port\n", "expected a mapping"),
    ("port: [\n", "config file"),
])
def test_bad_config_files_are_refused_naming_the_key(tmp_path: Path, text: str,
                                                     message: str) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    run = subprocess.run([sys.executable, "-m", "sie_server.cli", "serve", "--config", str(f)],
                         env=ENV, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and message in run.stderr, run.stderr


@pytest.mark.slow
def test_server_started_from_a_config_file(start_server, bge_m3_dir: Path,
                                           tmp_path: Path) -> None:
    """The file serves a model and sets limits and a key; SIE_API_KEYS beats the file's key,
    a flag beats the file's limit; the start-up log says the address and that auth is on."""
    f = tmp_path / "sie.yaml"
    f.write_text(yaml.safe_dump({"model": {"file/m3": str(bge_m3_dir)},
                                 "default-model": ["file/m3"], "max-items-per-request": 3,
                                 "api-key": ["file-key"]}))
    server = start_server(["--config", str(f), "--max-items-per-request", "5"],
                          env={"SIE_API_KEYS": "env-key"})
    auth = {"Authorization": "Bearer env-key"}
    models = httpx.get(f"{server.url}/v1/models", headers=auth).json()["models"]
    assert {m["id"]: m["state"] for m in models}["file/m3"] == "loaded"
    assert httpx.get(f"{server.url}/v1/models",
                     headers={"Authorization": "Bearer file-key"}).status_code == 401

    def encode(n: int) -> httpx.Response:
        return httpx.post(f"{server.url}/v1/encode/file/m3", headers=auth, timeout=60,
                          json={"items": [{"text": f"t{i}"} for i in range(n)]})

    assert encode(5).status_code == 200
    assert encode(6).status_code == 400
    assert f"listening on 127.0.0.1:{server.port}; auth on (1 API key)" in server.output()


# --- item 7: say where the server listens and whether auth is on ----------------------------

def test_announce_warns_when_open_to_other_machines_without_a_key(
        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="sie_server.cli"):
        cli.announce(Settings(dtype="float32", host="0.0.0.0", port=8080))
    lines = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert lines[0] == ("INFO", "listening on 0.0.0.0:8080 (every network interface); "
                                "auth off (no --api-key)")
    assert lines[1][0] == "WARNING" and "--api-key" in lines[1][1] and "127.0.0.1" in lines[1][1]
    for quiet in (Settings(dtype="float32", host="127.0.0.1"), Settings(dtype="float32", host="localhost"), Settings(dtype="float32", host="::1"),
                  Settings(dtype="float32", host="0.0.0.0", api_keys=["k1", "k2"])):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="sie_server.cli"):
            cli.announce(quiet)
        assert [r.levelname for r in caplog.records] == ["INFO"]
    assert caplog.records[0].getMessage().endswith("auth on (2 API keys)")


# --- item 5: a corrupt model folder names the file and the fix -------------------------------

def _linked_copy(src: Path, dst: Path) -> Path:
    """`src` as a folder of symlinks (the big files are not copied)."""
    shutil.copytree(src, dst, copy_function=os.symlink)
    return dst


def _damage(folder: Path, name: str, data: bytes) -> Path:
    path = folder / name
    path.unlink()
    path.write_bytes(data)
    return path


@pytest.fixture(scope="module")
def corrupt_folders(tmp_path_factory, minilm_dir: Path, bge_m3_dir: Path) -> dict:
    """name -> (folder, the damaged file, words the cause must contain)."""
    root = tmp_path_factory.mktemp("corrupt")
    cases: dict[str, tuple[Path, Path, str]] = {}

    def minilm(name: str, file: str, data: bytes, cause: str) -> None:
        folder = _linked_copy(minilm_dir, root / name)
        cases[f"bad/{name}"] = (folder, _damage(folder, file, data), cause)

    weights = (minilm_dir / "model.safetensors").read_bytes()
    minilm("safetensors", "model.safetensors", weights[: len(weights) // 2],
           "incomplete metadata")
    minilm("tokenizer", "tokenizer.json", (minilm_dir / "tokenizer.json").read_bytes()[:29],
           "EOF while parsing")
    minilm("config", "config.json", (minilm_dir / "config.json").read_bytes()[:40],
           "JSONDecodeError")
    minilm("config-keys", "config.json", b'{"model_type": "bert"}', "no 'vocab_size' entry")
    minilm("modules", "modules.json", (minilm_dir / "modules.json").read_bytes()[:25],
           "JSONDecodeError")
    minilm("pooling", "1_Pooling/config.json", b'{"word_embedding_dimension": 3',
           "JSONDecodeError")
    # a truncated pytorch_model.bin (and no safetensors beside it)
    from safetensors.torch import load_file
    folder = _linked_copy(minilm_dir, root / "bin")
    (folder / "model.safetensors").unlink()
    torch.save(load_file(str(minilm_dir / "model.safetensors")), folder / "full.bin")
    full = (folder / "full.bin").read_bytes()
    (folder / "full.bin").unlink()
    bin_path = folder / "pytorch_model.bin"
    bin_path.write_bytes(full[: len(full) // 2])
    cases["bad/bin"] = (folder, bin_path, "RuntimeError")
    # sharded weights with one shard missing
    folder = _linked_copy(minilm_dir, root / "shard")
    (folder / "model.safetensors").unlink()
    (folder / "model-00002-of-00002.safetensors").write_bytes(weights)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "embeddings.word_embeddings.weight": "model-00001-of-00002.safetensors",
        "pooler.dense.weight": "model-00002-of-00002.safetensors"}}))
    cases["bad/shard"] = (folder, folder / "model-00001-of-00002.safetensors",
                          "the file is missing (model.safetensors.index.json lists it)")

    for name, file, data, cause in [
            ("m3-colbert", "colbert_linear.pt",
             (bge_m3_dir / "colbert_linear.pt").read_bytes()[:100], "Error"),
            ("m3-sparse", "sparse_linear.pt", None, "no Linear state dict")]:
        folder = _linked_copy(bge_m3_dir, root / name)
        if data is None:
            (folder / file).unlink()
            torch.save(torch.zeros(3), folder / file)
            cases[f"bad/{name}"] = (folder, folder / file, cause)
        else:
            cases[f"bad/{name}"] = (folder, _damage(folder, file, data), cause)
    return cases


@pytest.mark.slow
def test_corrupt_model_folders_answer_502_naming_the_file(start_server, corrupt_folders) -> None:
    args = [a for name, (folder, _, _) in corrupt_folders.items()
            for a in ("--model", f"{name}={folder}")]
    server = start_server(args)
    for name, (_, damaged, cause) in corrupt_folders.items():
        r = httpx.post(f"{server.url}/v1/encode/{name}", json={"items": [{"text": "hi"}]},
                       timeout=120)
        assert r.status_code == 502, (name, r.text)
        err = r.json()["detail"]
        assert err["code"] == "MODEL_LOAD_FAILED"
        msg = err["message"]
        assert msg.startswith(f"{name}: {damaged} cannot be read: "), (name, msg)
        assert cause in msg, (name, msg)
        assert "download the model again" in msg and "--model NAME=/path/to/folder" in msg
    # the intact default model still serves beside them
    ok = httpx.post(f"{server.url}/v1/encode/{MINILM}", json={"items": [{"text": "hi"}]})
    assert ok.status_code == 200


def test_hub_cache_paths_get_the_download_command(tmp_path: Path) -> None:
    from sie_server.runtime.weights import DamagedFile
    path = tmp_path / "hub" / "models--BAAI--bge-m3" / "snapshots" / "abc" / "config.json"
    assert "huggingface-cli download BAAI/bge-m3 --force-download" in str(
        DamagedFile(path, "x"))


# --- item 4: the catalog format and its matryoshka models ------------------------------------

MATRYOSHKA = {
    "mixedbread-ai/mxbai-embed-large-v1":
        "Represent this sentence for searching relevant passages: ",
    "Snowflake/snowflake-arctic-embed-m-v1.5":
        "Represent this sentence for searching relevant passages: ",
    "Snowflake/snowflake-arctic-embed-l-v2.0": "query: ",
}


def test_catalog_marks_the_matryoshka_models() -> None:
    specs, _ = load_catalog([])
    sentence_transformers = {n for n, s in specs.items() if s.matryoshka
                             and s.family == "sentence-transformers"}
    assert sentence_transformers == set(MATRYOSHKA)
    for name, prefix in MATRYOSHKA.items():
        s = specs[name]
        assert s.family == "sentence-transformers" and s.source == name
        assert s.query_prefix == prefix and s.document_prefix == ""
    for not_mrl in ("BAAI/bge-m3", MINILM, "BAAI/bge-base-en-v1.5"):
        assert not specs[not_mrl].matryoshka


def test_catalog_doc_lists_every_key_with_its_default() -> None:
    doc = (ROOT / "docs" / "CATALOG.md").read_text()
    rows = dict(re.findall(r"^\| `(\w+)` \| ([^|]+?) \|", doc, re.M))
    for f in fields(ModelSpec):
        if f.name == "name":
            continue
        assert f.name in rows, f"docs/CATALOG.md does not document {f.name}"
        if f.default is MISSING and f.default_factory is MISSING:
            assert rows[f.name] == "required", f.name
        else:
            default = f.default if f.default is not MISSING else f.default_factory()
            assert yaml.safe_load(rows[f.name].strip("`")) == default, f.name
    assert "default_models" in doc and "](docs/CATALOG.md)" in (ROOT / "README.md").read_text()


@pytest.mark.slow
def test_dimensions_on_a_matryoshka_catalog_entry(start_server, minilm_dir: Path,
                                                  tmp_path: Path) -> None:
    """An operator catalog marks a model matryoshka: OpenAI `dimensions` cuts and
    re-normalises sentence-transformers' vectors; the same model unmarked refuses it."""
    from sentence_transformers import SentenceTransformer
    catalog = tmp_path / "mine.yaml"
    catalog.write_text(yaml.safe_dump({"models": {
        "mine/mrl": {"family": "sentence-transformers", "source": str(minilm_dir),
                     "matryoshka": True}}}))
    server = start_server(["--catalog", str(catalog)])
    texts = ["a matryoshka doll", "nested vectors"]
    r = httpx.post(f"{server.url}/v1/embeddings", timeout=60,
                   json={"model": "mine/mrl", "input": texts, "dimensions": 128})
    assert r.status_code == 200, r.text
    got = np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float32)
    ref = SentenceTransformer(str(minilm_dir), device="cpu").encode(texts)[:, :128]
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    assert got.shape == (2, 128)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert (np.sum(got * ref, axis=1) >= 0.9999).all()
    refused = httpx.post(f"{server.url}/v1/embeddings",
                         json={"model": MINILM, "input": texts, "dimensions": 128})
    assert refused.status_code == 400 and "dimensions" in refused.json()["error"]["message"]


def test_sharded_safetensors_load_like_one_file(tmp_path: Path, minilm_dir: Path) -> None:
    from safetensors.torch import load_file, save_file

    from sie_server.runtime.weights import estimate_bytes, load_state_dict
    whole = load_file(str(minilm_dir / "model.safetensors"))
    keys = sorted(whole)
    shards = {"model-00001-of-00002.safetensors": keys[::2],
              "model-00002-of-00002.safetensors": keys[1::2]}
    for name, part in shards.items():
        save_file({k: whole[k] for k in part}, str(tmp_path / name))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: name for name, part in shards.items() for k in part}}))
    got = load_state_dict(tmp_path)
    assert sorted(got) == keys and all(torch.equal(got[k], whole[k]) for k in keys)
    assert estimate_bytes(tmp_path, torch.float32) == estimate_bytes(minilm_dir, torch.float32)
