"""Pick the device and the compute precision, and measure peak memory."""

from __future__ import annotations

import contextlib
import ctypes
import os
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


@lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """True when the CPU has native bf16 dot products (AVX512-BF16 or AMX), where bf16 autocast pays."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return sys.platform == "darwin" and torch.backends.mps.is_available()
    return "avx512_bf16" in flags or "amx_bf16" in flags


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
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "bf16" if cpu_has_bf16() else "fp32"
    return "fp32"


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
