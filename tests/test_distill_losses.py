"""The chunked distillation loss against a plain full-logits reference (values and gradients)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tunekit.distill.losses import KDSpec, divergence, kd_loss_sum


def reference_divergence(s_logits, t_logits, kind, beta):
    """Textbook formulas on probabilities (float64), no log-space tricks."""
    s, t = s_logits.double().softmax(-1), t_logits.double().softmax(-1)
    if kind == "forward_kl":
        return (t * (t.log() - s.log())).sum(-1)
    if kind == "reverse_kl":
        return (s * (s.log() - t.log())).sum(-1)
    m = beta * t + (1 - beta) * s
    return beta * (t * (t.log() - m.log())).sum(-1) + (1 - beta) * (s * (s.log() - m.log())).sum(-1)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_divergence_matches_textbook_formula(kind):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 11, generator=g), torch.randn(5, 11, generator=g)
    got = divergence(s, t, kind, beta=0.3)
    torch.testing.assert_close(got.double(), reference_divergence(s, t, kind, 0.3), rtol=1e-5, atol=1e-6)
    assert (got >= -1e-6).all()
    assert divergence(s, s, kind, beta=0.3).abs().max() < 1e-5  # zero when the distributions agree


def test_jsd_limits_are_forward_and_reverse_kl_scaled():
    # JSD(beta) / beta -> forward KL as beta -> 0 (GKD paper's remark): check the small-beta limit numerically.
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(3, 7, generator=g, dtype=torch.float64), torch.randn(3, 7, generator=g, dtype=torch.float64)
    beta = 1e-4
    torch.testing.assert_close(divergence(s, t, "jsd", beta) / beta, divergence(s, t, "forward_kl"),
                               rtol=2e-3, atol=1e-6)


def reference_loss(hs, w_s, ht, w_t, targets, spec):
    s_logits, t_logits = hs @ w_s.t(), ht @ w_t.t()  # (N, V) all at once
    T = spec.temperature
    if spec.sampled:
        rows = torch.arange(len(targets))
        s_lp = s_logits.log_softmax(-1)[rows, targets]
        t_lp = t_logits.log_softmax(-1)[rows, targets]
        return ((s_lp - t_lp).detach() * s_lp).sum(), (s_lp - t_lp).sum()
    kd = (divergence(s_logits / T, t_logits / T, spec.divergence, spec.beta) * T * T).sum() * spec.kd_scale
    loss = (1 - spec.alpha) * kd + spec.alpha * F.cross_entropy(s_logits, targets, reduction="sum",
                                                                ignore_index=-100)
    return loss, loss


@pytest.mark.parametrize("spec", [KDSpec("forward_kl", alpha=0.5, temperature=2.0),
                                  KDSpec("reverse_kl", alpha=0.0, temperature=1.0),
                                  KDSpec("jsd", alpha=0.3, temperature=1.5, beta=0.7),
                                  KDSpec("reverse_kl", alpha=0.0, sampled=True),
                                  KDSpec("forward_kl", alpha=0.4, kd_scale=0.3)], ids=lambda s: repr(s)[6:40])
@pytest.mark.parametrize("train_head", [False, True])
def test_chunked_loss_matches_full_logits(spec, train_head):
    g = torch.Generator().manual_seed(2)
    N, H, Ht, V = 37, 8, 12, 50
    hs = torch.randn(N, H, generator=g, dtype=torch.float64, requires_grad=True)
    ht = torch.randn(N, Ht, generator=g, dtype=torch.float64)
    s_head, t_head = nn.Linear(H, V, bias=False).double(), nn.Linear(Ht, V + 3, bias=False).double()  # teacher V padded
    s_head.weight.requires_grad_(train_head)
    targets = torch.randint(0, V, (N,), generator=g)
    if spec.kd_scale != 1.0:  # kd_on=all: prompt positions carry KD but no label
        targets[::3] = -100

    value, parts = kd_loss_sum(hs, s_head, ht, t_head, targets, spec, chunk_rows=10)
    value.backward()
    got_h, got_w = hs.grad.clone(), None if not train_head else s_head.weight.grad.clone()

    hs.grad = None
    s_head.weight.grad = None
    objective, ref_value = reference_loss(hs, s_head.weight, ht, t_head.weight[:V], targets, spec)
    objective.backward()
    torch.testing.assert_close(value.double(), ref_value.detach(), rtol=1e-5, atol=1e-5)  # logits are fp32 inside
    torch.testing.assert_close(got_h, hs.grad, rtol=1e-4, atol=1e-6)
    if train_head:
        torch.testing.assert_close(got_w, s_head.weight.grad, rtol=1e-4, atol=1e-6)
    assert math.isfinite(parts["kd"])
    assert ("ce" in parts) == (spec.alpha > 0 and not spec.sampled)


def test_student_equal_to_teacher_has_zero_kd():
    g = torch.Generator().manual_seed(3)
    h = torch.randn(9, 6, generator=g, requires_grad=True)
    head = nn.Linear(6, 20, bias=False)
    _, parts = kd_loss_sum(h, head, h.detach(), head, torch.zeros(9, dtype=torch.long), KDSpec(alpha=0.0))
    assert abs(parts["kd"]) < 1e-5
