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
