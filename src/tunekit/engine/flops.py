"""FLOPs per trained token and the machine's matmul peak, for model-FLOPs utilisation (MFU).

MFU = tokens/s x FLOPs per token / measured peak. The FLOP count is the work the task needs, the same for
every tool whatever it actually executes (padding, logits at every position and recomputation are waste,
not credit):

    frozen base (LoRA and other adapters):  F = 4·P_lin + 4·P_head·f_label + 12·n_layers·L̄/2·d_attn
    full fine-tuning:                        F = 6·P_lin + 6·P_head·f_label + 12·n_layers·L̄/2·d_attn

P_lin: weights of the linear layers inside the decoder; P_head: LM-head weights (V x H); f_label: share of
tokens that carry a loss (only those need logits); forward = 2 FLOPs per weight per token, the backward pass
needs the input gradient (2 more) and, for trained weights, the weight gradient (2 more). Attention: QK^T and
PV cost 2·2·(L̄/2)·d_attn per token and layer in the forward pass under a causal mask (L̄/2 keys on average
for sequences of mean length L̄), and twice that backward. Adapter FLOPs are left out (<1% for LoRA r<=64).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


@dataclass(frozen=True)
class ModelShape:
    n_layers: int
    d_attn: int  # heads x head_dim
    linear_params: int  # decoder linear weights (excludes embeddings and the LM head)
    head_params: int  # V x H

    @classmethod
    def from_model(cls, model: nn.Module) -> "ModelShape":
        """Read the shape from a transformers causal LM (peft-wrapped or not)."""
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        cfg = base.config
        head = base.get_output_embeddings()
        head_ids = {id(p) for p in head.parameters()} if head is not None else set()
        decoder = base.get_decoder()
        linear = 0
        for module in decoder.modules():
            weight = getattr(module, "weight", None)
            if isinstance(module, nn.Linear) and weight is not None and id(weight) not in head_ids:
                linear += weight.numel()
        d_head = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        head_params = head.weight.numel() if head is not None else 0
        return cls(cfg.num_hidden_layers, cfg.num_attention_heads * d_head, linear, head_params)


def flops_per_token(shape: ModelShape, label_fraction: float, mean_seq_len: float, trains_base: bool) -> float:
    """Model FLOPs for one trained token (formula in the module docstring)."""
    per_weight = 6 if trains_base else 4
    attention = 12 * shape.n_layers * (mean_seq_len / 2) * shape.d_attn
    return per_weight * shape.linear_params + per_weight * shape.head_params * label_fraction + attention


FORMULA = ("F/token = 4*P_lin + 4*P_head*f_label + 12*n_layers*(L/2)*d_attn (frozen base; 6 instead of 4 when the "
           "base trains); MFU = tokens/s * F / measured matmul peak")


def measure_matmul_peak(dtype: torch.dtype, device: str = "cpu", n: int = 2048, seconds: float = 1.0) -> float:
    """Best FLOP/s of an n^3 matmul over ~`seconds` (2·n^3 FLOPs per product)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    a @ b  # warm-up: thread pool, kernel selection
    sync()
    best, spent = 0.0, 0.0
    while spent < seconds:
        t = time.perf_counter()
        a @ b
        sync()
        dt = time.perf_counter() - t
        spent += dt
        best = max(best, 2 * n**3 / dt)
    return best


def cached_matmul_peak(dtype: torch.dtype, device: torch.device, cache_dir: Path | None = None) -> float:
    """The measured peak for this machine, dtype, device and thread count, measured once and cached."""
    cache_dir = cache_dir or Path.home() / ".cache" / "tunekit"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    key = f"{name}|{str(dtype)}|threads={torch.get_num_threads()}|torch={torch.__version__}"
    path = cache_dir / "matmul_peak.json"
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):
        table = {}
    if key not in table:
        table[key] = measure_matmul_peak(dtype, str(device))
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(table, indent=1))
            tmp.replace(path)
        except OSError:
            pass
    return table[key]
