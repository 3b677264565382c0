"""Cross-entropy computed only where there are targets, summed so accumulation can weight by tokens.

Projecting every position through the LM head builds a (B, T, V) tensor although only the completion
positions carry a loss (about a quarter of them in instruction data); we gather the (N, H) hidden states
with targets first and project only those.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

IGNORE = -100


def label_only_loss_sum(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum of token losses and token count. hidden (B, T, H), targets (B, T) -> (scalar, N)."""
    keep = targets != IGNORE  # (B, T)
    h = hidden[keep]  # (N, H)
    if type(head) is nn.Linear:
        loss_sum = linear_cross_entropy_sum(h, head.weight, head.bias, targets[keep])
    else:  # a head some method replaced: project, then the usual cross-entropy
        logits = head(h).float()  # (N, V): upcast so the softmax is taken in fp32 even under bf16 autocast
        loss_sum = F.cross_entropy(logits, targets[keep], reduction="sum")
    return loss_sum, int(keep.sum())


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                             targets: torch.Tensor, chunk_rows: int | None = None) -> torch.Tensor:
    """sum_i CE(hidden_i @ weight^T + bias, targets_i), never holding the (N, V) logits of all rows at once.

    hidden (N, H), weight (V, H), targets (N,). Logits are made chunk by chunk in the compute dtype (bf16 under
    autocast, as a plain linear layer would), softmax/logsumexp in fp32. When gradients are needed, each chunk's
    gradient (softmax - onehot) is turned into d/dhidden (and d/dweight if the head trains) right away, so the
    backward pass only scales stored (N, H) results: no (N, V) fp32 copy, log-softmax backward or one-hot fill.
    The softmax is one pass from the compute-dtype logits to fp32 probabilities, and each row's loss is -log of its
    target's probability (target_losses), instead of an fp32 copy, a logsumexp and an in-place exp.
    """
    device_type = hidden.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
    chunk_rows = chunk_rows or max(32, 2**23 // weight.shape[0])  # ~32 MiB of fp32 logits per chunk
    w = cached_weight_cast(weight, dtype)
    b = None if bias is None else bias.to(dtype)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return _LinearCrossEntropy.apply(hidden, weight, bias, w, b, targets, chunk_rows)
    total = hidden.new_zeros((), dtype=torch.float32)
    with torch.autocast(device_type, enabled=False):
        for h, t in zip(hidden.split(chunk_rows), targets.split(chunk_rows)):
            logits = F.linear(h.to(dtype), w, b).float()  # (n, V)
            total += (torch.logsumexp(logits, -1) - logits.gather(1, t[:, None]).squeeze(1)).sum()
    return total


_cast_cache: list = [None]  # one slot: (weakref to the weight, its version, dtype, the cast copy)


def cached_weight_cast(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`weight` in the compute dtype; a frozen weight (a frozen head) is cast once per run.

    A trained weight is cast on every call: torch's fused AdamW updates parameters without bumping their version
    counter (checked on torch 2.13, CPU), so a cache keyed on `_version` would keep serving the head of step 0
    while the real weight trains (a full fine-tune then learns against a stale head and saves a broken model).
    """
    if weight.dtype == dtype:
        return weight.detach()
    if weight.requires_grad:
        return weight.detach().to(dtype)
    slot = _cast_cache[0]
    if slot is not None and slot[0]() is weight and slot[1] == weight._version and slot[2] == dtype:
        return slot[3]
    cast = weight.detach().to(dtype)
    _cast_cache[0] = (weakref.ref(weight), weight._version, dtype, cast)
    return cast


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, w, b, targets, chunk_rows):
        dtype = w.dtype
        need_w, need_b = weight.requires_grad, bias is not None and bias.requires_grad
        grad_h = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)  # (N, H)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None  # (V, H)
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None  # (V,)
        total = hidden.new_zeros((), dtype=torch.float32)
        start = 0
        with torch.autocast(hidden.device.type, enabled=False):
            for h, t in zip(hidden.split(chunk_rows), targets.split(chunk_rows)):
                h = h.to(dtype)  # (n, H)
                logits = F.linear(h, w, b)  # (n, V) in the compute dtype
                probs = torch.softmax(logits, -1, dtype=torch.float32)  # (n, V): one pass, fp32 out
                rows = torch.arange(len(t), device=t.device)
                total += target_losses(logits, probs[rows, t], t).sum()
                probs[rows, t] -= 1.0  # d(CE)/d(logits) = softmax - onehot
                g = probs.to(dtype)
                grad_h[start : start + len(t)] = g @ w  # (n, H)
                if need_w:
                    grad_w += (g.t() @ h).float()  # (V, H): bf16 matmul like autocast's, fp32 accumulation
                if need_b:
                    grad_b += probs.sum(0)
                start += len(t)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        scale = grad_out.to(grad_h.dtype)
        gw = None if grad_w is None else (grad_w * grad_out).to(ctx.weight_dtype)
        gb = None if grad_b is None else (grad_b * grad_out).to(ctx.weight_dtype)
        return grad_h * scale, gw, gb, None, None, None, None


def target_losses(logits: torch.Tensor, p_target: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log softmax(logits)[target] per row, from the target's fp32 probability: logits (n, V), p_target (n,).

    -log p is exact to fp32 rounding while p is a normal float (p > 1e-30, a loss below 69 nats); rows beyond
    that (a target the model all but rules out) get logsumexp - logit from the row itself.
    """
    loss = -torch.log(p_target)
    far = p_target < 1e-30
    if bool(far.any()):
        rows = far.nonzero().flatten()
        row_logits = logits[rows].float()
        loss[rows] = torch.logsumexp(row_logits, -1) - row_logits.gather(1, targets[rows, None]).squeeze(1)
    return loss


def full_logits_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Reference: the same quantity from full (B, T, V) logits (used in tests and as a fallback)."""
    flat = logits.float().reshape(-1, logits.shape[-1])  # (B*T, V)
    loss_sum = F.cross_entropy(flat, targets.reshape(-1), ignore_index=IGNORE, reduction="sum")
    return loss_sum, int((targets != IGNORE).sum())


def token_weighted_mean(loss_sums: list[float], counts: list[int]) -> float:
    """Mean loss per target token over micro-batches: the same whatever the accumulation split."""
    total = sum(counts)
    return sum(loss_sums) / total if total else float("nan")
