"""Shared mapping onto HF peft: methods peft implements are a peft config plus these few lines.

The saved result is plain PEFT format (adapter_config.json + adapter_model.safetensors), so
`PeftModel.from_pretrained(base, run_dir)` loads it with the same logits.
"""

from __future__ import annotations

from abc import abstractmethod
from pathlib import Path

from torch import nn

from .base import Method


class PeftMethod(Method):
    can_merge = True  # prompt-learning methods override this

    def __init__(self, cfg):
        self.cfg = cfg

    @abstractmethod
    def peft_config(self, model: nn.Module):
        """The peft *Config for this method on `model` (targets already resolved and checked)."""

    def apply(self, model: nn.Module) -> nn.Module:
        return attach_peft(model, self.peft_config(model))

    def causal_lm(self, model: nn.Module) -> nn.Module:
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    def save(self, model: nn.Module, out_dir: Path) -> None:
        model.save_pretrained(out_dir, safe_serialization=True)

    def load(self, base: nn.Module, path: Path) -> nn.Module:
        from peft import PeftModel

        return PeftModel.from_pretrained(base, path)

    def merge(self, model: nn.Module) -> nn.Module:
        return model.merge_and_unload()


def attach_peft(model: nn.Module, config) -> nn.Module:
    """get_peft_model(model, config) set up for tunekit's loop (mutates `model`: peft injects its layers)."""
    from peft import get_peft_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    peft_model = get_peft_model(model, config)
    for module in peft_model.modules():
        if isinstance(module, BaseTunerLayer):
            # peft casts each adapter input to the adapter's fp32 dtype; under bf16 autocast that is a copy of
            # every activation that autocast immediately casts back. In fp32 runs it is a no-op either way.
            module.cast_input_dtype_enabled = False
    return peft_model
