"""Aggregating LoRA adapters from several data owners, weighted by their number of training examples.

LoRA's update of a weight is dW = B A (times alpha / r, the same on every owner, left out here): A (r, in),
B (out, r). Averaging A and B separately (FedAvg, the FlowerTune LLM baseline) gives mean(B) mean(A), which is
not mean(B A): the cross terms B_i A_j of different owners enter, the "aggregation bias". Two schemes avoid it:

- ffa: FFA-LoRA (Sun et al. 2024, "Improving LoRA in Privacy-preserving Federated Learning", arXiv:2403.12313):
  A stays frozen at its shared initial value and only B trains, so mean(B) A = mean(B A) exactly (and each owner
  sends half the tensors).
- svd: average the products, dW = sum_k w_k B_k A_k, then the best rank-r approximation of it (Eckart-Young, by
  truncated SVD), split back into B = U_r S_r^1/2, A = S_r^1/2 V_r^T. Exact whenever the average has rank <= r; its
  error is never larger than FedAvg's (both are rank-r, the SVD one is the closest), and `product_bias` reports it.

Tensors that are not part of a LoRA pair (biases, DoRA magnitudes, ...) are averaged in every scheme. Computation
in float64; results in the dtype the owners sent (fp32 on the wire).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

AGGREGATIONS = ("fedavg", "ffa", "svd")


class FederatedError(ValueError):
    """An owner's update or the federation's config is wrong; the message names the owner and what to fix."""


@dataclass
class ClientUpdate:
    owner: str  # the data owner (SuperNode) that sent it
    tensors: dict[str, torch.Tensor]  # trainable tensor name -> value
    n_examples: int  # training examples behind it (the FedAvg weight)


def lora_pairs(names) -> list[tuple[str, str]]:
    """[(A name, B name)] of the LoRA layers among `names` (peft's `...lora_A.<adapter>.weight` naming)."""
    names = set(names)
    return sorted((a, a.replace("lora_A", "lora_B")) for a in names
                  if "lora_A" in a and a.replace("lora_A", "lora_B") in names)


def check_updates(updates: list[ClientUpdate], expected: dict[str, torch.Size]) -> None:
    """Every owner sent every expected tensor with the server's shape, and a positive example count."""
    if not updates:
        raise FederatedError("no owner sent an update this round (check the minimum number of owners)")
    for u in updates:
        missing = sorted(set(expected) - set(u.tensors))
        extra = sorted(set(u.tensors) - set(expected))
        if missing or extra:
            raise FederatedError(f"owner {u.owner!r} sent an adapter with other tensors than the server's "
                                 f"(missing {missing[:3]}, unexpected {extra[:3]}): it must train the same method, "
                                 f"rank and target modules as the federation's config")
        for name, shape in expected.items():
            if tuple(u.tensors[name].shape) != tuple(shape):
                raise FederatedError(f"owner {u.owner!r}: tensor {name} has shape {tuple(u.tensors[name].shape)}, "
                                     f"the server's is {tuple(shape)}: same method.r and target modules everywhere")
        if u.n_examples <= 0:
            raise FederatedError(f"owner {u.owner!r} reported {u.n_examples} training examples")


def _weights(updates: list[ClientUpdate]) -> list[float]:
    total = sum(u.n_examples for u in updates)
    return [u.n_examples / total for u in updates]


def _mean(updates: list[ClientUpdate], name: str, w: list[float]) -> torch.Tensor:
    return sum(wk * u.tensors[name].double() for wk, u in zip(w, updates))


def aggregate(updates: list[ClientUpdate], how: str, expected: dict[str, torch.Size] | None = None,
              global_tensors: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The new global adapter from this round's updates. `how`: fedavg, ffa or svd (see the module docstring);
    ffa needs `global_tensors` (the frozen A every owner must have kept)."""
    if how not in AGGREGATIONS:
        raise FederatedError(f"unknown aggregation {how!r}; choose one of: {', '.join(AGGREGATIONS)}")
    if expected is None:
        expected = {n: t.shape for n, t in updates[0].tensors.items()} if updates else {}
    check_updates(updates, expected)
    w = _weights(updates)
    dtype = next(iter(updates[0].tensors.values())).dtype
    out = {name: _mean(updates, name, w) for name in expected}  # FedAvg of every tensor
    if how == "ffa":
        if global_tensors is None:
            raise FederatedError("ffa keeps A frozen: pass the global adapter the round started from")
        for a, _ in lora_pairs(expected):
            for u in updates:
                if not torch.equal(u.tensors[a], global_tensors[a].to(u.tensors[a].dtype)):
                    raise FederatedError(f"ffa: owner {u.owner!r} changed {a}, which FFA-LoRA keeps frozen: "
                                         f"train with the lora_A tensors frozen (only lora_B trains)")
            out[a] = global_tensors[a].double()
    elif how == "svd":
        for a, b in lora_pairs(expected):
            r = updates[0].tensors[a].shape[0]
            delta = sum(wk * (u.tensors[b].double() @ u.tensors[a].double()) for wk, u in zip(w, updates))
            out[b], out[a] = refactor(delta, r)
    return {n: t.to(dtype) for n, t in out.items()}


def refactor(delta: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B (out, r), A (r, in)) with B A the best rank-r approximation of delta (out, in), by truncated SVD."""
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    root = S[:r].sqrt()
    return U[:, :r] * root, root[:, None] * Vh[:r]


def product_bias(updates: list[ClientUpdate], aggregated: dict[str, torch.Tensor]) -> float:
    """|| B_agg A_agg - sum_k w_k B_k A_k ||_F / || sum_k w_k B_k A_k ||_F over all LoRA layers together: how far
    the aggregated adapter's weight update is from the owners' average update (0 = exact)."""
    w = _weights(updates)
    err, ref = 0.0, 0.0
    for a, b in lora_pairs(aggregated):
        target = sum(wk * (u.tensors[b].double() @ u.tensors[a].double()) for wk, u in zip(w, updates))
        got = aggregated[b].double() @ aggregated[a].double()
        err += float((got - target).square().sum())
        ref += float(target.square().sum())
    return (err / ref) ** 0.5 if ref else 0.0


def bytes_sent(tensors: dict[str, torch.Tensor], how: str) -> int:
    """Bytes one owner uploads per round, as fp32 (ffa: only the B tensors and the non-LoRA ones)."""
    frozen = {a for a, _ in lora_pairs(tensors)} if how == "ffa" else set()
    return sum(t.numel() * 4 for n, t in tensors.items() if n not in frozen)
