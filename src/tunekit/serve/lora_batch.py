"""Many LoRA adapters in one batch: each adapter's delta applied to its own tokens only (SGMV-style).

The model runner orders a step's tokens by adapter, so each adapter's tokens are one contiguous row range
[start, end) of the activations. For every linear module and every adapter active in the step:

    y[start:end] += (x[start:end] @ A^T) @ (scale * B)^T      # x: (n, in), A: (r, in), B: (out, r)

one pair of small matmuls per (adapter, module) on a view, no weight copied per token. Base-model tokens (no
adapter) are simply not in any range. The alternatives, timed on SmolLM2's shapes by benchmarks/serve_lora_kernels.py
(results in docs/serve.md): a per-token gather of A and B followed by bmm, and a bmm over adapters padded to a
common row count. The segment form was the fastest on this CPU at every batch size measured.
"""

from __future__ import annotations

import torch


class LoraWeights:
    """One adapter's factors per module key ((layer, name) -> (A (r, in), scale*B (out, r))), in the compute dtype."""

    def __init__(self, name: str, factors: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]], info: dict):
        self.name, self.factors, self.info = name, factors, info

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.factors.values())


def apply_segments_(y: torch.Tensor, x: torch.Tensor, key: tuple[int, str],
                    segments: list[tuple[LoraWeights, int, int]]) -> torch.Tensor:
    """Add each segment's LoRA delta for module `key` to y (N, out) in place; x is the module's input (N, in)."""
    for weights, start, end in segments:
        ab = weights.factors.get(key)
        if ab is None:
            continue
        a, b = ab
        y[start:end].addmm_(x[start:end] @ a.t(), b.t())
    return y


def apply_gathered(y: torch.Tensor, x: torch.Tensor, a_stack: torch.Tensor, b_stack: torch.Tensor,
                   index: torch.Tensor) -> torch.Tensor:
    """The per-token gather alternative (vLLM's CPU path): a_stack (n_adapters, r, in), b_stack (n_adapters, out, r),
    index (N,) adapter of each token; returns y + delta. Kept for the kernel benchmark and its exactness test."""
    a = a_stack[index]  # (N, r, in): one copy of A per token
    b = b_stack[index]  # (N, out, r)
    mid = torch.bmm(a, x.unsqueeze(-1))  # (N, r, 1)
    return y + torch.bmm(b, mid).squeeze(-1)


def apply_padded_bmm(y: torch.Tensor, x: torch.Tensor, a_stack: torch.Tensor, b_stack: torch.Tensor,
                     segments: list[tuple[int, int, int]]) -> torch.Tensor:
    """The stacked-bmm alternative: segments (adapter index, start, end) padded to the longest, one bmm pair."""
    width = max(end - start for _, start, end in segments)
    xs = x.new_zeros(len(segments), width, x.shape[1])
    for i, (_, start, end) in enumerate(segments):
        xs[i, : end - start] = x[start:end]
    idx = torch.tensor([s[0] for s in segments])
    delta = torch.bmm(torch.bmm(xs, a_stack[idx].transpose(1, 2)), b_stack[idx].transpose(1, 2))  # (S, width, out)
    y = y.clone()
    for i, (_, start, end) in enumerate(segments):
        y[start:end] += delta[i, : end - start]
    return y
