"""Cross-entropy computed only where there are targets, summed so accumulation can weight by tokens.

Projecting every position through the LM head builds a (B, T, V) tensor although only the completion
positions carry a loss (about a quarter of them in instruction data); we gather the (N, H) hidden states
with targets first and project only those.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE = -100


def label_only_loss_sum(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum of token losses and token count. hidden (B, T, H), targets (B, T) -> (scalar, N)."""
    keep = targets != IGNORE  # (B, T)
    h = hidden[keep]  # (N, H)
    logits = head(h).float()  # (N, V): upcast so the softmax is taken in fp32 even under bf16 autocast
    loss_sum = F.cross_entropy(logits, targets[keep], reduction="sum")
    return loss_sum, int(keep.sum())


def full_logits_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Reference: the same quantity from full (B, T, V) logits (used in tests and as a fallback)."""
    flat = logits.float().reshape(-1, logits.shape[-1])  # (B*T, V)
    loss_sum = F.cross_entropy(flat, targets.reshape(-1), ignore_index=IGNORE, reduction="sum")
    return loss_sum, int((targets != IGNORE).sum())


def token_weighted_mean(loss_sums: list[float], counts: list[int]) -> float:
    """Mean loss per target token over micro-batches: the same whatever the accumulation split."""
    total = sum(counts)
    return sum(loss_sums) / total if total else float("nan")
