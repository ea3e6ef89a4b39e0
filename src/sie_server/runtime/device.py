"""Choosing the device and dtype the runtime computes in.

`--dtype auto` is bf16 on CUDA, and on a CPU whose matmuls run natively in bf16 (x86 AMX-BF16
or AVX512-BF16, Arm BF16, through oneDNN); fp32 on any other CPU, where bf16 matmuls are
emulated and slower than fp32. The CPU check reads what the CPU reports to this process (on
x86 its vector extensions as CPUID gives them, through torch's cpuinfo, which is what oneDNN,
MKL and ATen dispatch on; the rest from /proc/cpuinfo); it never times anything.
`--dtype int8` (CPU only, never chosen by auto) computes the transformer blocks' linears in
int8 (runtime/int8.py) and everything else in float32. The blocks' float32 linears run through
oneDNN with packed weights on x86 CPUs with AVX2, bfloat16 ones where oneDNN runs AVX-512
(`onednn_packs`, runtime/packed.py).
An Engine on CPU also keeps the memory a batch frees for the next (`reuse_freed_memory`).
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .encoder import replace_block_linears

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# CPU feature flags (Linux /proc/cpuinfo names) that give native bf16 matmuls
_BF16_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")


# torch's cpuinfo probes (CPUID) -> the /proc/cpuinfo names they stand for on x86
_CPUID_PROBES = {"_is_avx2_supported": ("avx2",),
                 "_is_avx512_supported": ("avx512f", "avx512bw", "avx512vl", "avx512dq"),
                 "_is_vnni_supported": ("avx512_vnni",),
                 "_is_avx512_bf16_supported": ("avx512_bf16",),
                 "_is_amx_tile_supported": ("amx_tile", "amx_bf16", "amx_int8")}
_PROC_CPUINFO = Path("/proc/cpuinfo")


def cpu_flags(path: Path = _PROC_CPUINFO) -> set[str]:
    """The CPU's feature flags: those /proc/cpuinfo lists (x86 `flags`, Arm `Features`), with
    x86's AVX2 / AVX-512 / VNNI / BF16 / AMX as CPUID reports them to this process (torch's
    cpuinfo). The two differ only where CPUID is masked (scripts/avx2-only); the kernels
    follow CPUID."""
    try:
        text = path.read_text()
    except OSError:
        text = ""
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags = set(value.split())
            break
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    if x86 and path == _PROC_CPUINFO and all(hasattr(torch.cpu, p) for p in _CPUID_PROBES):
        for probe, names in _CPUID_PROBES.items():
            if _torch_cpu_check(probe):
                flags |= set(names)
            else:  # without AVX-512 F/BW/VL/DQ none of its extensions counts
                flags -= {f for f in flags if f in names or
                          (probe == "_is_avx512_supported" and f.startswith("avx512"))}
    return flags


def _onednn_allows(*isas: str) -> tuple[bool, str | None]:
    """(whether oneDNN's ISA cap, ONEDNN_MAX_CPU_ISA or DNNL_MAX_CPU_ISA, admits any of
    `isas` (or is ALL), the cap as set or None)."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    return cap is None or any(k in cap.upper() for k in ("ALL", *isas)), cap


def _torch_cpu_check(name: str) -> bool:
    check = getattr(torch.cpu, name, None)  # private helpers of torch.cpu (cpuinfo library)
    try:
        return bool(check()) if check is not None else False
    except Exception:  # noqa: BLE001 - a missing or failing probe is "no"
        return False


def cpu_bf16_native(flags: set[str] | None = None, machine: str | None = None
                    ) -> tuple[bool, str]:
    """(whether this CPU computes bf16 matmuls natively, why), from its flags (`cpu_flags`, or
    `flags`)."""
    if not torch.backends.mkldnn.is_available():
        return False, "torch is built without oneDNN, so bf16 matmuls are not native"
    allowed, cap = _onednn_allows("BF16", "AMX", "FP16", "AVX10")
    if not allowed:
        return False, f"ONEDNN_MAX_CPU_ISA={cap} keeps oneDNN from its bf16 instructions"
    flags = cpu_flags() if flags is None else flags
    x86 = (machine or platform.machine()).lower() in ("x86_64", "amd64", "i686", "x86")
    found = [f for f in _BF16_FLAGS if f in flags and not (x86 and f == "bf16")]  # Arm's flag
    if found:
        return True, f"the CPU computes bf16 natively ({', '.join(found)})"
    return False, "the CPU has no native bf16 matmul (no AMX-BF16 / AVX512-BF16 / Arm BF16)"


