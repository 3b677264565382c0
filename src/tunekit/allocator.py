"""Which malloc serves the process's tensors on CPU, and starting the training commands under tcmalloc/jemalloc.

Why it matters: with glibc's malloc the peak RSS of a CPU training run keeps growing long after the first steps;
tcmalloc and jemalloc hold it near the first steps' level, and tcmalloc also trains faster. Measured with
`python benchmarks/cpu_allocators.py` (SmolLM2-135M, LoRA r16, batch 8, 2 threads, each run alone on the 2-core
machine), peak RSS after 5 / 20 / 40 steps and tokens/s:
    glibc     5.55 / 7.12 / 7.99 GiB  350 tokens/s   (20-step rerun: 7.18 GiB, 360)
    jemalloc  4.64 / 5.05 / 5.12 GiB  355            (5.06 GiB, 354)
    tcmalloc  4.56 / 5.03 / 5.18 GiB  431            (5.05 GiB, 442)
glibc serves the mixed sizes of per-layer temporaries from heap arenas it can only shrink from the top, and
raises its mmap threshold as big blocks are freed; the other two keep size-classed free lists they reuse.

An allocator can only be chosen before the process starts (it must be loaded first), so the `tunekit train`,
`distill`, `compare` and `demo` commands re-execute themselves once with LD_PRELOAD set. TUNEKIT_MALLOC picks:
`auto` (default: tcmalloc when installed, else jemalloc, else the system's; Debian/Ubuntu packages
libtcmalloc-minimal4 and libjemalloc2; an allocator the user preloaded is kept), `tcmalloc`, `jemalloc` (an error
when not installed) or `system` (leave the process alone). Python users of tunekit.train() start Python with
LD_PRELOAD themselves; the planner plans for the allocator `tunekit train` would use.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ENV = "TUNEKIT_MALLOC"
CHOICES = ("auto", "jemalloc", "tcmalloc", "system")
# Set in the re-executed process: never re-execute twice, whatever happens to LD_PRELOAD.
GUARD = "TUNEKIT_MALLOC_STARTED"
LIBRARIES = {"jemalloc": ("libjemalloc.so.2", "libjemalloc.so"),
             "tcmalloc": ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")}
LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu",
            "/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")
COMMANDS = ("train", "distill", "compare", "demo")
AUTO_ORDER = ("tcmalloc", "jemalloc")  # tcmalloc measured ~1.2x faster than jemalloc at the same peak


class AllocatorError(ValueError):
    pass


def find_library(name: str) -> str | None:
    """Path of allocator `name`'s shared library on this machine, or None."""
    for lib in LIBRARIES[name]:
        for d in LIB_DIRS:
            if (Path(d) / lib).exists():
                return str(Path(d) / lib)
    return None


def in_use() -> str:
    """The allocator loaded in this process: jemalloc, tcmalloc, glibc (Linux without either) or system."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "system"
    for name in LIBRARIES:
        if f"lib{name}" in maps:
            return name
    return "glibc"


def choice() -> str:
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in CHOICES:
        raise AllocatorError(f"{ENV}={value!r}: expected one of {', '.join(CHOICES)}")
    return value


def wanted() -> tuple[str, str] | None:
    """(name, library path) that TUNEKIT_MALLOC asks the training commands to run under, or None for the system's."""
    value = choice()
    if value == "system" or not sys.platform.startswith("linux"):
        return None
    if value == "auto":
        for name in AUTO_ORDER:
            path = find_library(name)
            if path:
                return name, path
        return None
    path = find_library(value)
    if path is None:
        package = {"jemalloc": "libjemalloc2", "tcmalloc": "libtcmalloc-minimal4"}[value]
        raise AllocatorError(f"{ENV}={value}: {' or '.join(LIBRARIES[value])} not found in {', '.join(LIB_DIRS)} "
                             f"(Debian/Ubuntu: apt install {package})")
    return value, path


def planned() -> str:
    """The allocator a training run started from this environment uses (what the memory planner plans for)."""
    current = in_use()
    if current in LIBRARIES or os.environ.get(GUARD):
        return current
    try:
        w = wanted()
    except AllocatorError:
        return current
    return w[0] if w else current


def preload(path: str, env: dict) -> str:
    """LD_PRELOAD with `path` first and whatever `env` already preloads after it."""
    return ":".join(x for x in (path, env.get("LD_PRELOAD", "")) if x)


def reexec_under_allocator(argv: list[str]) -> None:
    """Replace this process by `python -m tunekit.cli *argv` with the wanted allocator preloaded (same PID, so
    Ctrl-C and exit codes behave as before); returns only when nothing needs to change."""
    if not argv or argv[0] not in COMMANDS or os.environ.get(GUARD):
        return
    current = in_use()
    if current in LIBRARIES and choice() == "auto":  # the user preloaded one already: theirs
        return
    w = wanted()
    if w is None or current == w[0]:
        return
    env = dict(os.environ)
    env["LD_PRELOAD"] = preload(w[1], env)
    env[GUARD] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "tunekit.cli", *argv], env)
