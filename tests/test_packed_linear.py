"""Frozen bf16 linears with oneDNN-packed weights: same values and input gradients as F.linear (float64 reference
at bf16 tolerance), the LoRA branch added before rounding, stale packs refreshed, and the switch reversible."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tunekit.methods.packed_linear import (PackedWeight, available, pack_frozen_linears_, packed_linear, packed_of,
                                           unpack_frozen_linears_)

pytestmark = pytest.mark.skipif(not available(torch.device("cpu"))[0], reason="no oneDNN bf16 on this CPU")
BF16 = torch.bfloat16


def frozen_linear(n_in: int, n_out: int, bias: bool, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(n_in, n_out, bias=bias).to(BF16)
    layer.requires_grad_(False)
    return layer


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


@pytest.mark.parametrize("bias", [False, True])
def test_values_and_input_gradient_match_float64(bias):
    layer = frozen_linear(96, 160, bias)
    x = torch.randn(2, 37, 96, dtype=BF16, requires_grad=True)  # 3-D, a row count no block size divides
    packed = PackedWeight.of(layer.weight)
    y = packed_linear(x, packed, layer.bias)
    gy = torch.randn_like(y)
    y.backward(gy)
    w = layer.weight.double()
    ref = x.detach().double() @ w.t() + (layer.bias.double() if bias else 0)
    assert y.shape == (2, 37, 160) and y.dtype == BF16
    assert relative_error(y, ref) < 4e-3  # bf16 output rounding (2^-9) on fp32-accumulated products
    assert relative_error(x.grad, gy.double() @ w) < 4e-3
    # ... and what F.linear computes in bf16, to bf16 rounding
    assert relative_error(y, nn.functional.linear(x.detach(), layer.weight, layer.bias)) < 4e-3


def test_fp32_input_under_autocast_gets_an_fp32_gradient():
    layer = frozen_linear(64, 48, bias=False)
    x = torch.randn(10, 64, requires_grad=True)
    with torch.autocast("cpu", torch.bfloat16):
        y = packed_linear(x, PackedWeight.of(layer.weight), None)
        ref = nn.functional.linear(x, layer.weight)
    assert y.dtype == ref.dtype == BF16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32
    assert relative_error(x.grad, torch.ones(10, 48, dtype=torch.float64) @ layer.weight.double()) < 4e-3


def test_branch_is_added_before_rounding():
    """A branch of ~1/4 of a bf16 step of the output shifts the output by its value on average (added before the
    rounding, as lora_kernel.base_plus_branch); added to the rounded output it mostly rounds away."""
    torch.manual_seed(0)
    x = torch.randn(4096, 64, dtype=BF16)
    w = (torch.randn(64, 64) / 8).to(BF16)  # outputs of magnitude ~1: a bf16 step of 2**-7 or 2**-8
    d = 1e-3
    branch = torch.full((4096, 64), d, dtype=BF16)
    rounded = nn.functional.linear(x, w)
    fused = packed_linear(x, PackedWeight.of(w), None, branch=branch)
    assert (fused.double() - rounded.double()).mean().item() == pytest.approx(d, rel=0.05)
    assert ((rounded + branch).double() - rounded.double()).mean().item() < 0.7 * d


def test_branch_gets_the_output_gradient():
    layer = frozen_linear(32, 24, bias=True)
    x = torch.randn(5, 32, dtype=BF16, requires_grad=True)
    branch = torch.randn(5, 24, dtype=BF16, requires_grad=True)
    y = packed_linear(x, PackedWeight.of(layer.weight), layer.bias, branch=branch)
    gy = torch.randn_like(y)
    y.backward(gy)
    assert torch.equal(branch.grad, gy)


def test_pack_switches_frozen_bf16_linears_only_and_is_reversible():
    model = nn.Sequential(frozen_linear(16, 16, True), nn.Linear(16, 16).to(BF16), nn.Linear(16, 16))
    model[2].requires_grad_(False)  # frozen but fp32: not packed
    x = torch.randn(4, 16, dtype=BF16)
    before = model[0](x)
    assert pack_frozen_linears_(model) == 1
    assert packed_of(model[0]) is not None and packed_of(model[1]) is None and packed_of(model[2]) is None
    assert relative_error(model[0](x), before) < 4e-3
    assert unpack_frozen_linears_(model) == 1
    assert packed_of(model[0]) is None and "forward" not in model[0].__dict__
    assert torch.equal(model[0](x), before)


def test_an_in_place_change_of_the_weight_repacks():
    layer = frozen_linear(16, 8, bias=False)
    pack_frozen_linears_(layer)
    x = torch.randn(3, 16, dtype=BF16)
    with torch.no_grad():
        layer.weight.mul_(2)  # e.g. a merge or a reload into the same tensor
    assert relative_error(layer(x), x.double() @ layer.weight.double().t()) < 4e-3


def test_fp32_input_without_autocast_keeps_nn_linear_behaviour():
    layer = frozen_linear(8, 8, bias=False)
    pack_frozen_linears_(layer)
    with pytest.raises(RuntimeError):  # as nn.Linear: fp32 input, bf16 weight, no autocast
        layer(torch.randn(2, 8))
