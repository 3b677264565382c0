"""What the loop minimises on a micro-batch. SFT is the default; distillation (tunekit.distill) plugs in here.

An objective may rewrite a micro-batch before the step (on-policy distillation replaces the gold completions with
the student's own samples) and returns the loss summed over target tokens, so the loop's token weighting across
accumulation steps stays the same whatever is being minimised.
"""

from __future__ import annotations

import torch
from torch import nn

from .batching import Batch
from .loss import label_only_loss_sum


def gold_loss_sum(model: nn.Module, method, head: nn.Module, b: Batch) -> tuple[torch.Tensor, int]:
    """(cross-entropy summed over b's label tokens, their count): the forward of SFT, of evaluation and of a
    method's scoring pass (Method.prepare)."""
    hidden = method.hidden_states(model, b.input_ids, b.position_ids, b.attention_mask)
    return label_only_loss_sum(hidden, head, b.targets)


class Objective:
    """Plain supervised fine-tuning: cross-entropy on the label tokens."""

    name = "sft"
    supports_compile = True  # whether the decoder layers may be torch.compiled under this objective

    def prepare(self, batch: Batch, model: nn.Module, method, step: int) -> Batch:
        """The micro-batch to train on at optimizer step `step` (0-based; on the CPU, before it moves to the
        device)."""
        return batch

    def loss_sum(self, model: nn.Module, method, head: nn.Module, b: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """(loss summed over b's target tokens, {part name: summed value} for the metrics log)."""
        return gold_loss_sum(model, method, head, b)[0], {}

    def report(self) -> dict[str, str | int | float]:
        """Rows for the run card; {} for plain SFT."""
        return {}


def build_objective(cfg, tokenizer, stats, device: torch.device, precision: str) -> Objective:
    """SFT, or the distillation objective of cfg.distill (which checks the memory plan, then loads the teacher)."""
    if cfg.distill is None:
        return Objective()
    from ..distill.teacher import DistillError

    d = cfg.distill
    if d.mode == "offline":
        if not d.teacher_data or cfg.data.train != d.teacher_data:
            raise DistillError("distill.mode offline trains on the teacher's responses: run `tunekit distill`, which "
                               "writes them first and then trains on them")
        return Objective()  # plain SFT on the teacher's data
    if cfg.train.plan_check:
        from ..planner import check_teacher_fits

        check_teacher_fits(cfg, stats, device, precision)
    from ..distill.objective import DistillObjective

    return DistillObjective(cfg, tokenizer, device, precision)
