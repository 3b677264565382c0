"""Many LoRA adapters in one batch: each token gets its own adapter's delta, in a fixed number of matmuls.

The kept method (`LoraBank`, "stacked-masked"): for every fused linear (qkv, o, gate_up, down) of every layer, the
A factors of all loaded adapters are stacked into one (C, in) matrix (C = the sum of their ranks over the modules
the fused linear holds) and the B factors into one block-diagonal (out, C) matrix. A step then computes

    y += ((x @ A_all^T) * M) @ B_all^T        # x: (N, in); M: (N, C), 1 where column c belongs to token n's adapter

three calls per fused linear whatever the number of adapters or how the batch mixes them; base-model tokens have
an all-zero row of M, and masked columns contribute exact zeros. No weight is copied per token. The waste is the
columns of other adapters (C x in per token: small next to the base matmul while C stays in the hundreds).

Timed against the alternatives by `tunekit bench serve` on SmolLM2's shapes (docs/serving.md): one pair of
matmuls per adapter on its contiguous row range (`apply_segments_`, SGMV-style; 2 calls per adapter, and a bf16
call costs ~20 us here whatever its size), a per-token gather of A and B with bmm (`apply_gathered`, vLLM's CPU
approach: copies both factors per token), and one bmm over adapters padded to a common row count
(`apply_padded_bmm`). The alternatives stay here for that benchmark and for the exactness test.
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


class LoraBank:
    """The stacked factors of every loaded batched adapter, per (layer, fused linear); rebuilt when adapters change.

    `columns[name]` of a fused linear says where each HF module's output sits in it (runner.ModelRunner.columns).
    """

    def __init__(self, adapters: list[LoraWeights], n_layers: int, columns: dict, out_features: dict,
                 dtype: torch.dtype):
        self.index = {a.name: i for i, a in enumerate(adapters)}
        self.stacks: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.packed = dtype == torch.bfloat16 and packing_available()
        layouts: dict[tuple, torch.Tensor] = {}  # equal column layouts share one owner tensor (one mask per step)
        by_fused: dict[str, list] = {}
        for name, (fused, lo, hi) in columns.items():
            by_fused.setdefault(fused, []).append((name, lo, hi))
        for layer in range(n_layers):
            for fused, parts in by_fused.items():
                a_rows, b_blocks, owners = [], [], []
                for ai, adapter in enumerate(adapters):
                    for name, lo, hi in parts:
                        ab = adapter.factors.get((layer, name))
                        if ab is None:
                            continue
                        a, b = ab
                        block = b.new_zeros(out_features[fused], a.shape[0])  # (out, r): B in its module's rows
                        block[slice(lo, hi) if lo is not None else slice(None)] = b
                        a_rows.append(a)
                        b_blocks.append(block)
                        owners += [ai] * a.shape[0]
                if not a_rows:
                    continue
                key = tuple(owners)
                owner = layouts.setdefault(key, torch.tensor(owners))
                a_all = torch.cat(a_rows).to(dtype).contiguous()  # (C, in)
                b_all = torch.cat(b_blocks, dim=1).to(dtype).contiguous()  # (out, C)
                if self.packed:  # oneDNN's blocked layout: 25-35% less per small bf16 call than mm / addmm_ here
                    reorder = torch.ops.mkldnn._reorder_linear_weight
                    self.stacks[(layer, fused)] = (reorder(a_all), reorder(b_all), owner)
                else:
                    self.stacks[(layer, fused)] = (a_all, b_all.t().contiguous(), owner)

    def masks_for(self, token_adapter: torch.Tensor, dtype: torch.dtype) -> dict:
        """{id(owner): (N, C) 0/1 mask} for this step; token_adapter (N,) is each token's adapter index or -1."""
        masks = {}
        for _, _, owner in self.stacks.values():
            if id(owner) not in masks:
                masks[id(owner)] = (token_adapter[:, None] == owner[None, :]).to(dtype)
        return masks

    def apply_(self, y: torch.Tensor, x: torch.Tensor, layer: int, fused: str, masks: dict) -> torch.Tensor:
        """y (N, out) + this fused linear's LoRA deltas for every token's adapter (in place on the unpacked path;
        use the returned tensor)."""
        stack = self.stacks.get((layer, fused))
        if stack is None:
            return y
        if self.packed:  # A (C, in) and B (out, C) blocked: y + ((x A^T) * M) B^T in two oneDNN calls
            linear = torch.ops.mkldnn._linear_pointwise
            a_all, b_all, owner = stack
            mid = linear(x, a_all, None, "none", [], "") * masks[id(owner)]
            return linear.binary(mid, y, b_all, None, "add")
        a_all, b_all_t, owner = stack  # (C, in), (C, out)
        return y.addmm_((x @ a_all.t()) * masks[id(owner)], b_all_t)


def packing_available() -> bool:
    """Whether bf16 weights can be kept in oneDNN's blocked layout on this CPU (methods/packed_linear's check)."""
    from ..methods.packed_linear import available

    return available(torch.device("cpu"))[0]
