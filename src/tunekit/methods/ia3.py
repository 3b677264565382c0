"""(IA)^3 (Liu et al. 2022, https://arxiv.org/abs/2205.05638) through HF peft: a learned vector rescales the
output of each target linear layer (keys, values) or, for feed-forward targets (the MLP down-projection), its
input. The vectors start at one, so a fresh adapter reproduces the base model exactly; merging multiplies them
into the weights.
"""

from __future__ import annotations

from torch import nn

from ..config import IA3Method
from .base import MethodError
from .peft_method import PeftMethod
from .targets import MLP_PARENTS, in_group, resolve_targets, targeted_linears


class IA3(PeftMethod):
    name = "ia3"

    cfg: IA3Method  # set by the base class's __init__

    def feedforward_modules(self, model: nn.Module, targets: list[str]) -> list[str]:
        if self.cfg.feedforward_modules is None:
            # The MLP's down-projection: scaled on its (wide) input, as in the paper and peft's Llama defaults.
            layers = targeted_linears(model, targets)
            return sorted({path.rpartition(".")[2] for path, m in layers.items()
                           if in_group(path.rpartition(".")[0], MLP_PARENTS) and m.in_features > m.out_features})
        outside = [m for m in self.cfg.feedforward_modules if m not in targets]
        if outside:
            raise MethodError(f"feedforward_modules {', '.join(outside)} are not among the targets "
                              f"({', '.join(targets)}); every feed-forward module must also be a target")
        return list(self.cfg.feedforward_modules)

    def peft_config(self, model: nn.Module):
        from peft import IA3Config

        targets = resolve_targets(model, self.cfg.target_modules)
        return IA3Config(task_type="CAUSAL_LM", target_modules=targets,
                         feedforward_modules=self.feedforward_modules(model, targets))
