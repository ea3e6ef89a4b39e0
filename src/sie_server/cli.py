"""`sie-server serve`: the command line, filling Settings and starting the HTTP server."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import ipaddress
import logging
import signal
import sys
from pathlib import Path
from typing import Any, Iterator

import uvicorn

from . import __version__, logs
from .config import Settings, read_config_file
from .connections import ConnectionLimits, limited_protocol

log = logging.getLogger("sie_server.cli")


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
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve the HTTP API")
    s.add_argument("--config", type=Path, metavar="FILE",
                   help="YAML file of serve flags (names without --); flags and SIE_* "
                   "variables override it")
    s.add_argument("--host", default="0.0.0.0")
    s.add_argument("--port", type=int, default=8080)
    add_engine_flags(s)
    add_connection_flags(s)
    s.add_argument("--switch-interval-ms", type=float, default=0.5,
                   help="the interpreter's GIL switch interval (default 0.5; Python's own is 5): "
                   "how long the model's compute thread may keep the event loop waiting")
    s.add_argument("--log-level", default="info")
    from .corpus.cli import add_parser as add_encode_parser
    from .ray.cli import add_parser as add_ray_parser  # imports no ray until it runs

    add_encode_parser(sub)
    add_ray_parser(sub)
    return p


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


def _subparser(p: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    action = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[name]


def _given_flags(argv: list[str] | None) -> set[str]:
    """Destinations of the serve flags present on the command line."""
    p = parser()
    serve = _subparser(p, "serve")
    serve.set_defaults(**{a.dest: None for a in serve._actions if a.dest != "help"})
    return {k for k, v in vars(p.parse_args(argv)).items() if v is not None}


def _env_fields() -> set[str]:
    """Settings fields that SIE_* environment variables set."""
    base, env = Settings(), Settings.from_env()
    return {f.name for f in dataclasses.fields(Settings)
            if getattr(base, f.name) != getattr(env, f.name)}


def _config_value(serve: argparse.ArgumentParser, action: argparse.Action, key: str,
                  value: Any) -> Any:
    """A config file value as the flag would have parsed it."""
    def one(v: Any) -> Any:
        if isinstance(v, (bool, dict, list)) or v is None:
            serve.error(f"config key {key!r}: {v!r} is not a single value")
        try:
            out = action.type(str(v)) if action.type else str(v)
        except (argparse.ArgumentTypeError, ValueError) as exc:
            serve.error(f"config key {key!r}: {v!r}: {exc}")
        if action.choices is not None and out not in action.choices:
            serve.error(f"config key {key!r}: {v!r} is not one of {list(action.choices)}")
        return out

    if action.nargs == 0:  # a switch such as --allow-download
        if not isinstance(value, bool):
            serve.error(f"config key {key!r} must be true or false")
        return action.const if value else None
    if isinstance(action, argparse._AppendAction):
        if isinstance(value, dict):  # model: {NAME: PATH, ...}
            value = [f"{k}={v}" for k, v in value.items()]
        return [one(v) for v in (value if isinstance(value, list) else [value])]
    return one(value)


def apply_config_file(args: argparse.Namespace, argv: list[str] | None) -> argparse.Namespace:
    """Fill the serve flags from `--config FILE`: its keys are the flag names without `--`
    (`max-batch-tokens` or `max_batch_tokens`), list flags take lists, `model` also a mapping,
    null means the default. Precedence: defaults < the file < SIE_* variables < flags."""
    if getattr(args, "config", None) is None:
        return args
    serve = _subparser(parser(), "serve")
    try:
        values = read_config_file(args.config)
    except ValueError as exc:
        serve.error(str(exc))
    by_key = {o[2:].replace("-", "_"): a for a in serve._actions for o in a.option_strings
              if o.startswith("--") and a.dest not in ("help", "config")}
    given, from_env = _given_flags(argv), _env_fields()
    for key, value in values.items():
        action = by_key.get(key.replace("-", "_"))
        if action is None:
            known = ", ".join(sorted(k.replace("_", "-") for k in by_key))
            serve.error(f"config file {args.config}: unknown key {key!r}; the keys are the "
                        f"serve flags without --: {known}")
        if value is not None and action.dest not in given and action.dest not in from_env:
            setattr(args, action.dest, _config_value(serve, action, key, value))
    return args


def announce(settings: Settings) -> None:
    """Log where the server listens and whether it checks API keys; warn when it is open to
    other machines without a key."""
    host = settings.host
    try:
        ip = ipaddress.ip_address(host)
        loopback, everywhere = ip.is_loopback, ip.is_unspecified
    except ValueError:  # a host name
        loopback, everywhere = host == "localhost", False
    where = f"{host}:{settings.port}" + (" (every network interface)" if everywhere else "")
    keys = len(settings.api_keys)
    auth = f"on ({keys} API key{'s' if keys > 1 else ''})" if keys else "off (no --api-key)"
    log.info("listening on %s; auth %s", where, auth)
    if not keys and not loopback:
        log.warning("no API key is set and %s is reachable from other machines: anyone who "
                    "can reach port %d can use this server. Pass --api-key KEY (or "
                    "SIE_API_KEYS=k1,k2), or --host 127.0.0.1 to serve this machine only",
                    host, settings.port)


def main(argv: list[str] | None = None) -> None:
    cli = parser()
    args = cli.parse_args(argv)
    if args.command == "ray":
        from .ray.cli import run

        return run(args)
    if args.command == "encode":
        from .corpus.cli import main as encode

        sys.exit(encode(args))
    args = apply_config_file(args, argv)
    logs.configure(args.log_level)
    sys.setswitchinterval(args.switch_interval_ms / 1000)
    try:
        settings = settings_from_args(
            args, host=args.host, port=args.port, header_timeout_s=args.header_timeout_s,
            keep_alive_timeout_s=args.keep_alive_timeout_s,
            body_idle_timeout_s=args.body_idle_timeout_s, max_header_bytes=args.max_header_bytes,
            max_headers=args.max_headers, max_connections=args.max_connections)
    except ValueError as err:
        cli.error(str(err))  # exits 2 with the message and the usage line
    announce(settings)
    from .api import create_app
    from .engine import Engine

    app = create_app(Engine(settings))
    # access lines come from our middleware, with the request id
    limits = ConnectionLimits(settings.header_timeout_s, settings.keep_alive_timeout_s,
                              settings.body_idle_timeout_s, settings.max_header_bytes,
                              settings.max_headers, settings.max_connections)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, access_log=False,
                            log_level=args.log_level.lower(), log_config=None,
                            timeout_graceful_shutdown=60, http=limited_protocol(limits),
                            timeout_keep_alive=limits.keep_alive_timeout_s)
    GracefulServer(config).run()


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
        memory_budget_bytes=args.memory_budget_bytes,
        model_load_timeout_s=args.model_load_timeout_s,
        load_retry_cooldown_s=args.load_retry_cooldown_s, **extra)


if __name__ == "__main__":
    main()
