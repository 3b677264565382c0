"""The teacher: a frozen model (optionally with an adapter folded in) that scores the student's batches."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..methods.base import packed_attention_kwargs


class DistillError(ValueError):
    """A distillation setup cannot work (different tokenizers, missing teacher, ...); the message says why."""


def check_same_tokenizer(student_tok, teacher_tok, student: str, teacher: str) -> None:
    """Logit and on-policy distillation compare distributions token by token: both models must use one vocabulary."""
    s_vocab, t_vocab = student_tok.get_vocab(), teacher_tok.get_vocab()
    if s_vocab == t_vocab:
        return
    differing = sorted(tok for tok in set(s_vocab) | set(t_vocab) if s_vocab.get(tok) != t_vocab.get(tok))
    examples = ", ".join(f"{tok!r}: student id {s_vocab.get(tok)}, teacher id {t_vocab.get(tok)}"
                         for tok in differing[:3])
    raise DistillError(
        f"student {student} and teacher {teacher} use different tokenizers ({len(s_vocab):,} vs {len(t_vocab):,} "
        f"tokens, {len(differing):,} differ; e.g. {examples}). Logit and on-policy distillation compare the two "
        f"models' next-token distributions over one vocabulary. Use a student with the teacher's tokenizer (tunekit "
        f"shrink makes one from the teacher), or distill.mode offline, which trains on the teacher's text and "
        f"works across tokenizers.")


def load_teacher(name: str, adapter: str | None, device: torch.device, precision: str,
                 attn_implementation: str = "tunekit_sdpa") -> nn.Module:
    """The teacher in eval mode with frozen weights; an adapter is merged in fp32 before the cast to bf16."""
    from ..inference import attach_adapter
    from ..models import load_model

    model = load_model(name, dtype="float32", attn_implementation=attn_implementation, device=device)
    if adapter is not None:
        model = attach_adapter(model, Path(adapter), device, merge=True)
        if hasattr(model, "merge_and_unload"):  # a method that cannot merge stays a PeftModel: use its base
            raise DistillError(f"teacher adapter {adapter}: its method cannot be merged into the weights; merge-able "
                               f"methods (LoRA, IA3, BitFit, freeze, full) can serve as teacher adapters")
    if precision == "bf16":
        model = model.to(torch.bfloat16)  # inference only: the whole teacher in bf16 halves its memory
    model.eval()
    model.requires_grad_(False)
    return model


@torch.no_grad()
def teacher_hidden_states(teacher: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor,
                          attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The teacher's final hidden states (B, T, H_t) for a batch laid out as the student's (packed or padded)."""
    out = teacher.get_decoder()(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                                use_cache=False, **packed_attention_kwargs(position_ids, attention_mask))
    return out.last_hidden_state
