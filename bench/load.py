"""Load generators: closed-loop clients against the in-process engine and against HTTP.

Closed loop: each of N clients sends one request, waits for its answer, then takes the next
request from a shared list, until the list is empty. Wall time runs from the first request
sent to the last answer received; latency is per request, as the client sees it.

HTTP clients run in separate worker processes (`python -m bench.load`; each imports only the
SDK, never torch), so the benchmark measures the server rather than one Python process
decoding responses. Workers open their connections, report ready, and start together.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import pickle
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

Record = tuple[float, float, int, int]  # (start, end, items, tokens)


@dataclass
class LoadResult:
    records: list[Record] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    wall_s: float | None = None  # overrides max(end) - min(start) (sequential rounds)
    client_cpu_s: float | None = None  # CPU the HTTP client processes spent, summed

    def extend(self, other: "LoadResult") -> None:
        self.records += other.records
        self.errors += other.errors
        if other.client_cpu_s is not None:
            self.client_cpu_s = (self.client_cpu_s or 0.0) + other.client_cpu_s

    def summary(self, **extra: Any) -> dict:
        """Throughput and latency figures (JSON-ready)."""
        if not self.records:
            return {"error": "no request completed", "errors": len(self.errors),
                    "first_errors": self.errors[:3], **extra}
        rec = np.asarray(self.records, dtype=np.float64)
        wall = self.wall_s if self.wall_s is not None else float(rec[:, 1].max() - rec[:, 0].min())
        lat = (rec[:, 1] - rec[:, 0]) * 1e3
        items, tokens = int(rec[:, 2].sum()), int(rec[:, 3].sum())
        out = {
            "tokens_per_s": round(tokens / wall, 1),
            "texts_per_s": round(items / wall, 2),
            "requests_per_s": round(len(rec) / wall, 2),
            "p50_ms": round(float(np.percentile(lat, 50)), 3),
            "p99_ms": round(float(np.percentile(lat, 99)), 3),
            "mean_ms": round(float(lat.mean()), 3),
            "wall_s": round(wall, 4),
            "requests": len(rec),
            "texts": items,
            "tokens": tokens,
            "errors": len(self.errors),
        }
        if self.client_cpu_s is not None:  # ~1 per client process: the clients were the limit
            out["client_cpu_s"] = round(self.client_cpu_s, 3)
            out["client_cpu_cores"] = round(self.client_cpu_s / wall, 2)
        if self.errors:
            out["first_errors"] = self.errors[:3]
        out.update(extra)
        return out


def chunk(texts: Sequence[str], size: int) -> list[list[str]]:
    return [list(texts[i:i + size]) for i in range(0, len(texts), size)]


# ------------------------------------------------------------------ in-process (threads)

def closed_loop_threads(call: Callable[[int], tuple[int, int]], n_requests: int,
                        clients: int) -> LoadResult:
    """`clients` threads run call(i) for i in 0..n_requests-1; call returns (items, tokens)."""
    counter = itertools.count()
    lock = threading.Lock()
    result = LoadResult()

    def worker() -> None:
        recs, errs = [], []
        while True:
            with lock:
                i = next(counter)
            if i >= n_requests:
                break
            t0 = time.perf_counter()
            try:
                items, tokens = call(i)
            except Exception as exc:  # noqa: BLE001 - counted and reported, not fatal
                errs.append(f"{type(exc).__name__}: {exc}")
                continue
            recs.append((t0, time.perf_counter(), items, tokens))
        with lock:
            result.records += recs
            result.errors += errs

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(min(clients, n_requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return result


def engine_call(engine, model: str, requests: list[list[str]], outputs: list[str],
                options_for: Callable[[int], dict] | None = None) -> Callable[[int], tuple[int, int]]:
    """call(i) for closed_loop_threads: submit request i to an in-process Engine and wait."""

    def call(i: int) -> tuple[int, int]:
        texts = requests[i]
        res = engine.submit(model, texts, outputs, options_for(i) if options_for else {}).result()
        if len(res) != len(texts):
            raise RuntimeError(f"{len(res)} results for {len(texts)} texts")
        return len(res), sum(r.token_count for r in res)

    return call


# ------------------------------------------------------------------ HTTP (processes)

async def _http_clients(url: str, model: str, requests: list[list[str]], outputs: list[str],
                        options: list[dict | None], n_clients: int, timeout: float,
                        ready: Callable[[], None]) -> LoadResult:
    """`n_clients` SDK clients share `requests` (closed loop); `ready()` blocks until the
    parent says go, after the connections are open."""
    from sie_sdk import SIEAsyncClient

    clients = [SIEAsyncClient(url, timeout=timeout, max_items_per_request=1 << 20,
                              max_concurrency=1) for _ in range(n_clients)]
    result = LoadResult()
    todo = iter(range(len(requests)))
    try:
        for c in clients:  # open the connections before the clock starts
            await c.health()
        await asyncio.get_running_loop().run_in_executor(None, ready)
        cpu_at_go = time.process_time()

        async def client(c) -> None:
            for i in todo:
                t0 = time.perf_counter()
                try:
                    res = await c.encode(model, requests[i], outputs, options[i])
                except Exception as exc:  # noqa: BLE001 - counted and reported
                    result.errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                t1 = time.perf_counter()
                if len(res) != len(requests[i]):
                    result.errors.append(f"{len(res)} results for {len(requests[i])} texts")
                    continue
                result.records.append((t0, t1, len(res), sum(r["token_count"] for r in res)))

        await asyncio.gather(*(client(c) for c in clients))
        result.client_cpu_s = time.process_time() - cpu_at_go  # before closing connections
    finally:
        for c in clients:
            await c.close()
    return result


def _worker_main() -> None:
    """`python -m bench.load`: one client process. stdin: a pickled job, then a line "go";
    stdout: "ready" once connected, then the pickled (records, errors)."""
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    job = pickle.load(inp)

    def ready() -> None:
        out.write(b"ready\n")
        out.flush()
        if inp.readline().strip() != b"go":
            raise SystemExit("no go")

    try:
        res = asyncio.run(_http_clients(ready=ready, **job))
        payload = (res.records, res.errors, res.client_cpu_s)
    except BaseException:  # noqa: BLE001 - the parent must hear of it
        payload = ([], [traceback.format_exc()], None)
    pickle.dump(payload, out)
    out.flush()


def default_procs(clients: int) -> int:
    """Client processes: one on a small machine, else half the cores (never more than
    clients). An httpx client process manages ~300-700 short requests/s per core, so a
    few-thousand-requests/s target needs several."""
    cpus = os.cpu_count() or 1
    return 1 if cpus <= 4 else max(1, min(clients, cpus // 2))


def http_closed_loop(url: str, model: str, requests: list[list[str]], outputs: list[str],
                     clients: int, procs: int | None = None,
                     options: list[dict | None] | dict | None = None,
                     timeout: float = 600.0) -> LoadResult:
    """`clients` SDK clients spread over `procs` worker processes (requests dealt round-robin
    to the processes; within one, its clients share its list). Workers are plain
    subprocesses running `python -m bench.load`, so they import the SDK only."""
    procs = max(1, min(procs or default_procs(clients), clients, len(requests)))
    if not isinstance(options, list):
        options = [options] * len(requests)
    per = [clients // procs + (1 if k < clients % procs else 0) for k in range(procs)]
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(root) / "src"), root,
                                         *filter(None, [env.get("PYTHONPATH")])])
    workers = []
    result = LoadResult()
    try:
        for k in range(procs):
            w = subprocess.Popen([sys.executable, "-m", "bench.load"], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, env=env, cwd=root)
            workers.append(w)
            job = {"url": url, "model": model, "requests": requests[k::procs],
                   "outputs": outputs, "options": options[k::procs], "n_clients": per[k],
                   "timeout": timeout}
            pickle.dump(job, w.stdin)
            w.stdin.flush()
        for w in workers:
            line = w.stdout.readline()
            if line.strip() != b"ready":
                raise RuntimeError(f"an HTTP client process failed to start (exit {w.wait()})")
        for w in workers:
            w.stdin.write(b"go\n")
            w.stdin.flush()
        for w in workers:
            records, errors, cpu = pickle.load(w.stdout)
            result.extend(LoadResult(records, errors, client_cpu_s=cpu))
    finally:
        for w in workers:
            try:
                w.wait(timeout=10)
            except subprocess.TimeoutExpired:
                w.kill()
                w.wait()
    return result


def http_sequential(url: str, model: str, requests: list[list[str]], outputs: list[str],
                    gap_s: float = 0.005, timeout: float = 60.0) -> LoadResult:
    """One client, one request at a time with a pause between: latency of an idle server."""
    from sie_sdk import SIEClient

    result = LoadResult()
    with SIEClient(url, timeout=timeout, max_items_per_request=1 << 20, max_concurrency=1) as c:
        c.health()
        for req in requests:
            time.sleep(gap_s)
            t0 = time.perf_counter()
            try:
                res = c.encode(model, req, outputs)
            except Exception as exc:  # noqa: BLE001
                result.errors.append(f"{type(exc).__name__}: {exc}")
                continue
            result.records.append((t0, time.perf_counter(), len(res),
                                   sum(r["token_count"] for r in res)))
    return result


if __name__ == "__main__":
    _worker_main()
