"""Partial fine-tuning, our own implementation: the named layers/modules train at full rank, the rest is frozen.

`trainable` entries are either decoder layer selections or dotted name patterns:
    layers.3, layers.28-29 (inclusive), layers.-1 (the last), also followed by a sub-path: layers.0-3.mlp
    mlp, self_attn.*_proj, layers.0.mlp.down_proj, norm       (globs per dotted component)
A pattern matches a parameter when its components appear consecutively in the parameter's dotted name, so `mlp`
matches model.layers.5.mlp.up_proj.weight, and `layers.1` does not match layers.10. `train_embeddings` adds the
input embedding (and a tied output head with it).

Saved format (in the run folder):
    tunekit_method.json           {"format": "tunekit", "version": 1, "method": {name: freeze, trainable,
                                   train_embeddings}, "trained": [parameter names]}
    tunekit_weights.safetensors   only the trained tensors, under their parameter names
`load` copies them into a fresh base model; that is also the merge (the result is a plain model).
"""

from __future__ import annotations

import re
from fnmatch import fnmatchcase
from pathlib import Path

from torch import nn

from ..config import FreezeMethod
from .base import Method, MethodError, copy_tensors_, read_own_format, save_own_format
from .targets import decoder_layers

LAYER_SPEC = re.compile(r"^(?P<a>-?\d+)(?:-(?P<b>\d+))?$")


def expand_layer_spec(pattern: str, list_name: str, n_layers: int) -> list[str]:
    """'layers.28-29.mlp' -> ['layers.28.mlp', 'layers.29.mlp'], 'layers.-1' -> ['layers.<last>']; other
    patterns are returned unchanged."""
    parts = pattern.split(".")
    for i in range(len(parts) - 1):
        m = LAYER_SPEC.match(parts[i + 1])
        if parts[i] != list_name or not m:
            continue
        a = int(m["a"])
        if m["b"] is None:
            a = b = a + n_layers if a < 0 else a  # layers.-1 is the last layer
        elif a < 0:
            raise MethodError(f"trainable {pattern!r}: a range takes absolute indices (0..{n_layers - 1})")
        else:
            b = int(m["b"])
        if not 0 <= a <= b < n_layers:
            raise MethodError(f"trainable {pattern!r}: the model has layers 0..{n_layers - 1} (or -1..-{n_layers})")
        return [".".join(parts[: i + 1] + [str(k)] + parts[i + 2:]) for k in range(a, b + 1)]
    return [pattern]


def pattern_matches(pattern: str, name: str) -> bool:
    """Whether the dotted components of `pattern` (globs allowed) occur consecutively in `name`."""
    pat, parts = pattern.split("."), name.split(".")
    return any(all(fnmatchcase(parts[i + j], pat[j]) for j in range(len(pat)))
               for i in range(len(parts) - len(pat) + 1))


def module_names(model: nn.Module) -> list[str]:
    """The distinct non-numeric name components of the model's parameters (for error messages)."""
    names = {c for n, _ in model.named_parameters() for c in n.split(".")[:-1] if not c.isdigit()}
    return sorted(names)


class Freeze(Method):
    name = "freeze"
    can_merge = True

    def __init__(self, cfg: FreezeMethod):
        self.cfg = cfg

    def trainable_names(self, model: nn.Module) -> list[str]:
        list_path, layers = decoder_layers(model)
        list_name = list_path.rpartition(".")[2]
        params = dict(model.named_parameters(remove_duplicate=False))
        chosen: set[int] = set()
        for entry in self.cfg.trainable:
            hits = [id(p) for pattern in expand_layer_spec(entry, list_name, len(layers))
                    for n, p in params.items() if pattern_matches(pattern, n)]
            if not hits:
                raise MethodError(f"trainable {entry!r} matches no parameter; use layer indices ({list_name}.0 .. "
                                  f"{list_name}.{len(layers) - 1}, {list_name}.A-B, {list_name}.-1) or module names: "
                                  f"{', '.join(module_names(model))}")
            chosen.update(hits)
        if self.cfg.train_embeddings:
            chosen.add(id(model.get_input_embeddings().weight))
        # Names as named_parameters() reports them (a tied head is listed once, under the embedding).
        return [n for n, p in model.named_parameters() if id(p) in chosen]

    def apply(self, model: nn.Module) -> nn.Module:
        names = set(self.trainable_names(model))
        for n, p in model.named_parameters():
            p.requires_grad_(n in names)
        return model

    def save(self, model: nn.Module, out_dir: Path) -> None:
        tensors = {n: p for n, p in model.named_parameters() if p.requires_grad}
        save_own_format(out_dir, self.cfg, tensors, trained=sorted(tensors))

    def load(self, base: nn.Module, path: Path) -> nn.Module:
        _, tensors = read_own_format(path, self.name)
        copy_tensors_(base, tensors, path)
        return base

    def merge(self, model: nn.Module) -> nn.Module:
        return model  # the trained tensors already sit in a plain model
