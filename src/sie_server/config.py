"""Settings: one typed object filled from CLI flags and environment, passed down whole."""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass
class Settings:
    """Everything the engine and the server can be configured with (defaults in brackets)."""

    host: str = "0.0.0.0"
    port: int = 8080
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bf16 on CUDA / CPUs with native bf16, else fp32) | float32 | ...
    # Models: NAME -> folder or hub id, on top of the catalog. `default_models` are loaded at start.
    models: dict[str, str] = field(default_factory=dict)
    default_models: list[str] | None = None  # None: the catalog's defaults
    catalog_files: list[Path] = field(default_factory=list)
    allow_download: bool = False  # fetch missing weights/adapters from the hub
    pinned_models: list[str] = field(default_factory=list)  # never evicted
    model_load_timeout_s: float = 120.0  # a request waits this long for its model, then 503
    load_retry_cooldown_s: float = 30.0  # after a failed load, requests get its error this long
    memory_budget_bytes: int | None = None  # None: 90% of GPU memory, or half the RAM on CPU
    # Batching: a batch holds at most this many real tokens / items. None: 16384 on CUDA
    # (fills the GPU), 2048 on CPU (measured fastest there: smaller working sets stay in cache).
    max_batch_tokens: int | None = None
    max_batch_items: int = 1024
    # Limits and backpressure.
    max_items_per_request: int = 1024
    max_body_bytes: int = 64 * 1024 * 1024
    max_queued_tokens: int = 2_000_000  # per model: 413 above it, 503 past it (scheduler.py)
    # LoRA adapters. Hub adapters are fetched with allow_download, or when their id matches
    # one of adapter_download_allow's glob patterns (e.g. "my-org/*").
    adapter_roots: list[Path] = field(default_factory=list)
    adapter_download_allow: list[str] = field(default_factory=list)
    max_adapters: int = 32
    max_adapter_bytes: int = 2 * 1024**3
    adapter_load_timeout_s: float = 60.0
    api_keys: list[str] = field(default_factory=list)
    # The models of the protocols that name none (TEI, Cohere v1; api/calls.py): None = the
    # first default model (then any) that embeds / reranks. infinity's routes also under
    # this prefix ("" = at the root only).
    embed_model: str | None = None
    rerank_model: str | None = None
    infinity_prefix: str = ""
    # Connections (see connections.py): request head deadline, idle keep-alive, stalled body,
    # head size and header count (431), open connections.
    header_timeout_s: float = 10.0
    keep_alive_timeout_s: float = 5.0
    body_idle_timeout_s: float = 30.0
    max_header_bytes: int = 32 * 1024
    max_headers: int = 100
    max_connections: int = 4096

    @classmethod
    def from_env(cls, **overrides: object) -> "Settings":
        """Defaults, then SIE_* environment variables, then explicit overrides (CLI flags)."""
        s = cls()
        env = os.environ
        if "SIE_API_KEYS" in env:
            s.api_keys = env["SIE_API_KEYS"].split(",")
            check_api_keys(s.api_keys, "SIE_API_KEYS")
        if "SIE_ADAPTER_ROOTS" in env:
            s.adapter_roots = [Path(p) for p in env["SIE_ADAPTER_ROOTS"].split(os.pathsep) if p]
        if "SIE_ADAPTER_DOWNLOAD_ALLOW" in env:
            s.adapter_download_allow = [p for p in env["SIE_ADAPTER_DOWNLOAD_ALLOW"].split(",") if p]
        if env.get("SIE_ALLOW_DOWNLOAD", "") in ("1", "true", "yes"):
            s.allow_download = True
        if "SIE_MAX_BATCH_TOKENS" in env:
            s.max_batch_tokens = int(env["SIE_MAX_BATCH_TOKENS"])
        for key, value in overrides.items():
            if value is not None:
                setattr(s, key, value)
        check_api_keys(s.api_keys)
        return s

    def may_download_adapter(self, lora_id: str) -> bool:
        """Whether the hub adapter `lora_id` may be fetched from the network."""
        return self.allow_download or any(fnmatch.fnmatchcase(lora_id, pattern)
                                           for pattern in self.adapter_download_allow)


def read_config_file(path: Path) -> dict[str, Any]:
    """A `--config` YAML file: a mapping of serve flag names (without `--`) to values.
    ValueError naming the file when it cannot be read or is not such a mapping."""
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"config file {path}: {exc}") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict) or not all(isinstance(k, str) for k in doc):
        raise ValueError(f"config file {path}: expected a mapping of flag names to values, "
                         "e.g. `port: 8080`")
    return doc
def check_api_keys(keys: list[str], source: str = "--api-key") -> None:
    """Refuse keys that are empty or padded with whitespace (a bearer token is stripped, so
    such a key either matches an empty token or nothing); `SIE_API_KEYS=","` is not 'no keys'."""
    for i, key in enumerate(keys):
        if not key.strip() or key != key.strip():
            what = "empty" if not key.strip() else "padded with whitespace"
            raise ValueError(f"{source}: API key #{i + 1} is {what}; give non-empty keys "
                             "(or none, for no authentication)")
