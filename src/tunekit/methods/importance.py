"""Which parameter groups matter for a task: score (decoder layer x linear module) groups on training data, then
pick groups within a parameter budget.

A group is one linear module of one decoder layer, e.g. layers.5.down_proj (its weight, and its bias if any).

Scores, over scoring micro-batches b = 1..B with G_b = d(mean token loss of micro-batch b)/d(weights):
    fisher: S_g = 1/B sum_b sum_{i in g} G_b[i]^2   the diagonal of the empirical Fisher information, summed over the
                                                    group (as in EWC, Kirkpatrick et al. 2017,
                                                    https://arxiv.org/abs/1612.00796, and Fisher-masked fine-tuning,
                                                    Sung et al. 2021, https://arxiv.org/abs/2111.09839)
    grad:   S_g = 1/B sum_b sum_{i in g} |G_b[i]|    accumulated gradient magnitude
and normalize: mean divides by the group's size. Gradients are taken per micro-batch (not per example), so the
Fisher estimate is that of micro-batch gradients: the squared mean gradient plus its variance / batch size.

Selection: each strategy orders the groups (importance: highest score first, groups scoring exactly 0 left out;
random: a seeded shuffle; last: from the last decoder layer down, in module order) and takes them in that order
while they fit in the budget, so the trained parameters never exceed the budget and the remainder is smaller than
every group left out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from .base import MethodError
from .targets import decoder_layers, resolve_targets


@dataclass(frozen=True)
class Group:
    layer: int
    module: str  # leaf name: q_proj, down_proj, ...
    path: str  # module path in the *ForCausalLM: model.layers.5.mlp.down_proj
    params: int  # weight (+ bias) entries
    in_features: int
    out_features: int

    @property
    def key(self) -> str:
        return f"layers.{self.layer}.{self.module}"

    def cost(self, lora_r: int | None) -> int:
        """Trainable parameters selecting this group costs: its weights at full rank, or a LoRA A and B."""
        return self.params if lora_r is None else lora_r * (self.in_features + self.out_features)


def parameter_groups(lm: nn.Module, modules) -> list[Group]:
    """One Group per decoder layer and linear module type in `modules` (leaf names or all-linear/attention/mlp),
    in layer order, then module order within the layer."""
    list_path, layers = decoder_layers(lm)
    wanted = set(resolve_targets(lm, modules))
    groups = []
    for i, layer in enumerate(layers):
        for sub, m in layer.named_modules():
            leaf = sub.rpartition(".")[2]
            if isinstance(m, nn.Linear) and leaf in wanted:
                n = sum(p.numel() for p in m.parameters(recurse=False))
                groups.append(Group(i, leaf, f"{list_path}.{i}.{sub}", n, m.in_features, m.out_features))
    if not groups:
        raise MethodError(f"modules {modules!r} match no linear layer inside the decoder layers")
    return groups


ForwardLoss = Callable[[nn.Module, object], "tuple[torch.Tensor, int]"]


def score_groups(model: nn.Module, groups: list[Group], batches: Iterable, forward_loss: ForwardLoss,
                 importance: str) -> list[float]:
    """Unnormalised score S_g of every group (module docstring), in `groups` order.

    Only the groups' parameters get gradients, each consumed by a hook as soon as it is accumulated (so at most one
    weight's gradient exists at a time); requires_grad flags, .grad and train/eval mode are restored afterwards.
    """
    if importance not in ("fisher", "grad"):
        raise MethodError(f"importance {importance!r}: choose fisher or grad")
    modules = dict(model.named_modules())
    totals = [0.0] * len(groups)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    handles = []

    def consume(i: int):
        def hook(p: torch.Tensor) -> None:
            g = p.grad.float()
            totals[i] += float(g.square().sum() if importance == "fisher" else g.abs().sum())
            p.grad = None
        return hook

    n_batches = 0
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for i, group in enumerate(groups):
            for p in modules[group.path].parameters(recurse=False):
                p.requires_grad_(True)
                handles.append(p.register_post_accumulate_grad_hook(consume(i)))
        model.eval()  # no dropout: scores are a deterministic function of the weights and the batches
        for batch in batches:
            loss_sum, n_targets = forward_loss(model, batch)
            if n_targets:
                (loss_sum / n_targets).backward()
                n_batches += 1
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags:
            p.grad = None
            p.requires_grad_(flag)
        model.train(was_training)
    if not n_batches:
        raise MethodError("no scoring batch had a labelled token; check the training data's loss masks")
    return [t / n_batches for t in totals]


def normalized(scores: list[float], groups: list[Group], normalize: str) -> list[float]:
    """mean: per parameter (the importance a unit of the budget buys); sum: per group."""
    if normalize == "sum":
        return list(scores)
    return [s / g.params for s, g in zip(scores, groups)]


def strategy_order(groups: list[Group], strategy: str, scores: list[float] | None, seed: int) -> list[int]:
    """Indices of `groups` in the order `strategy` takes them."""
    n = len(groups)
    if strategy == "importance":
        if scores is None:
            raise MethodError("strategy importance needs scores: tunekit train computes them in Method.prepare "
                              "(score_batches micro-batches) before apply()")
        # A group with score 0 had no gradient on any scoring batch: training it cannot change the loss at first.
        return sorted((i for i in range(n) if scores[i] > 0), key=lambda i: (-scores[i], i))  # ties: model order
    if strategy == "random":
        return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    if strategy == "last":
        return sorted(range(n), key=lambda i: (-groups[i].layer, i))
    raise MethodError(f"strategy {strategy!r}: choose importance, random or last")


def budget_for(groups: list[Group], lora_r: int | None, fraction: float | None, max_params: int | None) -> int:
    """The budget in trainable parameters: max_params, or `fraction` of what training every group would cost."""
    if max_params is not None:
        return max_params
    return round(fraction * sum(g.cost(lora_r) for g in groups))


def select_within_budget(groups: list[Group], order: list[int], budget: int, lora_r: int | None) -> list[int]:
    """Indices (sorted) of the groups taken in `order` while they fit in `budget` trainable parameters."""
    chosen, used = [], 0
    for i in order:
        cost = groups[i].cost(lora_r)
        if used + cost <= budget:
            chosen.append(i)
            used += cost
    if not chosen:
        smallest = min(groups, key=lambda g: g.cost(lora_r))
        raise MethodError(f"budget of {budget:,} trainable parameters is smaller than the smallest group "
                          f"({smallest.key}: {smallest.cost(lora_r):,}); raise method.fraction or method.max_params")
    return sorted(chosen)
