"""Distillation losses over the vocabulary, computed chunk by chunk through the LM heads.

Teacher and student logits are (N, V) for the N label positions of a batch; with V = 49k and N in the
thousands that is hundreds of MiB per model in fp32, and the autograd graph of a divergence keeps several such
tensors. So the heads are applied to `chunk_rows` hidden states at a time (N, H) -> (n, V), the per-token loss
of the chunk and its gradient with respect to the student's logits are computed right away, and only
d/d(student hidden) (N, H) (and d/d(head weight) when the student's head trains) is kept for the backward
pass, the same scheme as engine/loss.py uses for cross-entropy.

Divergences, per token, between the teacher's distribution t and the student's s (both at temperature T):
    forward_kl   KL(t || s) = sum_v t_v (log t_v - log s_v)       mode covering (Hinton et al. 2015)
    reverse_kl   KL(s || t) = sum_v s_v (log s_v - log t_v)       mode seeking (MiniLLM, GKD)
    jsd          beta KL(t || m) + (1 - beta) KL(s || m),  m = beta t + (1 - beta) s   (Agarwal et al. 2023)
The KD term is multiplied by T^2 so its gradient keeps its size as T grows (Hinton et al. 2015).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..engine.batching import IGNORE
from ..engine.loss import cached_weight_cast

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


def divergence(s_logits: torch.Tensor, t_logits: torch.Tensor, kind: str, beta: float = 0.5) -> torch.Tensor:
    """Per-row divergence between softmax(t_logits) and softmax(s_logits): (n, V), (n, V) -> (n,)."""
    s_logp = F.log_softmax(s_logits, -1)
    t_logp = F.log_softmax(t_logits, -1)
    if kind == "forward_kl":
        return (t_logp.exp() * (t_logp - s_logp)).sum(-1)
    if kind == "reverse_kl":
        return (s_logp.exp() * (s_logp - t_logp)).sum(-1)
    if kind == "jsd":
        # log m = log(beta t + (1 - beta) s), stable in log space
        m_logp = torch.logsumexp(torch.stack([t_logp + math.log(beta), s_logp + math.log(1 - beta)]), 0)
        return (beta * (t_logp.exp() * (t_logp - m_logp)).sum(-1)
                + (1 - beta) * (s_logp.exp() * (s_logp - m_logp)).sum(-1))
    raise ValueError(f"unknown divergence {kind!r}; choose one of {', '.join(DIVERGENCES)}")


@dataclass(frozen=True)
class KDSpec:
    """What to compute on each position.

    loss = alpha * CE(student, target) + (1 - alpha) * T^2 * D(teacher_T || student_T)   ("full")
    where the CE term counts only positions with a target (!= IGNORE): with distill.kd_on=all the KD term also
    covers the prompt tokens, whose target is IGNORE.
    or, with sampled=True (on-policy, tokens drawn from the student): the per-token reverse KL estimate
    log s(x) - log t(x) of the sampled token x, whose gradient is the policy gradient sg(log s(x) - log t(x)) *
    d log s(x) (the expectation of d log s(x) itself is zero, so it is left out).
    """

    divergence: str = "forward_kl"
    alpha: float = 0.5
    temperature: float = 1.0
    beta: float = 0.5
    sampled: bool = False
    kd_scale: float = 1.0  # multiplies the KD sum (kd_on=all: labelled / distilled positions of the batch)


def chunk_objective(s_logits: torch.Tensor, t_logits: torch.Tensor, targets: torch.Tensor, spec: KDSpec):
    """(objective to differentiate, {part: value}) summed over the rows of one chunk; logits (n, V) fp32."""
    if spec.sampled:
        rows = torch.arange(len(targets), device=targets.device)
        s_lp = F.log_softmax(s_logits, -1)[rows, targets]  # (n,) log s(x)
        t_lp = F.log_softmax(t_logits, -1)[rows, targets]  # (n,) log t(x)
        rkl = (s_lp - t_lp).detach()
        return (rkl * s_lp).sum(), {"kd": rkl.sum()}
    T = spec.temperature
    kd = divergence(s_logits / T, t_logits / T, spec.divergence, spec.beta).sum() * (T * T * spec.kd_scale)
    parts = {"kd": kd.detach()}
    objective = (1 - spec.alpha) * kd
    if spec.alpha > 0:
        ce = F.cross_entropy(s_logits, targets, ignore_index=IGNORE, reduction="sum")
        parts["ce"] = ce.detach()
        objective = objective + spec.alpha * ce
    return objective, parts


def kd_loss_sum(s_hidden: torch.Tensor, s_head: torch.nn.Module, t_hidden: torch.Tensor, t_head: torch.nn.Module,
                targets: torch.Tensor, spec: KDSpec, chunk_rows: int | None = None,
                ) -> tuple[torch.Tensor, dict[str, float]]:
    """Distillation loss summed over N positions, and its parts (ce, kd sums) for logging.

    s_hidden (N, H) student hidden states (with grad), t_hidden (N, H_t) teacher hidden states (no grad),
    targets (N,) the token each position predicts (gold label, or the student's sample on-policy; IGNORE at
    positions distilled without a label, which the CE term skips; the sampled estimator needs a target everywhere). Both heads
    must be plain linear layers over the same vocabulary (the tokenizer check in distill/teacher.py ensures it);
    a head padded to a larger V is cut to the smaller one.

    The returned tensor's value is the reported loss (for `sampled`, the reverse-KL estimate); its gradient is
    that of the objective described in KDSpec.
    """
    device_type = s_hidden.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else s_hidden.dtype
    v = min(s_head.weight.shape[0], t_head.weight.shape[0])
    chunk_rows = chunk_rows or max(16, 2**22 // v)  # ~16 MiB of fp32 logits per model per chunk
    w_t = cached_weight_cast(t_head.weight, dtype)[:v]
    b_t = None if t_head.bias is None else t_head.bias[:v].to(dtype)
    parts: dict[str, float] = {}  # filled by the forward pass
    value = _KDHead.apply(s_hidden, s_head.weight, s_head.bias, t_hidden, w_t, b_t, targets, spec, chunk_rows, v,
                          dtype, parts)
    return value, parts


class _KDHead(torch.autograd.Function):
    """Forward computes value and gradients chunk by chunk; backward only scales them."""

    @staticmethod
    def forward(ctx, s_hidden, weight, bias, t_hidden, w_t, b_t, targets, spec, chunk_rows, v, dtype, parts):
        need_h = s_hidden.requires_grad
        need_w = weight.requires_grad
        need_b = bias is not None and bias.requires_grad
        w_s = cached_weight_cast(weight, dtype)[:v]
        b_s = None if bias is None else bias[:v].to(dtype)
        grad_h = torch.zeros(s_hidden.shape, dtype=s_hidden.dtype, device=s_hidden.device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        value = s_hidden.new_zeros((), dtype=torch.float32)
        sums: dict[str, torch.Tensor] = {}
        start = 0
        with torch.autocast(s_hidden.device.type, enabled=False):
            for hs, ht, tg in zip(s_hidden.split(chunk_rows), t_hidden.split(chunk_rows), targets.split(chunk_rows)):
                n = len(tg)
                hs = hs.to(dtype)  # (n, H)
                t_logits = F.linear(ht.to(dtype), w_t, b_t).float()  # (n, V) teacher, no grad
                s_logits = F.linear(hs, w_s, b_s).float().requires_grad_()  # (n, V) student: a leaf of its own
                with torch.enable_grad():
                    objective, chunk_parts = chunk_objective(s_logits, t_logits, tg, spec)
                    (g,) = torch.autograd.grad(objective, s_logits)  # (n, V) d objective / d student logits
                for k, x in chunk_parts.items():
                    sums[k] = sums.get(k, 0.0) + x
                value += _reported(objective.detach(), chunk_parts, spec)
                g = g.to(dtype)
                if need_h:
                    grad_h[start : start + n] = g @ w_s  # (n, H)
                if need_w:
                    grad_w[:v] += (g.t() @ hs).float()  # (V, H), fp32 accumulation
                if need_b:
                    grad_b[:v] += g.float().sum(0)
                start += n
        parts.update({k: float(x) for k, x in sums.items()})
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (s_hidden.dtype, weight.dtype)
        return value

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        gh = None if grad_h is None else grad_h * grad_out.to(h_dtype)
        gw = None if grad_w is None else (grad_w * grad_out).to(w_dtype)
        gb = None if grad_b is None else (grad_b * grad_out).to(w_dtype)
        return gh, gw, gb, None, None, None, None, None, None, None, None, None


def _reported(objective: torch.Tensor, parts: dict[str, torch.Tensor], spec: KDSpec) -> torch.Tensor:
    """The loss value to log: the objective itself, except for the sampled estimator whose surrogate objective
    (sg(rkl) * log s) is not the reverse KL."""
    return parts["kd"] if spec.sampled else objective
