"""methods/lora_kernel.py: the fused LoRA branch computes peft's branch (forward and gradients), draws dropout
masks at the requested rate from torch's seeded generator, and leaves every other case to peft."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tunekit.methods.lora_kernel import (LoraBranch, apply_bits, base_plus_branch, keep_bits, keep_mask, lora_branch,
                                        use_fast_lora_)

pytestmark = pytest.mark.usefixtures("single_thread")


def test_keep_mask_rate_shape_and_seed():
    torch.manual_seed(0)
    keep = keep_mask(torch.Size((1000, 999)), 0.05, torch.device("cpu"))  # odd element count: words are sliced
    assert keep.dtype == torch.bool and keep.shape == (1000, 999)
    dropped = 1 - keep.float().mean().item()
    assert abs(dropped - 0.05) < 0.002  # 999,000 draws: 5 sigma is 0.0011
    torch.manual_seed(0)
    assert torch.equal(keep, keep_mask(torch.Size((1000, 999)), 0.05, torch.device("cpu")))
    assert keep_mask(torch.Size((64, 64)), 0.0, torch.device("cpu")).all()
    # Dropped positions are not clustered per 64-bit word: the four 16-bit lanes of a word are independent
    # (p = 0.5 decides on bit 14 of each lane, the top bit used).
    lanes = (~keep_mask(torch.Size((400_000, 4)), 0.5, torch.device("cpu"))).float()
    corr = torch.corrcoef(lanes.t())
    assert (corr - torch.eye(4)).abs().max() < 0.01


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_apply_bits_equals_where(dtype):
    torch.manual_seed(0)
    bits = keep_bits(torch.Size((37, 11)), 0.3, torch.device("cpu"))
    assert bits.dtype == torch.int16 and set(bits.unique().tolist()) == {-1, 0}
    x = torch.randn(37, 11).to(dtype)
    x[0, 0] = float("inf")
    x[1, 1] = float("nan")
    expected = torch.where(bits != 0, x, 0.0)
    for mask in (bits, bits.to(torch.int8)):  # the branch saves the mask as int8 for backward
        out = apply_bits(x, mask)
        assert out.dtype == dtype
        torch.testing.assert_close(out, expected, equal_nan=True, rtol=0, atol=0)
        assert not torch.signbit(out[bits == 0]).any()  # dropped elements are +0.0


def reference_branch(x, A, B, scaling, keep, p):
    """peft's vanilla branch, lora_B(lora_A(dropout(x))) * scaling, with a given dropout mask."""
    xd = x * keep / (1 - p) if keep is not None else x
    return (xd @ A.t()) @ B.t() * scaling


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_branch_matches_reference_forward_and_gradients(p):
    torch.manual_seed(1)
    x = torch.randn(2, 7, 16, dtype=torch.float64, requires_grad=True)  # (B, T, in)
    A = torch.randn(4, 16, dtype=torch.float64, requires_grad=True)  # (r, in)
    B = torch.randn(12, 4, dtype=torch.float64, requires_grad=True)  # (out, r): nonzero so every gradient is live
    gy = torch.randn(2, 7, 12, dtype=torch.float64)
    torch.manual_seed(2)
    y = lora_branch(x, A, B, 0.5, p)
    grads = torch.autograd.grad(y, (x, A, B), gy)
    torch.manual_seed(2)  # the same draw: the mask the branch used
    keep = keep_mask(x.shape, p, x.device) if p else None
    y_ref = reference_branch(x, A, B, 0.5, keep, p)
    grads_ref = torch.autograd.grad(y_ref, (x, A, B), gy)
    torch.testing.assert_close(y, y_ref)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref)
    if p:
        assert (grads[0] == 0).any()  # dropped inputs get no gradient


def test_branch_gradcheck():
    torch.manual_seed(0)
    args = [torch.randn(5, 6, dtype=torch.float64, requires_grad=True),
            torch.randn(3, 6, dtype=torch.float64, requires_grad=True),
            torch.randn(4, 3, dtype=torch.float64, requires_grad=True)]
    assert torch.autograd.gradcheck(lambda x, A, B: LoraBranch.apply(x, A, B, 2.0, 0.0, torch.float64), args)


def peft_lora(tiny_model_dir, dropout: float, **extra):
    from peft import LoraConfig, get_peft_model

    from tunekit.models import load_model

    torch.manual_seed(0)
    model = get_peft_model(load_model(str(tiny_model_dir)),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["q_proj", "v_proj",
                                                                                               "down_proj"], **extra))
    for name, param in model.named_parameters():
        if "lora_B" in name:  # B = 0 at init would hide the branch: give it values
            nn.init.normal_(param, std=0.1)
    return model


def loss_and_grads(model, ids, autocast: bool):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach().float(), grads


