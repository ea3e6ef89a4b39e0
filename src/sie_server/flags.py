"""The flag groups that `serve`, `ray` and `encode` share, and the Settings they fill.
Imported by `cli.py`, `corpus/cli.py` and `ray/cli.py`; imports none of them."""

from __future__ import annotations

import argparse
from pathlib import Path

from .config import Settings


def _model_flag(value: str) -> tuple[str, str]:
    name, sep, source = value.partition("=")
    if not sep or not name or not source:
        raise argparse.ArgumentTypeError("expected NAME=PATH_OR_HUB_ID")
    return name, source


def add_model_flags(p: argparse.ArgumentParser, model_flag: bool = True) -> None:
    """Where models come from and how they run: shared by `serve`, `ray` and `encode` (which
    has its own `--model`)."""
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--dtype", default="auto",
                   help="auto (bf16 on CUDA and on CPUs with native bf16 matmuls, else fp32) | "
                        "float32 | float16 | bfloat16 | int8 (CPU: the transformer's linears in "
                        "int8, weights per channel, activations per token; never chosen by auto)")
    if model_flag:
        p.add_argument("--model", action="append", type=_model_flag, default=[],
                       metavar="NAME=PATH", help="serve NAME from a folder or hub id (repeatable)")
    p.add_argument("--catalog", action="append", type=Path, default=[], metavar="FILE",
                   help="extra catalog YAML (repeatable)")
    p.add_argument("--allow-download", action="store_true", default=None,
                   help="fetch missing weights and adapters from the Hugging Face hub")
    p.add_argument("--adapter-root", action="append", type=Path, dest="adapter_roots",
                   metavar="DIR", help="folder holding LoRA adapters (repeatable)")
    p.add_argument("--max-batch-tokens", type=int,
                   help="tokens per batch (default 16384 on CUDA, 2048 on CPU)")
    p.add_argument("--max-batch-items", type=int, help="items per batch (default 1024)")


def add_engine_flags(s: argparse.ArgumentParser) -> None:
    """The model flags plus the loading, limit, adapter and auth flags of a serving engine:
    shared by `serve` and `ray`."""
    add_model_flags(s)
    s.add_argument("--default-model", action="append", dest="default_models", metavar="NAME",
                   help="load NAME at start (repeatable; default: the catalog's defaults)")
    s.add_argument("--embed-model", metavar="NAME",
                   help="the model of TEI's routes and of infinity/Cohere requests that name "
                        "none (default: the first default model that embeds)")
    s.add_argument("--rerank-model", metavar="NAME",
                   help="the model of TEI's /rerank and /predict and of rerank requests that "
                        "name none (default: the first default cross-encoder, else scorer)")
    s.add_argument("--infinity-prefix", metavar="PREFIX",
                   help="also serve infinity's /embeddings, /rerank, /models under PREFIX "
                        "(infinity's --url-prefix, e.g. /infinity)")
    s.add_argument("--pin", action="append", dest="pinned_models", metavar="NAME",
                   help="never evict NAME (repeatable)")
    s.add_argument("--memory-budget-bytes", type=int,
                   help="memory for loaded models (default: 90%% of GPU memory, or half the RAM)")
    s.add_argument("--model-load-timeout", type=float, dest="model_load_timeout_s",
                   help="seconds a request waits for its model to load, then 503 (default 120)")
    s.add_argument("--load-retry-cooldown", type=float, dest="load_retry_cooldown_s",
                   help="seconds a failed model load is not retried (default 30)")
    s.add_argument("--max-items-per-request", type=int, help="default 1024")
    s.add_argument("--max-body-bytes", type=int, help="default 64 MiB")
    s.add_argument("--max-queued-tokens", type=int,
                   help="tokens queued per model (default 2M): a larger request is a 413, a "
                   "full queue a 503 QUEUE_FULL except for clients under their fair share")
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


def add_connection_flags(s: argparse.ArgumentParser) -> None:
    """The HTTP connection limits of `serve` (connections.py)."""
    s.add_argument("--header-timeout", type=float, dest="header_timeout_s",
                   help="seconds for a request head to arrive, from the connection opening or "
                   "the previous response (default 10); slower connections are closed")
    s.add_argument("--keep-alive-timeout", type=float, dest="keep_alive_timeout_s",
                   help="seconds an idle keep-alive connection stays open (default 5)")
    s.add_argument("--body-idle-timeout", type=float, dest="body_idle_timeout_s",
                   help="seconds a request body may stall before the connection is closed "
                   "(default 30)")
    s.add_argument("--max-header-bytes", type=int,
                   help="request line and headers, in bytes; more is a 431 (default 32768)")
    s.add_argument("--max-headers", type=int, help="headers per request; more is a 431 (default 100)")
    s.add_argument("--max-connections", type=int,
                   help="open connections; new ones past it are closed at once (default 4096)")


def settings_from_args(args: argparse.Namespace, **extra: object) -> Settings:
    """Settings from the flags of `add_engine_flags` (environment below them)."""
    return Settings.from_env(
        device=args.device, dtype=args.dtype,
        models=dict(args.model), default_models=args.default_models,
        catalog_files=args.catalog, allow_download=args.allow_download,
        max_batch_tokens=args.max_batch_tokens, max_batch_items=args.max_batch_items,
        max_items_per_request=args.max_items_per_request, max_body_bytes=args.max_body_bytes,
        max_queued_tokens=args.max_queued_tokens, adapter_roots=args.adapter_roots,
        adapter_download_allow=args.adapter_download_allow,
        max_adapters=args.max_adapters, max_adapter_bytes=args.max_adapter_bytes,
        adapter_load_timeout_s=args.adapter_load_timeout_s,
        api_keys=args.api_keys, pinned_models=args.pinned_models,
        embed_model=args.embed_model, rerank_model=args.rerank_model,
        infinity_prefix=args.infinity_prefix,
        memory_budget_bytes=args.memory_budget_bytes,
        model_load_timeout_s=args.model_load_timeout_s,
        load_retry_cooldown_s=args.load_retry_cooldown_s, **extra)
