"""AdamW with decoupled weight decay groups and a warmup + cosine/linear/constant learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import OptimConfig


def lr_multiplier(step: int, total: int, warmup: int, kind: str, min_ratio: float) -> float:
    """LR as a fraction of the peak at optimizer step `step` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1 - progress
    return min_ratio + (1 - min_ratio) * decay


def build_optimizer(named_params: dict[str, nn.Parameter], cfg: OptimConfig) -> torch.optim.AdamW:
    # No weight decay on biases and norm gains (1-D tensors), as is standard.
    decay = [p for p in named_params.values() if p.ndim >= 2]
    no_decay = [p for p in named_params.values() if p.ndim < 2]
    groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    fused = all(p.device.type in ("cuda", "cpu") for p in named_params.values())
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused or None)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_multiplier(s, total_steps, cfg.warmup_steps, cfg.schedule, cfg.min_lr_ratio)
    )
