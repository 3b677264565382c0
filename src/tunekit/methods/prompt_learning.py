"""What prefix tuning, prompt tuning and p-tuning share: peft's prompt-learning models, and a forward that
hands the loop hidden states aligned with its input.

These methods prepend `num_virtual_tokens` positions: prompt tuning and p-tuning as input embeddings, prefix
tuning as extra keys/values in every layer. `hidden_states` runs the decoder the way peft's
`PeftModelForCausalLM.forward` does (same positions, same attention mask), then drops the virtual positions, so
the result is (B, T, H) like every other method's and the loss code is unchanged. A packed row (several sequences
in one row, attention split by cu_seq_lens) has no place for one prompt per sequence: `supports_packing` is
False, and the loop feeds padded batches instead. Nothing here is zero-initialised: a fresh prompt changes the
logits. The saved result is plain PEFT format; it cannot be merged into the base weights.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import MethodError
from .peft_method import PeftMethod


class PromptLearning(PeftMethod):
    supports_packing = False
    can_merge = False

    @property
    def n_virtual(self) -> int:
        return self.cfg.num_virtual_tokens

    def merge(self, model: nn.Module) -> nn.Module:
        raise MethodError(f"method {self.name!r} adds virtual tokens, not weights: it cannot be merged into the base "
                          f"model; serve the run folder as an adapter instead (tunekit generate --adapter RUN_DIR, or "
                          f"PeftModel.from_pretrained(base, RUN_DIR))")

    def virtual_mask(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """(B, n_virtual + T) attention mask: the virtual positions are always visible."""
        B, T = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones(B, T, dtype=torch.long, device=input_ids.device)
        ones = torch.ones(B, self.n_virtual, dtype=attention_mask.dtype, device=attention_mask.device)
        return torch.cat([ones, attention_mask], dim=1)

    def check_unpacked(self, position_ids: torch.Tensor) -> None:
        T = position_ids.shape[1]
        if not torch.equal(position_ids, torch.arange(T, device=position_ids.device).expand_as(position_ids)):
            raise MethodError(f"method {self.name!r} needs one sequence per row (positions 0..T-1); it cannot "
                              f"train on packed rows")


class VirtualTokenInputs(PromptLearning):
    """Prompt tuning and p-tuning: virtual token embeddings in front of the input embeddings."""

    def hidden_states(self, model, input_ids, position_ids, attention_mask):
        self.check_unpacked(position_ids)
        lm = self.causal_lm(model)
        embeds = lm.get_input_embeddings()(input_ids)  # (B, T, H)
        prompts = model.get_prompt(batch_size=input_ids.shape[0]).to(embeds.dtype)  # (B, n, H)
        # Positions 0..n+T-1 over prompt + input, as in peft (which ignores position_ids for these methods).
        out = lm.get_decoder()(inputs_embeds=torch.cat([prompts, embeds], dim=1),
                               attention_mask=self.virtual_mask(input_ids, attention_mask), use_cache=False)
        return out.last_hidden_state[:, self.n_virtual:]  # (B, n + T, H) -> (B, T, H)