@pytest.mark.parametrize("autocast", [False, True])
def test_fast_forward_matches_peft_on_a_model(tiny_model_dir, prompt_ids, autocast):
    """Same loss and LoRA gradients as peft's forward, fp32 and under bf16 autocast (dropout 0: same mask)."""
    model = peft_lora(tiny_model_dir, dropout=0.0)
    loss_ref, grads_ref = loss_and_grads(model, prompt_ids, autocast)
    assert use_fast_lora_(model) == 2 * 3  # 2 layers x (q_proj, v_proj, down_proj)
    loss, grads = loss_and_grads(model, prompt_ids, autocast)
    tol = dict(rtol=2e-2, atol=2e-3) if autocast else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, loss_ref, **tol)
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], **tol, msg=name)


@pytest.mark.parametrize("bias", [False, True])
def test_base_plus_branch_is_linear_plus_branch(bias):
    """(B, T, in) input, with and without bias: the same values and gradients as F.linear(x) + branch (float64)."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 7, dtype=torch.float64)
    b = torch.randn(3, dtype=torch.float64) if bias else None
    branch = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    out = base_plus_branch(x, w, b, branch)
    ref = nn.functional.linear(x, w, b) + branch
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ref)
    grads = torch.autograd.grad(out, (x, branch), g)
    grads_ref = torch.autograd.grad(ref, (x, branch), g)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_small_branch_survives_bf16_rounding():
    """A branch of ~1/4 of a bf16 step of the base output shifts the bf16 output by its value on average (it is
    added before the rounding); added to the already rounded output it mostly rounds away."""
    torch.manual_seed(0)
    x = torch.randn(4096, 64).bfloat16()
    w = (torch.randn(64, 64) / 8).bfloat16()  # outputs of magnitude ~1: a bf16 step of 2**-7 or 2**-8
    d = 1e-3
    branch = torch.full((4096, 64), d).bfloat16()
    rounded = nn.functional.linear(x, w)  # (4096, 64) bf16
    exact = x.double() @ w.double().t()
    shift = (base_plus_branch(x, w, None, branch).double() - rounded.double()).mean().item()
    shift_after = ((rounded + branch).double() - rounded.double()).mean().item()
    assert shift == pytest.approx(d, rel=0.05)
    assert shift_after < 0.7 * d  # what adding after the rounding keeps (about half here)
    err = (base_plus_branch(x, w, None, branch).double() - (exact + d)).abs().mean()
    err_after = ((rounded + branch).double() - (exact + d)).abs().mean()
    assert err < err_after


def test_dropout_is_on_in_training_and_off_in_eval(tiny_model_dir, prompt_ids):
    model = peft_lora(tiny_model_dir, dropout=0.3)
    use_fast_lora_(model)
    model.eval()
    with torch.no_grad():
        a, b = model(input_ids=prompt_ids).logits, model(input_ids=prompt_ids).logits
    assert torch.equal(a, b)
    model.train()
    with torch.no_grad():
        c = model(input_ids=prompt_ids).logits
    assert not torch.allclose(a, c)


def test_other_cases_go_through_peft(tiny_model_dir, prompt_ids):
    """Disabled or merged adapters, two active adapters and DoRA layers keep peft's own forward."""
    model = peft_lora(tiny_model_dir, dropout=0.0)
    use_fast_lora_(model)
    model.eval()
    with torch.no_grad():
        with model.disable_adapter():
            disabled = model(input_ids=prompt_ids).logits
        adapted = model(input_ids=prompt_ids).logits
        base = model.get_base_model()
        for m in base.modules():
            if hasattr(m, "merge") and hasattr(m, "lora_A"):
                m.merge()
        merged = model(input_ids=prompt_ids).logits  # merged: base layer only, no branch added twice
        for m in base.modules():
            if hasattr(m, "unmerge") and hasattr(m, "lora_A"):
                m.unmerge()
    assert not torch.allclose(disabled, adapted)
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-4)

    dora = peft_lora(tiny_model_dir, dropout=0.0, use_dora=True)
    assert use_fast_lora_(dora) == 6
    with torch.no_grad():
        out = dora(input_ids=prompt_ids).logits
        for m in dora.modules():
            if "forward" in m.__dict__:
                del m.forward
        torch.testing.assert_close(out, dora(input_ids=prompt_ids).logits)


def test_training_run_uses_it_and_can_turn_it_off(make_config, tmp_path):
    """A seeded LoRA run with dropout trains with the fused branch; fused_lora false reproduces peft's path, and
    both lower the loss by about the same amount (different dropout draws, same distribution)."""
    from tunekit.engine import train

    overrides = {"method.name": "lora", "method.r": 4, "method.dropout": 0.1, "train.max_steps": 6,
                 "optim.lr": 2e-2}
    fused = train(make_config(tmp_path / "fused", overrides))
    plain = train(make_config(tmp_path / "plain", {**overrides, "train.fused_lora": False}))
    assert fused.eval_loss_after < fused.eval_loss_before and plain.eval_loss_after < plain.eval_loss_before
    assert abs(fused.eval_loss_after - plain.eval_loss_after) < 0.1 * plain.eval_loss_before
