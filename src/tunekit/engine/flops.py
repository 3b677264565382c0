"""FLOPs per trained token and the machine's matmul peak, for model-FLOPs utilisation (MFU).

MFU = tokens/s x FLOPs per token / measured peak. The FLOP count is the work the task needs, the same for
every tool whatever it actually executes (padding, logits at every position and recomputation are waste,
not credit):

    F = 4·P_lin + 2·P_lin,trained + (4 or 6)·P_head·f_label + 12·n_layers·L̄/2·d_attn

    (frozen base, e.g. LoRA: P_lin,trained = 0 and 4·P_head; full fine-tuning: 6·P_lin and 6·P_head)

P_lin: weights of the linear layers inside the decoder; P_head: LM-head weights (V x H); f_label: share of
tokens that carry a loss (only those need logits); forward = 2 FLOPs per weight per token, the backward pass
needs the input gradient (2 more) and, for trained weights, the weight gradient (2 more). Attention: QK^T and
PV cost 2·2·(L̄/2)·d_attn per token and layer in the forward pass under a causal mask (L̄/2 keys on average
for sequences of mean length L̄), and twice that backward. Adapter FLOPs are left out (<1% for LoRA r<=64).

Two peaks, both measured here: an n^3 product (2048^3 on a CPU), the classic reference, and the model's own
linear shapes at a micro-batch of rows (measure_shape_peak), which is what its matmuls can reach on this machine.
They differ by CPU: on a Zen 3 CPU the 2048^3 fp32 product ran slower than the model's shapes (the progress line
read "MFU 97-123%" against it, issue 23). The progress line uses the model-shape peak; the run card and the
benchmark give both.
"""

from __future__ import annotations

import json
import os
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
    trainable_linear_params: int = 0  # of linear_params, those that train (full / freeze methods)
    head_trains: bool = False

    @classmethod
    def from_model(cls, model: nn.Module, linear_weights: list[torch.Tensor] | None = None) -> "ModelShape":
        """Read the shape from a transformers causal LM (peft-wrapped or not).

        `linear_weights`: the base model's decoder linear weights, taken with base_linear_weights() before a
        method added its own layers (LoRA's A/B, bottleneck adapters are nn.Linear too, and their FLOPs are
        not model FLOPs). Whether they train is read now, after the method froze or unfroze them.
        """
        base = _unwrap(model)
        cfg = base.config
        head = base.get_output_embeddings()
        weights = base_linear_weights(base) if linear_weights is None else linear_weights
        linear = sum(w.numel() for w in weights)
        trainable = sum(w.numel() for w in weights if w.requires_grad)
        d_head = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        head_params = head.weight.numel() if head is not None else 0
        head_trains = head is not None and head.weight.requires_grad
        return cls(cfg.num_hidden_layers, cfg.num_attention_heads * d_head, linear, head_params, trainable, head_trains)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def base_linear_weights(model: nn.Module) -> list[torch.Tensor]:
    """Weights of the decoder's nn.Linear layers, LM head excluded; call on the base model before a method."""
    base = _unwrap(model)
    head = base.get_output_embeddings()
    head_ids = {id(p) for p in head.parameters()} if head is not None else set()
    return [m.weight for m in base.get_decoder().modules()
            if isinstance(m, nn.Linear) and m.weight is not None and id(m.weight) not in head_ids]


def flops_per_token(shape: ModelShape, label_fraction: float, mean_seq_len: float) -> float:
    """Model FLOPs for one trained token (formula in the module docstring)."""
    linear = 4 * shape.linear_params + 2 * shape.trainable_linear_params
    head = (6 if shape.head_trains else 4) * shape.head_params * label_fraction
    attention = 12 * shape.n_layers * (mean_seq_len / 2) * shape.d_attn
    return linear + head + attention


FORMULA = ("F/token = 4*P_lin + 2*P_lin_trained + (4|6)*P_head*f_label + 12*n_layers*(L/2)*d_attn (forward 2, "
           "input gradient 2, weight gradient 2 FLOPs per weight; adapter FLOPs omitted); "
           "MFU = tokens/s * F / measured matmul peak")


def matmul_peak_size(device: str) -> int:
    """n of the n^3 product a peak is measured with: 2048 keeps a CPU busy; a large GPU needs 8192 to reach its peak."""
    return 8192 if device.startswith("cuda") else 2048


