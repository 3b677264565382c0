"""LoRA (Hu et al. 2021, https://arxiv.org/abs/2106.09685) through HF peft, saved in plain PEFT format.

Targets accept module names or the presets all-linear / attention / mlp, resolved against the actual model
so a typo fails early with the list of linear layers that exist.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..config import LoraMethod
from .base import Method, MethodError

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


def resolve_targets(model: nn.Module, targets: list[str] | str) -> list[str]:
    leaves = linear_leaf_names(model)
    if targets == "all-linear":
        return sorted(leaves)
    if targets in ("attention", "mlp"):
        keys = ATTENTION_PARENTS if targets == "attention" else MLP_PARENTS
        chosen = sorted(n for n, parent in leaves.items() if any(k in parent.rpartition(".")[2].lower() for k in keys))
        if not chosen:
            raise MethodError(f"preset {targets!r} matched no linear layer; linear layers: {', '.join(sorted(leaves))}")
        return chosen
    unknown = [t for t in targets if t not in leaves]
    if unknown:
        raise MethodError(
            f"target module(s) {', '.join(unknown)} not found in the model; "
            f"linear layers are: {', '.join(sorted(leaves))} (or use all-linear, attention, mlp)"
        )
    return list(targets)


class Lora(Method):
    name = "lora"

    def __init__(self, cfg: LoraMethod):
        self.cfg = cfg

    def peft_config(self, model: nn.Module):
        from peft import LoraConfig

        return LoraConfig(
            r=self.cfg.r,
            lora_alpha=self.cfg.alpha,
            lora_dropout=self.cfg.dropout,
            target_modules=resolve_targets(model, self.cfg.target_modules),
            bias="none",
            task_type="CAUSAL_LM",
        )

    def apply(self, model: nn.Module) -> nn.Module:
        from peft import get_peft_model

        from peft.tuners.tuners_utils import BaseTunerLayer

        # peft zero-initialises lora_B, so the fresh adapter reproduces the base logits exactly.
        peft_model = get_peft_model(model, self.peft_config(model))
        for module in peft_model.modules():
            if isinstance(module, BaseTunerLayer):
                # peft casts each LoRA input to the adapter's fp32 dtype; under bf16 autocast that is a copy of
                # every activation that autocast immediately casts back. In fp32 runs it is a no-op either way.
                module.cast_input_dtype_enabled = False
        return peft_model

    def causal_lm(self, model: nn.Module) -> nn.Module:
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    def save(self, model: nn.Module, out_dir: Path) -> None:
        model.save_pretrained(out_dir, safe_serialization=True)

    def load(self, base: nn.Module, path: Path) -> nn.Module:
        from peft import PeftModel

        return PeftModel.from_pretrained(base, path)

    def merge(self, model: nn.Module) -> nn.Module:
        return model.merge_and_unload()
