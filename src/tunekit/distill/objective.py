"""The loop's objective for online distillation: logit KD on the gold data, or on-policy on the student's samples.

logit      loss = alpha * CE(gold) + (1 - alpha) * T^2 * D(teacher || student) on the label positions
           (Hinton et al. 2015; D selectable, see losses.py); with kd_on=all, D also on the prompt tokens.
on-policy  the student samples a completion for each prompt of the micro-batch; the teacher scores exactly those
           tokens; loss = D(teacher || student) per sampled position, reverse KL by default: GKD with lambda = 1
           (Agarwal et al. 2023, "On-Policy Distillation of Language Models"), or with on_policy_loss=sampled the
           per-token reverse KL of the sampled tokens as a policy gradient (on-policy distillation, Thinking
           Machines 2025). on_policy_fraction < 1 mixes in gold micro-batches scored as in logit mode.
"""

from __future__ import annotations

import random
from dataclasses import replace
from types import SimpleNamespace

import torch
from torch import nn

from ..engine.batching import IGNORE, Batch, collate_packed, collate_padded
from ..engine.device import autocast
from ..engine.objective import Objective
from ..inference import left_padded, stop_token_ids, tokenizer_source
from .losses import KDSpec, kd_loss_sum
from .teacher import DistillError, check_same_tokenizer, load_teacher, teacher_hidden_states


def sequences_of(batch: Batch) -> list[tuple[list[int], list[int]]]:
    """(input_ids, targets) of every sequence in a packed (1, T) or right-padded (B, T) batch."""
    out = []
    for row in range(batch.input_ids.shape[0]):
        ids, tgt, pos = (t[row].tolist() for t in (batch.input_ids, batch.targets, batch.position_ids))
        n = int(batch.attention_mask[row].sum()) if batch.attention_mask is not None else len(ids)
        starts = [i for i in range(n) if pos[i] == 0] + [n]
        out += [(ids[a:b], tgt[a:b]) for a, b in zip(starts, starts[1:])]
    return out


def prompt_of(ids: list[int], targets: list[int]) -> list[int]:
    """The tokens before the first completion token: targets[t] != IGNORE means token t+1 is a label."""
    first = next((t for t, x in enumerate(targets) if x != IGNORE), None)
    return ids if first is None else ids[: first + 1]


