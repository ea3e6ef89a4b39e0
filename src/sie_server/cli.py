"""`sie-server serve`: the command line, filling Settings and starting the HTTP server."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from pathlib import Path
from typing import Iterator

import uvicorn

from . import logs
from .config import Settings


class GracefulServer(uvicorn.Server):
    """SIGTERM/SIGINT: stop accepting, finish every accepted request, drain the engine,
    exit 0 (plain uvicorn re-raises the signal after shutdown, so the exit status is -15)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        previous = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def _model_flag(value: str) -> tuple[str, str]:
    name, sep, source = value.partition("=")
    if not sep or not name or not source:
        raise argparse.ArgumentTypeError("expected NAME=PATH_OR_HUB_ID")
    return name, source


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sie-server", description="Embedding inference server")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve the HTTP API")
    s.add_argument("--host", default="0.0.0.0")
    s.add_argument("--port", type=int, default=8080)
    s.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    s.add_argument("--dtype", default="auto",
                   help="auto (bf16 on CUDA and on CPUs with native bf16 matmuls, else fp32) | "
                        "float32 | float16 | bfloat16")
    s.add_argument("--model", action="append", type=_model_flag, default=[], metavar="NAME=PATH",
                   help="serve NAME from a folder or hub id (repeatable)")
    s.add_argument("--default-model", action="append", dest="default_models", metavar="NAME",
                   help="load NAME at start (repeatable; default: the catalog's defaults)")
    s.add_argument("--pin", action="append", dest="pinned_models", metavar="NAME",
                   help="never evict NAME (repeatable)")
    s.add_argument("--memory-budget-bytes", type=int,
                   help="memory for loaded models (default: 90%% of GPU memory, or half the RAM)")
    s.add_argument("--model-load-timeout", type=float, dest="model_load_timeout_s",
                   help="seconds a request waits for its model to load, then 503 (default 120)")
    s.add_argument("--load-retry-cooldown", type=float, dest="load_retry_cooldown_s",
                   help="seconds a failed model load is not retried (default 30)")
    s.add_argument("--catalog", action="append", type=Path, default=[], metavar="FILE",
                   help="extra catalog YAML (repeatable)")
    s.add_argument("--allow-download", action="store_true", default=None,
                   help="fetch missing weights and adapters from the Hugging Face hub")
    s.add_argument("--max-batch-tokens", type=int, help="tokens per batch (default 16384 on CUDA, 2048 on CPU)")
    s.add_argument("--max-batch-items", type=int, help="items per batch (default 1024)")
    s.add_argument("--max-items-per-request", type=int, help="default 1024")
    s.add_argument("--max-body-bytes", type=int, help="default 64 MiB")
    s.add_argument("--max-queued-tokens", type=int, help="per model, then 429 (default 2M)")
    s.add_argument("--adapter-root", action="append", type=Path, dest="adapter_roots",
                   metavar="DIR", help="folder holding LoRA adapters (repeatable)")
    s.add_argument("--adapter-download-allow", action="append", dest="adapter_download_allow",
                   metavar="PATTERN", help="fetch hub adapters whose id matches this glob, e.g. "
                   "'my-org/*', even without --allow-download (repeatable)")
    s.add_argument("--max-adapters", type=int, help="loaded LoRA adapters per model (default 32)")
    s.add_argument("--max-adapter-bytes", type=int,
                   help="memory for loaded adapters per model (default 2 GiB)")
    s.add_argument("--adapter-load-timeout", type=float, dest="adapter_load_timeout_s",
                   help="seconds a request waits for its adapter's first load (default 60)")
    s.add_argument("--api-key", action="append", dest="api_keys", metavar="KEY",
                   help="require this bearer token (repeatable; or SIE_API_KEYS=k1,k2)")
    s.add_argument("--switch-interval-ms", type=float, default=0.5,
                   help="the interpreter's GIL switch interval (default 0.5; Python's own is 5): "
                   "how long the model's compute thread may keep the event loop waiting")
    s.add_argument("--log-level", default="info")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    logs.configure(args.log_level)
    sys.setswitchinterval(args.switch_interval_ms / 1000)
    settings = Settings.from_env(
        host=args.host, port=args.port, device=args.device, dtype=args.dtype,
        models=dict(args.model), default_models=args.default_models,
        catalog_files=args.catalog, allow_download=args.allow_download,
        max_batch_tokens=args.max_batch_tokens, max_batch_items=args.max_batch_items,
        max_items_per_request=args.max_items_per_request, max_body_bytes=args.max_body_bytes,
        max_queued_tokens=args.max_queued_tokens, adapter_roots=args.adapter_roots,
        adapter_download_allow=args.adapter_download_allow,
        max_adapters=args.max_adapters, max_adapter_bytes=args.max_adapter_bytes,
        adapter_load_timeout_s=args.adapter_load_timeout_s,
        api_keys=args.api_keys, pinned_models=args.pinned_models,
        memory_budget_bytes=args.memory_budget_bytes,
        model_load_timeout_s=args.model_load_timeout_s,
        load_retry_cooldown_s=args.load_retry_cooldown_s)
    from .api import create_app
    from .engine import Engine

    app = create_app(Engine(settings))
    # access lines come from our middleware, with the request id
    config = uvicorn.Config(app, host=settings.host, port=settings.port, access_log=False,
                            log_level=args.log_level.lower(), log_config=None,
                            timeout_graceful_shutdown=60)
    GracefulServer(config).run()


if __name__ == "__main__":
    main()
