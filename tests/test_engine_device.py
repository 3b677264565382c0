"""Device helpers: CPU flags (and their TUNEKIT_CPU_FLAGS override), precision resolution, the peak-memory window
of a run; what an AVX2-only CPU gets (fp32, no packed weights, a plan that follows), simulated on any machine."""

import sys

import pytest
import torch

from tunekit.engine.device import (cpu_flags, cpu_has_bf16, cpu_onednn_bf16, native_bf16, peak_memory_bytes,
                                   reset_peak_memory, resolve_precision)

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


def test_cpu_flags_override_replaces_proc_cpuinfo(monkeypatch):
    monkeypatch.setenv("TUNEKIT_CPU_FLAGS", " AVX2, fma,,avx512_bf16 ")
    cpu_flags.cache_clear()
    try:
        assert cpu_flags() == {"avx2", "fma", "avx512_bf16"}
        assert cpu_has_bf16()  # native bf16 is avx512_bf16 (or amx_bf16) ...
        assert not cpu_onednn_bf16()[0]  # ... but oneDNN's bf16 layouts need avx512bw/vl/dq or avx_ne_convert
        monkeypatch.setenv("TUNEKIT_CPU_FLAGS", "avx512bw,avx512vl,avx512dq")
        cpu_flags.cache_clear()
        assert not cpu_has_bf16() and cpu_onednn_bf16() == (True, "")
    finally:
        monkeypatch.undo()
        cpu_flags.cache_clear()


def test_a_simulated_avx2_cpu_gets_fp32_and_no_packed_weights(simulated_avx2_cpu, capsys):
    import torch.nn.functional as F
    from torch import nn

    from tunekit.engine.flops import peak_dtype
    from tunekit.methods.packed_linear import available, pack_frozen_linears_

    assert not cpu_has_bf16() and not native_bf16(CPU)
    assert resolve_precision("auto", CPU) == "fp32"
    assert peak_dtype("bf16", CPU) == torch.float32  # an emulated bf16 product is no peak to measure MFU against
    ok, why = available(CPU)
    assert not ok and "avx512bw" in why and "TUNEKIT_CPU_FLAGS" in why
    model = nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 4)).to(torch.bfloat16).requires_grad_(False)
    assert pack_frozen_linears_(model) == 0  # no oneDNN reorder attempted, so nothing raises
    log = capsys.readouterr().out
    assert log.count("frozen linears not packed for oneDNN") == 1 and "avx512bw" in log
    assert "forward" not in model[0].__dict__  # nn.Linear's own forward
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    assert torch.equal(model(x), F.linear(F.linear(x, model[0].weight, model[0].bias), model[1].weight,
                                          model[1].bias))


def test_the_plan_follows_a_simulated_avx2_cpu(simulated_avx2_cpu, tiny_model_dir):
    from tunekit.planner import plan

    kw = dict(method="lora", rank=4, seq_len=32, batch=2, device="cpu")
    auto = plan(str(tiny_model_dir), precision="auto", **kw)
    fp32 = plan(str(tiny_model_dir), precision="fp32", **kw)
    assert auto.precision == "fp32" and auto.total == fp32.total  # what `tunekit train` resolves here
    assert any("precision auto: fp32" in n and "avx512_bf16" in n for n in auto.notes)
    bf16 = plan(str(tiny_model_dir), precision="bf16", packed_weights=True, **kw)  # asked for explicitly
    unpacked = plan(str(tiny_model_dir), precision="bf16", packed_weights=False, **kw)
    assert bf16.weights == unpacked.weights  # no packed copies: the loop would not make them
    assert any("packed_weights: not used here" in n for n in bf16.notes)


def test_training_on_a_simulated_avx2_cpu(simulated_avx2_cpu, make_config, tmp_path, capsys):
    """auto trains in fp32; bf16 asked for runs without packed weights, says why, and plans what it runs."""
    from tunekit.engine import train

    lora = {"method.name": "lora", "method.r": 4, "train.max_steps": 1, "train.fused_ops": "off"}
    auto = train(make_config(tmp_path / "auto", {**lora, "train.precision": "auto"}))
    assert auto.precision == "fp32"
    capsys.readouterr()
    bf16 = train(make_config(tmp_path / "bf16", {**lora, "train.precision": "bf16"}))
    log = capsys.readouterr().out
    assert bf16.precision == "bf16" and "frozen linears not packed for oneDNN" in log
    assert "frozen linears packed for oneDNN" not in log
    unpacked = train(make_config(tmp_path / "unpacked", {**lora, "train.precision": "bf16",
                                                         "train.packed_weights": False}))
    assert bf16.planned_peak_bytes == unpacked.planned_peak_bytes  # the plan counts no packed copies
