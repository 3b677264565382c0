"""AdamW (torch fused, or bitsandbytes 8-bit / paged) with decoupled weight decay groups, and a warmup +
cosine/linear/constant learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import ConfigError, OptimConfig


def lr_multiplier(step: int, total: int, warmup: int, kind: str, min_ratio: float) -> float:
    """LR as a fraction of the peak at optimizer step `step` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1 - progress
    return min_ratio + (1 - min_ratio) * decay


def build_optimizer(named_params: dict[str, nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    # No weight decay on biases and norm gains (1-D tensors), as is standard.
    decay = [p for p in named_params.values() if p.ndim >= 2]
    no_decay = [p for p in named_params.values() if p.ndim < 2]
    groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    if cfg.name == "adamw":
        fused = all(p.device.type in ("cuda", "cpu") for p in named_params.values())
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused or None)
    if cfg.name.startswith("paged") and any(p.device.type != "cuda" for p in named_params.values()):
        raise ConfigError(f"optim.name {cfg.name} needs CUDA: paging moves optimizer state between GPU and CPU "
                         f"memory; on CPU use adamw or adamw_8bit")
    try:
        import bitsandbytes.optim as bnb_optim
    except ImportError as e:
        raise ConfigError(f"optim.name {cfg.name} needs bitsandbytes (pip install bitsandbytes)") from e
    cls = {"adamw_8bit": bnb_optim.AdamW8bit, "paged_adamw": bnb_optim.PagedAdamW,
           "paged_adamw_8bit": bnb_optim.PagedAdamW8bit}[cfg.name]
    # 8-bit: blockwise-quantized moments (bitsandbytes keeps tensors under 4,096 elements in fp32).
    return cls(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_multiplier(s, total_steps, cfg.warmup_steps, cfg.schedule, cfg.min_lr_ratio)
    )
