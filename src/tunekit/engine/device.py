"""Pick the device and the compute precision, read the CPU's instruction sets, and measure peak memory.

TUNEKIT_CPU_FLAGS=avx2,fma (a comma list) replaces the CPU flags read from /proc/cpuinfo (see cpu_flags): tunekit
then chooses precision, packed weights and the bf16 matmul peak as it would on that CPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import resource
import sys
from functools import lru_cache

import torch


def pick_device(name: str = "auto") -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


CPU_FLAGS_ENV = "TUNEKIT_CPU_FLAGS"


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str] | None:
    """The CPU's instruction-set flags, the one place tunekit reads them (every ISA decision asks these).

    From the first `flags` (x86) or `Features` (Arm) line of /proc/cpuinfo; None where that file is missing
    (macOS, Windows). `TUNEKIT_CPU_FLAGS=avx2,fma,sse4_2` (a comma list) replaces what /proc/cpuinfo says, so
    tests and users can see what tunekit chooses on another CPU, e.g. an AVX2-only one, from an AVX-512 machine.
    It changes tunekit's choices only, not the kernels torch or oneDNN pick for the real CPU. Cached: tests that
    set the variable call `cpu_flags.cache_clear()`.
    """
    override = os.environ.get(CPU_FLAGS_ENV)
    if override is not None:
        return frozenset(f.strip().lower() for f in override.split(",") if f.strip())
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        return None
    return None


def cpu_has_bf16() -> bool:
    """True when the CPU has native bf16 dot products (AVX512-BF16 or AMX), where bf16 autocast pays. Elsewhere
    (AVX2-only x86: Zen 2/3, most Intel client chips) bf16 matmuls are emulated: 0.2 GFLOP/s on Zen 3, against
    tens of GFLOP/s in fp32."""
    flags = cpu_flags()
    if flags is None:
        return sys.platform == "darwin" and torch.backends.mps.is_available()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_onednn_bf16() -> tuple[bool, str]:
    """Whether the CPU flags allow oneDNN's bf16 weight layouts (methods/packed_linear.py), and if not, why.

    PyTorch refuses them ("bf16 path needs the cpu support avx_ne_convert or avx512bw, avx512vl and avx512dq")
    elsewhere. Asked of cpu_flags() so that TUNEKIT_CPU_FLAGS simulates the refusal; non-x86 flags (Arm) and
    unknown ones leave the answer to torch's own check.
    """
    flags = cpu_flags()
    if flags is None or not any(f.startswith(("sse", "avx")) for f in flags):
        return True, ""
    if {"avx512bw", "avx512vl", "avx512dq"} <= flags or "avx_ne_convert" in flags:
        return True, ""
    source = f" ({CPU_FLAGS_ENV})" if os.environ.get(CPU_FLAGS_ENV) is not None else ""
    return False, f"this CPU{source} has neither avx512bw+avx512vl+avx512dq nor avx_ne_convert for oneDNN's bf16 path"


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 matmuls natively (not emulated): what precision auto and the matmul peak
    MFU is measured against follow."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_bf16()


_MALLOC_TUNED = False


def keep_freed_memory(force: bool = False) -> bool:
    """Make glibc keep freed tensor memory for reuse instead of returning it to the OS (Linux/glibc only).

    glibc serves allocations above its mmap threshold (at most 32 MiB) with fresh mmap()s and gives them back on
    free, so tensors that big are page-faulted in again (a kernel zero-fill per 4 KiB page) every time. On a
    microbenchmark of 120 MiB logits copies this was 300k minor faults and 0.63 s -> 0 faults and 0.28 s. In the
    LoRA training benchmark it made no measurable difference (385 vs 379 tokens/s, noise): the fused
    cross-entropy leaves no tensor above the threshold. So it is opt-in: TUNEKIT_MALLOC_TUNING=1 (or force=True)
    turns it on for workloads with large tensors. The cost: the process keeps its peak heap. Returns True when
    applied.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return True
    if not (force or os.environ.get("TUNEKIT_MALLOC_TUNING") == "1") or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    # mallopt takes a C int: 2**30 and 2**31 - 1 are the largest useful values (an overflow would silently be 0).
    _MALLOC_TUNED = bool(mallopt(M_MMAP_THRESHOLD, 2**30) and mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    return _MALLOC_TUNED


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision != "auto":
        return precision
    return "bf16" if native_bf16(device) else "fp32"


def precision_reason(requested: str, precision: str, device: torch.device) -> str:
    """Why a run computes in `precision` (resolved from `requested`) on `device`, for the log and the run card."""
    if requested != "auto":
        return f"{precision} as configured (train.precision {requested})"
    if device.type == "cuda":
        return f"{precision}: {'the GPU computes bf16 natively' if precision == 'bf16' else 'no bf16 on this GPU'}"
    if device.type != "cpu":
        return f"{precision} on {device.type}"
    if precision == "bf16":
        return "bf16 autocast: this CPU has native bf16 dot products (avx512_bf16 / amx_bf16)"
    source = f" ({CPU_FLAGS_ENV})" if os.environ.get(CPU_FLAGS_ENV) is not None else ""
    return (f"fp32: this CPU{source} has no native bf16 (no avx512_bf16 / amx_bf16), where a bf16 matmul is emulated "
            "and ~100x slower than fp32; the bf16-only kernels (fused element-wise ops, packed weights) stay off")


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window, so a run's peak excludes what the process did before (e.g. an eval)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    if sys.platform.startswith("linux"):  # hand free heap memory back to the OS, so the new window starts clean
        try:
            ctypes.CDLL(None).malloc_trim(0)
        except (OSError, AttributeError):
            pass
    try:  # Linux: writing 5 to clear_refs resets VmHWM, the peak RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def proc_kib_field(path: str, key: str) -> int | None:
    """A `Key:   N kB` line of a Linux /proc file, in bytes; None when the file or the key is missing."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated GPU memory on CUDA, else the process's peak RSS since the last reset_peak_memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    hwm = proc_kib_field("/proc/self/status", "VmHWM")
    if hwm is not None:
        return hwm
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb * (1 if sys.platform == "darwin" else 1024)


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def isa_label() -> str:
    """What the CPU computes natively, for the tables' headers."""
    return "avx512_bf16" if cpu_has_bf16() else "no native bf16 (fp32)"