def peak_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The dtype of the matmul peak a run's MFU is measured against: bf16 for a bf16 run where the device computes
    bf16 natively, fp32 otherwise. An emulated bf16 product is no peak (Zen 3: 0.2 GFLOP/s against tens in fp32,
    minutes for one 2048^3 product), and fp32 is the fastest the machine computes there."""
    from .device import native_bf16

    return torch.bfloat16 if precision == "bf16" and native_bf16(device) else torch.float32


def measure_matmul_peak(dtype: torch.dtype, device: str = "cpu", n: int | None = None, seconds: float = 1.0) -> float:
    """Best FLOP/s of an n^3 matmul over ~`seconds` (2·n^3 FLOPs per product; n: matmul_peak_size by default)."""
    n = n or matmul_peak_size(device)
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


def linear_shapes(weights: list[torch.Tensor]) -> dict[tuple[int, int], int]:
    """{(out_features, in_features): how many decoder linears have that shape}, from base_linear_weights()."""
    shapes: dict[tuple[int, int], int] = {}
    for w in weights:
        key = (int(w.shape[0]), int(w.shape[1]))
        shapes[key] = shapes.get(key, 0) + 1
    return shapes


SHAPE_PEAK_TOKENS = 2048  # rows of the model-shape products: about one packed micro-batch (8 x 256 tokens)


def measure_shape_peak(shapes: dict[tuple[int, int], int], dtype: torch.dtype, device: str = "cpu",
                       tokens: int = SHAPE_PEAK_TOKENS, seconds: float = 1.0) -> float:
    """FLOP/s of the model's own linear products: X (tokens, in) @ W^T (in, out) for each decoder shape, weighted
    by how often the model has it (total FLOPs / total best time): what the model's matmuls reach on this
    machine, one product at a time. A 2048^3 product is no ceiling for a small model (see the module docstring)."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    per_shape = seconds / max(len(shapes), 1)
    total_flops, total_time = 0.0, 0.0
    for (n_out, n_in), count in shapes.items():
        x = torch.randn(tokens, n_in, device=device).to(dtype)
        w = torch.randn(n_out, n_in, device=device).to(dtype)
        torch.nn.functional.linear(x, w)  # warm-up
        sync()
        best, spent = float("inf"), 0.0
        while spent < per_shape:
            t = time.perf_counter()
            torch.nn.functional.linear(x, w)
            sync()
            dt = time.perf_counter() - t
            spent += dt
            best = min(best, dt)
        total_flops += count * 2 * tokens * n_in * n_out
        total_time += count * best
    return total_flops / total_time


def cached_shape_peak(shapes: dict[tuple[int, int], int], dtype: torch.dtype, device: torch.device,
                      cache_dir: Path | None = None, seconds: float = 0.3) -> float:
    """measure_shape_peak, kept as the best rate measured on this machine for these shapes (see cached_matmul_peak)."""
    tag = ",".join(f"{o}x{i}*{c}" for (o, i), c in sorted(shapes.items()))
    return _best_ever(f"shapes[{tag}]@{SHAPE_PEAK_TOKENS}", dtype, device, cache_dir,
                      lambda: measure_shape_peak(shapes, dtype, str(device), seconds=seconds))


def cached_matmul_peak(dtype: torch.dtype, device: torch.device, cache_dir: Path | None = None,
                       seconds: float = 0.3) -> float:
    """This machine's matmul peak for `dtype`, device and thread count: the best rate ever measured here.

    Each call measures briefly and keeps the maximum in a small cache file. Other work sharing the CPU can only
    lower a measurement, so the running maximum converges to the real peak instead of freezing a bad reading.
    """
    return _best_ever(f"{matmul_peak_size(str(device))}^3", dtype, device, cache_dir,
                      lambda: measure_matmul_peak(dtype, str(device), seconds=seconds))


def read_cache(path: Path) -> dict:
    """A tunekit measurement cache (a JSON object in ~/.cache/tunekit); empty when missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def write_cache(path: Path, table: dict) -> None:
    """Replace the cache file atomically (a temporary file renamed over it); best effort: a read-only home keeps
    nothing, and the measurement is simply taken again next time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(table, indent=1))
        tmp.replace(path)
    except OSError:
        pass


def _best_ever(what: str, dtype: torch.dtype, device: torch.device, cache_dir: Path | None, measure) -> float:
    """measure() now, and the best reading ever kept for (what, dtype, device, threads, torch) in a cache file."""
    cache_dir = cache_dir or Path.home() / ".cache" / "tunekit"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    key = f"{name}|{str(dtype)}|threads={torch.get_num_threads()}|torch={torch.__version__}"
    if not what.endswith("^3"):  # the n^3 entries keep their old keys (caches written before shape peaks)
        key += f"|{what}"
    path = cache_dir / "matmul_peak.json"
    table = read_cache(path)
    measured = measure()
    if measured > table.get(key, 0.0):
        table[key] = measured
        write_cache(path, table)
    return table[key]
