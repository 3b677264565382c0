"""Prefix tuning (Li & Liang 2021, https://arxiv.org/abs/2101.00190) through HF peft: trained keys and values
for `num_virtual_tokens` extra positions in every attention layer; optionally reparameterised by an MLP while
training. For grouped-query attention the prefix has the key/value width (num_key_value_heads x head_dim).
"""

from __future__ import annotations

from torch import nn

from ..config import PrefixMethod
from .prompt_learning import PromptLearning


class PrefixTuning(PromptLearning):
    name = "prefix"

    cfg: PrefixMethod  # set by the base class's __init__

    def peft_config(self, model: nn.Module):
        from peft import PrefixTuningConfig

        return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=self.cfg.num_virtual_tokens,
                                  prefix_projection=self.cfg.projection,
                                  encoder_hidden_size=self.cfg.projection_hidden)

    def hidden_states(self, model, input_ids, position_ids, attention_mask):
        self.check_unpacked(position_ids)
        B, T = input_ids.shape
        # A fresh cache already holding the prefix keys/values of every layer (peft builds it per call).
        cache = model.get_prompt(B, max_cache_len=T + self.n_virtual)
        out = self.causal_lm(model).get_decoder()(
            input_ids=input_ids, position_ids=position_ids + self.n_virtual, past_key_values=cache,
            # Always a mask: the query (T) and key (n + T) lengths differ, and an absent mask would make SDPA
            # align its causal triangle to the top-left corner.
            attention_mask=self.virtual_mask(input_ids, attention_mask),
        )
        return out.last_hidden_state  # (B, T, H): the prefix lives only in the cache
