"""Choosing the device and dtype the runtime computes in."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Placement:
    device: torch.device
    dtype: torch.dtype

    @classmethod
    def resolve(cls, device: str = "auto", dtype: str = "auto") -> "Placement":
        """auto: CUDA when available with bf16, else CPU with fp32."""
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda asked for, but torch sees no CUDA device")
        if dtype == "auto":
            dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
        elif dtype in _DTYPES:
            dt = _DTYPES[dtype]
        else:
            raise ValueError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(_DTYPES)}")
        return cls(dev, dt)

    def is_oom(self, exc: BaseException) -> bool:
        return isinstance(exc, torch.OutOfMemoryError)

    def default_batch_tokens(self) -> int:
        return 16384 if self.device.type == "cuda" else 2048

    def default_memory_budget(self) -> int:
        """90% of the GPU's memory on CUDA, half of the RAM on CPU."""
        if self.device.type == "cuda":
            return int(torch.cuda.get_device_properties(self.device).total_memory * 0.9)
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2

    def release_memory(self) -> None:
        """Return cached blocks to the device after an OOM."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
