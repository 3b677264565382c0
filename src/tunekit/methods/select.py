"""Parameter selection ("core vs task-specific parameters"), our own implementation: score every (decoder layer,
linear module) group on a sample of the training data, train the groups that matter most for the task within a
parameter budget, keep the rest ("core") frozen. With `lora_r`, a LoRA of that rank goes on the selected modules
only. Scores and the budget rule: methods/importance.py. `strategy: random | last` are the baselines with the same
budget.

Saved (in the run folder):
    full rank:  tunekit_method.json ({"format": "tunekit", "version": 1, "method": {the select section}, "trained":
                [parameter names], "groups": [selected group keys]}) + tunekit_weights.safetensors (the trained
                tensors); `load` copies them into a fresh base, which is also the merge
    lora_r:     a plain PEFT LoRA adapter whose target_modules are the selected modules' paths
    both:       selection.json (every group: size, score, selected, relative change ‖ΔW‖ / ‖W‖) and selection.png
                (heat maps over layers x module types; methods/select_report.py)
"""

from __future__ import annotations

import json
import time
from itertools import islice
from pathlib import Path

import torch
from torch import nn

from ..config import SelectMethod
from .base import Method, copy_tensors_, read_own_format, save_own_format
from .importance import (Group, budget_for, normalized, parameter_groups, score_groups, select_within_budget,
                         strategy_order)
from .peft_method import attach_peft
from .select_report import SELECTION_FILE, SELECTION_PNG, group_table, summary_rows, write_heatmap


class Select(Method):
    name = "select"
    can_merge = True

    def __init__(self, cfg: SelectMethod):
        self.cfg = cfg
        self.groups: list[Group] = []
        self.scores: list[float] | None = None  # normalised, in self.groups order
        self.scoring: dict = {}  # batches, tokens, seconds
        self.chosen: list[int] = []
        self.budget = 0
        self.initial: dict[str, torch.Tensor] = {}  # full rank: selected weights at apply time (fp32, CPU)
        self.changes: dict[str, float] = {}  # group key -> ‖ΔW‖ / ‖W‖ after training (set by save)

    # --- choosing -------------------------------------------------------------------------------------------
    def prepare(self, model: nn.Module, batches, forward_loss, device: torch.device) -> None:
        cfg = self.cfg
        if cfg.score_batches == 0:
            return
        model.to(device)
        self.groups = parameter_groups(model, cfg.modules)
        t0 = time.perf_counter()
        raw = score_groups(model, self.groups, islice(batches, cfg.score_batches), forward_loss, cfg.importance)
        self.scores = normalized(raw, self.groups, cfg.normalize)
        self.scoring = {"batches": cfg.score_batches, "seconds": time.perf_counter() - t0}
        print(f"[tunekit] select: scored {len(self.groups)} parameter groups ({cfg.importance}) on "
              f"{cfg.score_batches} micro-batches in {self.scoring['seconds']:.0f} s", flush=True)

    def choose(self, model: nn.Module) -> list[Group]:
        """The groups this run trains (scores from prepare() for strategy importance)."""
        cfg = self.cfg
        groups = parameter_groups(model, cfg.modules)
        if self.groups and [g.key for g in groups] != [g.key for g in self.groups]:
            raise RuntimeError("select: apply() got a different model than prepare() scored")
        self.groups = groups
        order = strategy_order(groups, cfg.strategy, self.scores, cfg.seed)
        self.budget = budget_for(groups, cfg.lora_r, cfg.fraction, cfg.max_params)
        self.chosen = select_within_budget(groups, order, self.budget, cfg.lora_r)
        return [groups[i] for i in self.chosen]

    def apply(self, model: nn.Module) -> nn.Module:
        chosen = self.choose(model)
        modules = dict(model.named_modules())
        if self.cfg.lora_r is not None:
            from peft import LoraConfig

            config = LoraConfig(r=self.cfg.lora_r, lora_alpha=self.cfg.lora_alpha, lora_dropout=0.0,
                                target_modules=[g.path for g in chosen], bias="none", task_type="CAUSAL_LM")
            return attach_peft(model, config)  # B = 0: starts at the base model's logits
        keep = {id(p) for g in chosen for p in modules[g.path].parameters(recurse=False)}
        for p in model.parameters():
            p.requires_grad_(id(p) in keep)
        self.initial = {g.key: modules[g.path].weight.detach().float().cpu().clone() for g in chosen}
        return model

    def causal_lm(self, model: nn.Module) -> nn.Module:
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    # --- after training -------------------------------------------------------------------------------------
    def relative_changes(self, model: nn.Module) -> dict[str, float]:
        """||W_after - W_before||_F / ||W_before||_F of every selected group (LoRA: ||scale B A|| / ||W||)."""
        modules = dict(self.causal_lm(model).named_modules())
        out = {}
        with torch.no_grad():
            for i in self.chosen:
                g = self.groups[i]
                module = modules[g.path]
                if self.cfg.lora_r is not None:
                    base_w = module.get_base_layer().weight.float()
                    delta = module.get_delta_weight("default").float()
                else:
                    base_w = self.initial[g.key]
                    delta = module.weight.detach().float().cpu() - base_w
                out[g.key] = float(delta.norm() / base_w.norm().clamp_min(1e-12))
        return out

    def selection(self) -> dict:
        """Everything selection.json holds: settings, budget, and one entry per group."""
        chosen = set(self.chosen)
        rank = {i: r for r, i in enumerate(sorted(range(len(self.groups)), key=lambda i: -self.scores[i]))} \
            if self.scores is not None else {}
        lora_r = self.cfg.lora_r
        return {
            "method": self.cfg.model_dump(mode="json"), "budget": self.budget,
            "trained_params": sum(self.groups[i].cost(lora_r) for i in self.chosen),
            "all_groups_params": sum(g.cost(lora_r) for g in self.groups), "scoring": self.scoring,
            "groups": [{"key": g.key, "layer": g.layer, "module": g.module, "path": g.path, "params": g.params,
                        "cost": g.cost(lora_r), "score": None if self.scores is None else self.scores[i],
                        "rank": rank.get(i), "selected": i in chosen, "relative_change": self.changes.get(g.key)}
                       for i, g in enumerate(self.groups)],
        }

    def save(self, model: nn.Module, out_dir: Path) -> None:
        out_dir = Path(out_dir)
        self.changes = self.relative_changes(model)
        if self.cfg.lora_r is not None:
            model.save_pretrained(out_dir, safe_serialization=True)
        else:
            tensors = {n: p for n, p in model.named_parameters() if p.requires_grad}
            save_own_format(out_dir, self.cfg, tensors, trained=sorted(tensors),
                            groups=[self.groups[i].key for i in self.chosen])
        info = self.selection()
        (out_dir / SELECTION_FILE).write_text(json.dumps(info, indent=2) + "\n")
        write_heatmap(info, out_dir / SELECTION_PNG)

    def load(self, base: nn.Module, path: Path) -> nn.Module:
        path = Path(path)
        if (path / "adapter_config.json").exists():
            from peft import PeftModel

            return PeftModel.from_pretrained(base, path)
        _, tensors = read_own_format(path, self.name)
        copy_tensors_(base, tensors, path)
        return base

    def merge(self, model: nn.Module) -> nn.Module:
        # LoRA: fold B A into W; full rank: the trained tensors already sit in a plain model.
        return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model

    # --- run card -------------------------------------------------------------------------------------------
    def report(self) -> dict[str, str | int | float]:
        return summary_rows(self.selection()) if self.groups else {}

    def card_section(self) -> str:
        return group_table(self.selection()) if self.groups else ""