class DistillObjective(Objective):
    name = "distill"

    def __init__(self, cfg, tokenizer, device: torch.device, precision: str):
        from ..models import load_tokenizer

        d = cfg.distill
        if not d.teacher:
            raise DistillError("distill.teacher is not set: name the teacher model (alias, folder, .gguf or hub id)")
        self.cfg, self.mode, self.tokenizer = d, d.mode, tokenizer
        divergence = d.divergence if d.divergence != "auto" else ("reverse_kl" if d.mode == "on-policy"
                                                                   else "forward_kl")
        # Gold micro-batches (logit mode, and the off-policy share of on-policy mode).
        self.gold_spec = KDSpec(divergence, d.alpha, d.temperature, d.beta)
        # Student samples: no gold label exists, so no CE term.
        self.sample_spec = KDSpec(divergence, 0.0, d.temperature, d.beta, sampled=d.on_policy_loss == "sampled")
        self.supports_compile = d.mode != "on-policy"  # generation with a KV cache would recompile the layers
        check_same_tokenizer(tokenizer, load_tokenizer(tokenizer_source(d.teacher, d.teacher_adapter)), cfg.model.name,
                             d.teacher)
        self.device, self.precision = device, precision
        self.teacher = load_teacher(d.teacher, d.teacher_adapter, device, precision, cfg.model.attn_implementation)
        self.t_head = self.teacher.get_output_embeddings()
        self.stop_ids = stop_token_ids(tokenizer)
        self.n_sampled = self.n_gold = 0

    # --- on-policy: replace the gold completions with the student's samples -------------------------------------
    def prepare(self, batch: Batch, model: nn.Module, method, step: int) -> Batch:
        # Before on_policy_warmup_steps the student learns from gold batches only (GKD starts from a student that
        # was first fine-tuned on the task: a student that cannot yet answer samples noise the teacher cannot fix).
        warming_up = step < self.cfg.on_policy_warmup_steps
        if self.mode != "on-policy" or warming_up or random.random() >= self.cfg.on_policy_fraction:
            self.n_gold += 1
            return batch
        self.n_sampled += 1
        prompts = [prompt_of(ids, tgt) for ids, tgt in sequences_of(batch)]
        completions = self.sample(model, method, prompts)
        examples = [SimpleNamespace(input_ids=p + c, labels=[IGNORE] * len(p) + c) for p, c in zip(prompts, completions)]
        new = collate_packed(examples) if batch.attention_mask is None else collate_padded(examples,
                                                                                          self.tokenizer.pad_token_id)
        new.sampled = True
        return new

    @torch.no_grad()
    def sample(self, model: nn.Module, method, prompts: list[list[int]]) -> list[list[int]]:
        """One sampled completion per prompt from the student as it is now (eval mode: no dropout)."""
        generator = model if hasattr(model, "generate") else method.causal_lm(model)
        pad = self.tokenizer.pad_token_id
        ids, mask = left_padded(prompts, pad)
        width = ids.shape[1]
        was_training = model.training
        model.eval()
        try:
            with autocast(self.device, self.precision):
                out = generator.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                         max_new_tokens=self.cfg.max_new_tokens, do_sample=True,
                                         temperature=self.cfg.sample_temperature, top_p=1.0, top_k=0,
                                         eos_token_id=self.stop_ids, pad_token_id=pad)
        finally:
            model.train(was_training)
        completions = []
        for row in out[:, width:].tolist():
            end = next((i + 1 for i, t in enumerate(row) if t in self.stop_ids), len(row))  # keep the stop token
            completions.append(row[:end])
        return completions

    # --- the loss ----------------------------------------------------------------------------------------------
    def loss_sum(self, model: nn.Module, method, head: nn.Module, b: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        if type(head) is not nn.Linear or type(self.t_head) is not nn.Linear:
            raise DistillError(f"distillation needs plain linear LM heads; the {method.name} method replaced the "
                               f"student's head with {type(head).__name__}")
        labelled = b.targets != IGNORE  # (B, T)
        spec = self.sample_spec if b.sampled else self.gold_spec
        keep = labelled
        if self.cfg.kd_on == "all" and not b.sampled:
            # Every real token, prompt included: the teacher's distribution there is free extra signal that repairs
            # a damaged (shrunk) student's language model; scaled so the KD sum counts as many tokens as the labels.
            keep = b.attention_mask.bool() if b.attention_mask is not None else torch.ones_like(labelled)
            spec = replace(spec, kd_scale=float(labelled.sum()) / max(1, int(keep.sum())))
        hidden = method.hidden_states(model, b.input_ids, b.position_ids, b.attention_mask)[keep]  # (N, H)
        t_hidden = teacher_hidden_states(self.teacher, b.input_ids, b.position_ids, b.attention_mask)[keep]  # (N, H_t)
        loss_sum, parts = kd_loss_sum(hidden, head, t_hidden, self.t_head, b.targets[keep], spec)
        return loss_sum, parts

    def report(self) -> dict[str, str | int | float]:
        d = self.cfg
        rows: dict[str, str | int | float] = {
            "Distillation": d.mode,
            "Teacher": d.teacher + (f" + {d.teacher_adapter}" if d.teacher_adapter else ""),
            "Divergence": self.gold_spec.divergence + (f" (beta={d.beta})" if self.gold_spec.divergence == "jsd" else ""),
            "KD temperature": d.temperature,
            "KD on": "completion tokens" if d.kd_on == "completion" else "all tokens (prompt too) of gold batches",
        }
        if d.mode == "logit" or d.on_policy_fraction < 1:
            rows["CE weight alpha"] = d.alpha
        if d.mode == "on-policy":
            rows["On-policy loss"] = d.on_policy_loss
            rows["Micro-batches sampled / gold"] = f"{self.n_sampled} / {self.n_gold}"
            if d.on_policy_warmup_steps:
                rows["Gold-only warm-up steps"] = d.on_policy_warmup_steps
        return rows

