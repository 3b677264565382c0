"""Prompt tuning (Lester et al. 2021, https://arxiv.org/abs/2104.08691) through HF peft: `num_virtual_tokens`
trainable embeddings in front of every input, started from random vectors, random vocabulary embeddings, or the
embeddings of `init_text` (tokenized with the base model's tokenizer, repeated or cut to length).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..config import PromptMethod
from .base import MethodError
from .prompt_learning import VirtualTokenInputs

PEFT_INITS = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "TEXT"}


class PromptTuning(VirtualTokenInputs):
    name = "prompt"

    cfg: PromptMethod  # set by the base class's __init__

    def peft_config(self, model: nn.Module):
        from peft import PromptTuningConfig

        tokenizer = None
        if self.cfg.init == "text":
            tokenizer = getattr(model, "name_or_path", None)
            if not tokenizer or not (Path(tokenizer) / "tokenizer_config.json").exists():
                raise MethodError(f"prompt init: text needs the base model's tokenizer next to its weights; "
                                  f"{tokenizer!r} has none (use init: random or vocab)")
        return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=self.cfg.num_virtual_tokens,
                                  prompt_tuning_init=PEFT_INITS[self.cfg.init],
                                  prompt_tuning_init_text=self.cfg.init_text, tokenizer_name_or_path=tokenizer)
