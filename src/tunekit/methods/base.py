"""The one small interface every fine-tuning method implements.

The engine only ever calls these methods; it never branches on a method's name. A method owns: how it
injects itself into a base model, which parameters train, how its result is saved and loaded, and (where
it can) how it folds into the base weights.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import torch
from torch import nn

from ..attention import cu_seq_lens


class MethodError(ValueError):
    """A method cannot do what was asked (bad target, cannot merge, ...); the message says what is valid."""


class Method(ABC):
    name: str

    @abstractmethod
    def apply(self, model: nn.Module) -> nn.Module:
        """Prepare `model` for training: inject modules, set requires_grad. Returns the model to train."""

    @abstractmethod
    def save(self, model: nn.Module, out_dir: Path) -> None:
        """Write the trained result (adapter or full weights) into `out_dir`."""

    @abstractmethod
    def load(self, base: nn.Module, path: Path) -> nn.Module:
        """Attach a saved result to a freshly loaded base model."""

    def merge(self, model: nn.Module) -> nn.Module:
        """Fold the method into plain base weights (zero inference overhead)."""
        raise MethodError(f"method {self.name!r} cannot be merged into the base weights")

    def causal_lm(self, model: nn.Module) -> nn.Module:
        """The underlying transformers *ForCausalLM (with the method's layers injected)."""
        return model

    def hidden_states(
        self, model: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Final hidden states (B, T, H) before the LM head; methods that change the forward override this."""
        decoder = self.causal_lm(model).get_decoder()
        out = decoder(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, use_cache=False,
                      **packed_attention_kwargs(position_ids, attention_mask))
        return out.last_hidden_state

    def lm_head(self, model: nn.Module) -> nn.Module:
        return self.causal_lm(model).get_output_embeddings()


def packed_attention_kwargs(position_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> dict:
    """Sequence boundaries of a packed (1, T) row, in the keywords varlen attention kernels read."""
    if attention_mask is not None or position_ids.shape[0] != 1:
        return {}
    cu = cu_seq_lens(position_ids)
    longest = int((cu[1:] - cu[:-1]).max())
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def trainable_named_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def cast_frozen_linears_(model: nn.Module, dtype: torch.dtype) -> int:
    """Store frozen nn.Linear weights in `dtype` (mutates `model`); returns how many were cast.

    Under bf16 autocast every linear layer casts its fp32 weight to bf16 on each call, forward and backward.
    Storing frozen weights in bf16 once gives bit-identical matmuls without the per-step copies and halves
    their memory. Weights shared with the input embedding (tied LM heads) stay as they are, so embedding
    lookups and the residual stream keep their precision.
    """
    embedding = model.get_input_embeddings().weight if hasattr(model, "get_input_embeddings") else None
    cast = 0
    for module in model.modules():
        if type(module) is not nn.Linear or module.weight is embedding:
            continue
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            continue
        module.to(dtype)
        cast += 1
    return cast


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights are counted once."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total