def onednn_packs(dtype: torch.dtype, flags: set[str] | None = None) -> bool:
    """Whether the blocks' `dtype` linears run through oneDNN with packed weights here
    (runtime/packed.py): float32 on an x86 CPU with AVX2 and FMA, bfloat16 with AVX-512 (F, BW,
    VL, DQ), in both cases unless ONEDNN_MAX_CPU_ISA holds oneDNN below them."""
    if not torch.backends.mkldnn.is_available() or dtype not in (torch.float32, torch.bfloat16):
        return False
    flags = cpu_flags() if flags is None else flags
    if dtype == torch.bfloat16:
        needs, isas = {"avx512f", "avx512bw", "avx512vl", "avx512dq"}, ("AVX512", "AMX", "AVX10")
    else:
        needs, isas = {"avx2", "fma"}, ("AVX2", "AVX512", "AMX", "AVX10")
    return needs <= flags and _onednn_allows(*isas)[0]


def amx_bf16(flags: set[str] | None = None) -> bool:
    """Whether oneDNN computes bf16 matmuls on AMX here (the CPU has AMX-BF16 and no
    ONEDNN_MAX_CPU_ISA below it): there they run about as fast as int8 ones."""
    flags = cpu_flags() if flags is None else flags
    return "amx_bf16" in flags and _onednn_allows("AMX")[0] and cpu_bf16_native(flags)[0]


# glibc's mallopt parameters; the largest block served from the heap (glibc's cap on 64-bit)
# and the size of a thread arena's heap (HEAP_MAX_SIZE)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_HEAP_BLOCK_MAX, _ARENA_HEAP = 32 << 20, 64 << 20


def reuse_freed_memory() -> bool:
    """On glibc, keep the memory a CPU forward frees for the next batch, which allocates the
    same sizes again: tensors up to 32 MiB from the heap (not a fresh mapping each), freed heap
    memory kept up to 1 GiB (not trimmed), and a thread arena's emptied heaps kept (a top pad of
    a whole heap; the scheduler's worker allocates in a thread arena). With glibc's defaults
    all-MiniLM-L6-v2 faulted in 0.1-1.2 million pages per pass of 256 passages (0.4-5 GB);
    with these, under 1,000 (`bench.malloc`, README). Returns whether glibc took all three;
    False elsewhere."""
    if platform.libc_ver()[0] != "glibc":
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    return all([mallopt(_M_MMAP_THRESHOLD, _HEAP_BLOCK_MAX), mallopt(_M_TRIM_THRESHOLD, 1 << 30),
                mallopt(_M_TOP_PAD, _ARENA_HEAP)])


@dataclass(frozen=True)
class Placement:
    device: torch.device
    dtype: torch.dtype
    reason: str = ""  # why this dtype (logged at start)
    quantize: str | None = None  # "int8": the blocks' linears in int8, the rest in `dtype`
    packed: bool = False  # the blocks' float linears through oneDNN, weights packed once

    @property
    def dtype_name(self) -> str:
        return self.quantize or str(self.dtype).removeprefix("torch.")

    def place(self, module: nn.Module) -> nn.Module:
        """`module` on this device in this dtype, its blocks' linears quantized or packed."""
        module = module.to(self.device, self.dtype)
        if self.quantize == "int8":
            from .int8 import Int8Linear

            replace_block_linears(module, Int8Linear)
        elif self.packed:
            from .packed import PackedLinear

            replace_block_linears(module, PackedLinear)
        return module

    @classmethod
    def resolve(cls, device: str = "auto", dtype: str = "auto") -> "Placement":
        """auto device: CUDA when available, else CPU. auto dtype: bf16 on CUDA and on CPUs
        with native bf16 matmuls, fp32 on other CPUs. The choice and its reason are logged."""
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dev = torch.device(device)
        if dtype == "int8" and dev.type != "cpu":
            raise ValueError("--dtype int8 is a CPU path (int8 linears through oneDNN); "
                             "on CUDA use bfloat16 or float16")
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda asked for, but torch sees no CUDA device")
        if dtype == "auto":
            if dev.type == "cuda":
                dt, why = torch.bfloat16, "auto on CUDA"
            else:
                native, why = cpu_bf16_native()
                dt = torch.bfloat16 if native else torch.float32
                why = f"auto on CPU: {why}"
        elif dtype in _DTYPES:
            dt, why = _DTYPES[dtype], "asked for with --dtype"
        elif dtype == "int8":
            dt, why = torch.float32, ("asked for with --dtype: int8 linears (weights per output "
                                      "channel, activations per token), the rest float32")
            if amx_bf16():
                log.warning("--dtype int8 on a CPU with AMX-BF16: its bf16 matmuls run as fast as "
                            "int8's, so int8 saves weight memory but runs slower than --dtype "
                            "auto (bf16 here; 0.5-0.8x bf16's speed in the README's runs)")
        else:
            raise ValueError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(_DTYPES)}, "
                             "int8")
        packed = dev.type == "cpu" and dtype != "int8" and onednn_packs(dt)
        if packed:
            why += "; linears through oneDNN, weights packed"
        placement = cls(dev, dt, why, "int8" if dtype == "int8" else None, packed)
        log.info("computing in %s on %s (%s)", placement.dtype_name, dev, why)
        return placement

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
