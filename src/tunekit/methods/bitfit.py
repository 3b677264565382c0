"""BitFit (Ben Zaken et al. 2021, https://arxiv.org/abs/2106.10199), our own implementation: only bias terms train.

Llama-style models have no biases, so every target linear layer without one gets a zero-initialised bias (the
fresh model computes exactly what the base does) and those biases train; existing biases of target layers train
from their values. Everything else is frozen.

Saved format (in the run folder):
    tunekit_method.json           {"format": "tunekit", "version": 1, "method": {name: bitfit, target_modules},
                                   "created": [paths of layers that got a new bias]}
    tunekit_weights.safetensors   "<layer path>.bias" (out_features,) for every target layer,
                                   e.g. "model.layers.0.self_attn.q_proj.bias"
`load` adds the same zero biases to a fresh base model and copies the trained values in. `merge` keeps them as
the plain nn.Linear biases they already are; when every attention (or MLP) projection got one it also sets the
model config's attention_bias (mlp_bias) flag, so the merged model saves and reloads with transformers.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..config import BitFitMethod
from .base import Method, MethodError, copy_tensors_, read_own_format, save_own_format
from .targets import ATTENTION_PARENTS, MLP_PARENTS, in_group, resolve_targets, targeted_linears


def add_zero_biases_(model: nn.Module, paths: list[str]) -> None:
    """Give each linear layer at `paths` a zero bias (mutates `model`)."""
    for path in paths:
        layer = model.get_submodule(path)
        layer.bias = nn.Parameter(torch.zeros(layer.out_features, dtype=layer.weight.dtype, device=layer.weight.device))


class BitFit(Method):
    name = "bitfit"
    can_merge = True

    def __init__(self, cfg: BitFitMethod):
        self.cfg = cfg
        self.created: list[str] = []

    def target_layers(self, model: nn.Module) -> dict[str, nn.Linear]:
        return targeted_linears(model, resolve_targets(model, self.cfg.target_modules))

    def apply(self, model: nn.Module) -> nn.Module:
        layers = self.target_layers(model)
        for p in model.parameters():
            p.requires_grad_(False)
        self.created = sorted(path for path, layer in layers.items() if layer.bias is None)
        add_zero_biases_(model, self.created)
        for layer in layers.values():
            layer.bias.requires_grad_(True)
        return model

    def save(self, model: nn.Module, out_dir: Path) -> None:
        tensors = {f"{path}.bias": layer.bias for path, layer in self.target_layers(model).items()}
        save_own_format(out_dir, self.cfg, tensors, created=self.created)

    def load(self, base: nn.Module, path: Path) -> nn.Module:
        meta, tensors = read_own_format(path, self.name)
        add_zero_biases_(base, meta["created"])
        copy_tensors_(base, tensors, path)
        return base

    def merge(self, model: nn.Module) -> nn.Module:
        """The biases already are plain nn.Linear biases; make the model config say so (mutates `model`).

        transformers has one flag per block (attention_bias, mlp_bias): when only some projections of a block got a
        bias, the others get a zero one, so the merged model computes the same and reloads from its config.
        """
        config = model.config
        for flag, group in (("attention_bias", ATTENTION_PARENTS), ("mlp_bias", MLP_PARENTS)):
            layers = {p: m for p, m in model.named_modules()
                      if isinstance(m, nn.Linear) and in_group(p.rpartition(".")[0], group)}
            if not any(m.bias is not None for m in layers.values()):
                continue
            if not hasattr(config, flag):
                if all(m.bias is not None for m in layers.values()):
                    continue
                raise MethodError(f"{type(model).__name__} has no config flag {flag!r}: a merged model with biases on "
                                  f"only some of its projections would not reload; target all of them, or serve the "
                                  f"run folder as an adapter")
            add_zero_biases_(model, sorted(p for p, m in layers.items() if m.bias is None))
            setattr(config, flag, True)
        return model
