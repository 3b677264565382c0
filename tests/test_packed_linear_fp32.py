"""fp32 frozen linears with oneDNN-packed weights (the AVX2 path: no bf16 instructions needed): the same values and
input gradients as F.linear to fp32 rounding, the LoRA branch included, and train.packed_weights_fp32 deciding as
it says (on / off / auto by a cached per-machine measurement, only on CPUs without native bf16)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from tunekit.engine.device import cpu_flags
from tunekit.methods import packed_linear as pl
from tunekit.methods.packed_linear import (PackedWeight, available, decide_fp32_packing, pack_frozen_linears_,
                                           packed_linear, packed_of)

pytestmark = pytest.mark.skipif(not available(torch.device("cpu"), torch.float32)[0],
                                reason="this torch has no oneDNN linear ops")


@pytest.fixture
def avx2_only(monkeypatch):
    monkeypatch.setenv("TUNEKIT_CPU_FLAGS", "avx2,fma,sse4_2")
    cpu_flags.cache_clear()
    yield
    cpu_flags.cache_clear()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


@pytest.mark.parametrize("bias", [False, True])
def test_fp32_values_input_gradient_and_branch_match_float64(bias):
    torch.manual_seed(0)
    layer = nn.Linear(96, 160, bias=bias).requires_grad_(False)
    x = torch.randn(2, 37, 96, requires_grad=True)
    branch = torch.randn(2, 37, 160, requires_grad=True)
    y = packed_linear(x, PackedWeight.of(layer.weight), layer.bias, branch=branch)
    gy = torch.randn_like(y)
    y.backward(gy)
    w = layer.weight.double()
    ref = x.detach().double() @ w.t() + (layer.bias.double() if bias else 0) + branch.detach().double()
    assert y.dtype == torch.float32 and x.grad.dtype == torch.float32
    assert relative_error(y, ref) < 1e-6  # fp32 accumulation, no bf16 rounding anywhere
    assert relative_error(x.grad, gy.double() @ w) < 1e-6
    assert torch.equal(branch.grad, gy)


def test_avx2_refuses_bf16_packing_but_not_fp32(avx2_only):
    assert available(torch.device("cpu"), torch.bfloat16)[0] is False
    assert available(torch.device("cpu"), torch.float32) == (True, "")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4)).requires_grad_(False)
    model[1].requires_grad_(True)  # trained: keeps nn.Linear
    x = torch.randn(3, 8)
    before = model(x)
    head = model[2]
    assert pack_frozen_linears_(model, torch.float32, skip=frozenset({id(head.weight)})) == 1
    assert packed_of(model[0]) is not None and packed_of(model[1]) is None and packed_of(head) is None
    assert relative_error(model(x), before) < 1e-6
    assert pack_frozen_linears_(model) == 0  # bf16 packing is refused with a message, nothing packed


def test_decision_modes_and_the_per_machine_cache(avx2_only, tmp_path, monkeypatch):
    shapes = {(16, 8): 2}
    calls = []
    monkeypatch.setattr(pl, "fp32_packing_pays", lambda s: calls.append(s) or (1.4, "x"))
    assert decide_fp32_packing(shapes, "off", tmp_path)[0] is False
    assert decide_fp32_packing(shapes, "on", tmp_path)[0] is True
    pack, why = decide_fp32_packing(shapes, "auto", tmp_path)
    assert pack and "1.40x" in why and calls == [shapes]
    monkeypatch.setattr(pl, "fp32_packing_pays", lambda s: (0.5, "x"))  # a second run reuses the verdict
    assert decide_fp32_packing(shapes, "auto", tmp_path)[0] is True
    (tmp_path / "fp32_packing.json").write_text(json.dumps({}))
    pack, why = decide_fp32_packing(shapes, "auto", tmp_path)
    assert not pack and "0.50x" in why and "not packed" in why


def test_auto_stays_off_where_the_cpu_has_native_bf16(monkeypatch, tmp_path):
    monkeypatch.setenv("TUNEKIT_CPU_FLAGS", "avx2,avx512bw,avx512vl,avx512dq,avx512_bf16")
    cpu_flags.cache_clear()
    try:
        monkeypatch.setattr(pl, "fp32_packing_pays", lambda s: pytest.fail("must not measure"))
        pack, why = decide_fp32_packing({(16, 8): 1}, "auto", tmp_path)
    finally:
        cpu_flags.cache_clear()
    assert not pack and "bf16 natively" in why


def test_measurement_returns_a_ratio_and_says_what_it_measured():
    speedup, note = pl.fp32_packing_pays({(64, 32): 2, (32, 64): 1}, rows=64, rounds=2)
    assert speedup > 0 and "x F.linear" in note


def test_fp32_training_with_packed_weights_follows_the_plain_run(make_config, tmp_path, capsys):
    """Same seed, same batches: losses of a run with fp32 packed frozen weights equal the plain run's to fp32
    rounding (the products are the same sums in another order)."""
    def losses(name, mode):
        cfg = make_config(tmp_path / name, {"train.max_steps": 4, "train.packed_weights_fp32": mode})
        from tunekit.engine import train

        train(cfg)
        rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if "loss" in r]

    plain = losses("plain", "off")
    calls = []
    real = pl.PackedLinearFn.apply
    pl.PackedLinearFn.apply = lambda *a: calls.append(1) or real(*a)
    try:
        packed = losses("packed", "on")
    finally:
        pl.PackedLinearFn.apply = real
    assert calls  # the LoRA layers' frozen base products went through the packed path
    out = capsys.readouterr().out
    assert "frozen linears packed for oneDNN (train.packed_weights_fp32 on)" in out
    assert packed == pytest.approx(plain, rel=1e-4)
