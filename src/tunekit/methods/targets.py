"""Which modules a method touches: target names and presets resolved against the actual model.

Targets accept leaf names of linear layers (q_proj, down_proj, ...) or the presets all-linear / attention / mlp;
a typo fails early with the list of linear layers that exist.
"""

from __future__ import annotations

from torch import nn

from .base import MethodError

ATTENTION_PARENTS = ("attn", "attention")
MLP_PARENTS = ("mlp", "feed_forward", "ffn")


def linear_leaf_names(model: nn.Module) -> dict[str, str]:
    """{leaf name: parent path} of every nn.Linear except the output head, e.g. {'q_proj': 'model.layers.0.self_attn'}."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    leaves: dict[str, str] = {}
    for path, module in model.named_modules():
        if isinstance(module, nn.Linear) and module is not head:
            parent, _, leaf = path.rpartition(".")
            leaves.setdefault(leaf, parent)
    return leaves


def in_group(parent_path: str, group: tuple[str, ...]) -> bool:
    """Whether a module's parent (e.g. model.layers.0.self_attn) is an attention / MLP block."""
    return any(k in parent_path.rpartition(".")[2].lower() for k in group)


def resolve_targets(model: nn.Module, targets: list[str] | str) -> list[str]:
    """Leaf names of the linear layers `targets` means in `model`; MethodError listing the valid names otherwise."""
    leaves = linear_leaf_names(model)
    if targets == "all-linear":
        return sorted(leaves)
    if targets in ("attention", "mlp"):
        group = ATTENTION_PARENTS if targets == "attention" else MLP_PARENTS
        chosen = sorted(n for n, parent in leaves.items() if in_group(parent, group))
        if not chosen:
            raise MethodError(f"preset {targets!r} matched no linear layer; linear layers: {', '.join(sorted(leaves))}")
        return chosen
    unknown = [t for t in targets if t not in leaves]
    if unknown or not targets:
        raise MethodError(
            f"target module(s) {', '.join(unknown) or '(none given)'} not found in the model; "
            f"linear layers are: {', '.join(sorted(leaves))} (or use all-linear, attention, mlp)"
        )
    return list(targets)


def targeted_linears(model: nn.Module, leaf_names: list[str]) -> dict[str, nn.Linear]:
    """{full path: module} of every linear layer (output head excluded) whose leaf name is in `leaf_names`."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    wanted = set(leaf_names)
    return {path: m for path, m in model.named_modules()
            if isinstance(m, nn.Linear) and m is not head and path.rpartition(".")[2] in wanted}


def decoder_layers(lm: nn.Module) -> tuple[str, nn.ModuleList]:
    """(path, list) of the decoder's transformer layers, e.g. ('model.layers', ModuleList of L layers)."""
    n = lm.config.get_text_config().num_hidden_layers
    for path, module in lm.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return path, module
    raise MethodError(f"could not find the {n} decoder layers of {type(lm).__name__}")
