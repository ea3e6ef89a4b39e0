"""Start `sie-server serve` as a separate process for the HTTP measurements."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`with Server(...) as srv:` runs the server until the block ends; `srv.url` is its root."""

    def __init__(self, name: str, folder: Path, device: str, dtype: str = "auto",
                 extra_args: list[str] | None = None, ready_timeout: float = 600.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", "sie_server.cli", "serve", "--host", "127.0.0.1",
                    "--port", str(self.port), "--device", device, "--dtype", dtype,
                    "--model", f"{name}={folder}", "--default-model", name,
                    "--log-level", "warning", *(extra_args or [])]
        self.ready_timeout = ready_timeout
        self.proc: subprocess.Popen | None = None
        # removed when closed: every error raised here carries its tail
        self.log = tempfile.NamedTemporaryFile("w+", prefix="sie-bench-server-", suffix=".log")
        self.startup_s: float | None = None

    def log_tail(self, n: int = 40) -> str:
        self.log.flush()
        return "\n".join(Path(self.log.name).read_text(errors="replace").splitlines()[-n:])

    def __enter__(self) -> "Server":
        env = dict(os.environ)
        src = str(REPO / "src")
        env["PYTHONPATH"] = os.pathsep.join([src, *filter(None, [env.get("PYTHONPATH")])])
        started = time.perf_counter()
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     env=env, cwd=str(REPO))
        deadline = time.monotonic() + self.ready_timeout
        with httpx.Client(timeout=5.0) as http:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited with {self.proc.returncode}:\n"
                                       f"{self.log_tail()}")
                try:
                    r = http.get(f"{self.url}/readyz")
                    if r.status_code == 200:
                        break
                    if b'"failed"' in r.content:
                        raise RuntimeError(f"server failed to load: {r.text}\n{self.log_tail()}")
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    self.__exit__()
                    raise RuntimeError(f"server not ready after {self.ready_timeout}s:\n"
                                       f"{self.log_tail()}")
                time.sleep(0.2)
        self.startup_s = time.perf_counter() - started
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
