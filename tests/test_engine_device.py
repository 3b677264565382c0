"""Device helpers: precision resolution and the peak-memory window of a run."""

import sys

import pytest
import torch

from tunekit.engine.device import peak_memory_bytes, reset_peak_memory, resolve_precision

CPU = torch.device("cpu")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS reset uses /proc")
def test_reset_peak_memory_starts_a_new_window():
    block = torch.ones(64 * 2**20, dtype=torch.uint8)  # 64 MiB, touched
    block += 1
    before = peak_memory_bytes(CPU)
    del block
    reset_peak_memory(CPU)
    after = peak_memory_bytes(CPU)
    assert after < before - 32 * 2**20  # the 64 MiB that was freed no longer counts


def test_explicit_precision_is_kept_and_auto_resolves():
    assert resolve_precision("fp32", CPU) == "fp32"
    assert resolve_precision("bf16", CPU) == "bf16"
    assert resolve_precision("auto", CPU) in ("bf16", "fp32")


def test_keep_freed_memory_stops_page_faults_for_large_tensors():
    """After tuning, a 64 MiB tensor freed and allocated again reuses the heap: no new page faults."""
    import subprocess
    import sys

    code = (
        "import resource, torch\n"
        "from tunekit.engine.device import keep_freed_memory\n"
        "assert keep_freed_memory(force=True)\n"
        "for _ in range(4):\n"
        "    torch.empty(2**24).fill_(1.0)\n"  # first touch of the heap pages (steady state from then on)
        "r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "for _ in range(5):\n"
        "    torch.empty(2**24).fill_(1.0)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    faults = int(out.stdout.strip().splitlines()[-1])
    # Without tuning each 64 MiB allocation is a fresh mmap: ~16k faults each, ~80k in all.
    assert faults < 2000, faults
