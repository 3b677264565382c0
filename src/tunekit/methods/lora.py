"""LoRA (Hu et al. 2021, https://arxiv.org/abs/2106.09685) through HF peft, saved in plain PEFT format.

Variants, each a peft option: rsLoRA (scale alpha/sqrt(r), https://arxiv.org/abs/2312.03732), DoRA (a trainable
magnitude per output row, https://arxiv.org/abs/2402.09353), per-module ranks/alphas, and the inits default
(A kaiming-uniform, B = 0), gaussian, orthogonal (B A = 0 by construction), PiSSA (A, B = the top-r SVD part of W,
removed from W; https://arxiv.org/abs/2404.02948) and OLoRA (the same with a QR split,
https://arxiv.org/abs/2406.01775).

PiSSA and OLoRA change the frozen base weights, so their trained adapter only fits that modified base. On save it
is converted (peft's `path_initial_model_for_weight_conversion`) into a plain LoRA of rank 2r that applies to the
original, unmodified base model: the run folder loads like any other LoRA adapter.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

from torch import nn

from ..config import LoraMethod
from .base import MethodError
from .peft_method import PeftMethod
from .targets import linear_leaf_names, resolve_targets, targeted_linears

__all__ = ["Lora", "linear_leaf_names", "resolve_targets"]

BASE_CHANGING_INITS = ("pissa", "olora")  # and pissa_niter_<n>


def peft_init(init: str):
    """Our init name -> peft's init_lora_weights value."""
    return True if init == "default" else init


def changes_base(init: str) -> bool:
    return init.startswith(BASE_CHANGING_INITS)


def pattern_matches(key: str, module_path: str) -> bool:
    """peft's rule for rank_pattern / alpha_pattern keys: a regex matching the end of a module path at a dot."""
    return re.match(rf"(.*\.)?({key})$", module_path) is not None


def check_ranks(model: nn.Module, cfg: LoraMethod, targets: list[str]) -> None:
    """Every pattern key hits a targeted layer, and no layer gets a rank above min(in_features, out_features)."""
    layers = targeted_linears(model, targets)
    for what, pattern in (("rank_pattern", cfg.rank_pattern), ("alpha_pattern", cfg.alpha_pattern)):
        for key in pattern:
            if not any(pattern_matches(key, path) for path in layers):
                raise MethodError(f"{what} key {key!r} matches no adapted layer; adapted layers are e.g. "
                                  f"{', '.join(sorted(layers)[:4])} (keys match the end of these names)")
    for path, layer in layers.items():
        r = next((v for k, v in cfg.rank_pattern.items() if pattern_matches(k, path)), cfg.r)
        limit = min(layer.in_features, layer.out_features)
        if r > limit:
            raise MethodError(f"LoRA rank {r} is larger than layer {path} allows ({layer.in_features} -> "
                              f"{layer.out_features}: at most {limit}); lower r or set rank_pattern for it")


class Lora(PeftMethod):
    name = "lora"

    def __init__(self, cfg: LoraMethod):
        super().__init__(cfg)
        self._initial_adapter: tempfile.TemporaryDirectory | None = None

    def peft_config(self, model: nn.Module):
        from peft import LoraConfig

        cfg = self.cfg
        targets = resolve_targets(model, cfg.target_modules)
        check_ranks(model, cfg, targets)
        if changes_base(cfg.init) and cfg.dora:
            raise MethodError(f"init {cfg.init!r} cannot be combined with dora: the saved adapter is converted to a "
                              f"plain LoRA against the original base, which has no DoRA form; use init: default")
        if changes_base(cfg.init) and cfg.rslora and (cfg.rank_pattern or cfg.alpha_pattern):
            raise MethodError(f"init {cfg.init!r} with rslora cannot use rank_pattern/alpha_pattern (peft cannot "
                              f"convert that adapter back to plain LoRA); drop one of them")
        return LoraConfig(
            r=cfg.r,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=targets,
            use_rslora=cfg.rslora,
            use_dora=cfg.dora,
            init_lora_weights=peft_init(cfg.init),
            rank_pattern=dict(cfg.rank_pattern),
            alpha_pattern=dict(cfg.alpha_pattern),
            bias="none",
            task_type="CAUSAL_LM",
        )

    def apply(self, model: nn.Module) -> nn.Module:
        # Default/gaussian/orthogonal inits start with B A = 0: the fresh adapter reproduces the base logits.
        peft_model = super().apply(model)
        if changes_base(self.cfg.init):
            # Keep the initial A0, B0: save() turns the trained (A, B) into a LoRA on the original W via them.
            self._initial_adapter = tempfile.TemporaryDirectory(prefix="tunekit-lora-init-")
            peft_model.save_pretrained(self._initial_adapter.name, safe_serialization=True)
        return peft_model

    def save(self, model: nn.Module, out_dir: Path) -> None:
        if self._initial_adapter is None:
            model.save_pretrained(out_dir, safe_serialization=True)
            return
        model.save_pretrained(out_dir, safe_serialization=True,
                              path_initial_model_for_weight_conversion=self._initial_adapter.name)
