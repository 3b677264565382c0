"""Full fine-tuning: every weight trains; the result is a complete transformers model folder."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..config import FullMethod
from .base import Method


class Full(Method):
    name = "full"
    can_merge = True

    def __init__(self, cfg: FullMethod):
        self.cfg = cfg

    def apply(self, model: nn.Module) -> nn.Module:
        for p in model.parameters():
            p.requires_grad_(True)
        if self.cfg.freeze_embeddings:
            model.get_input_embeddings().weight.requires_grad_(False)
        return model

    def save(self, model: nn.Module, out_dir: Path) -> None:
        model.save_pretrained(out_dir, safe_serialization=True)

    def load(self, base: nn.Module, path: Path) -> nn.Module:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(path, dtype=base.dtype, use_safetensors=True).to(base.device)

    def merge(self, model: nn.Module) -> nn.Module:
        return model  # already plain weights
