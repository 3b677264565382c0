"""P-tuning (Liu et al. 2021, https://arxiv.org/abs/2103.10385) through HF peft: virtual token embeddings produced
by a small trained encoder (MLP or bidirectional LSTM) and prepended to every input. peft saves the encoder's
output, so a loaded adapter is a fixed prompt (no encoder).
"""

from __future__ import annotations

from torch import nn

from ..config import PTuningMethod
from .prompt_learning import VirtualTokenInputs


class PTuning(VirtualTokenInputs):
    name = "ptuning"

    cfg: PTuningMethod  # set by the base class's __init__

    def peft_config(self, model: nn.Module):
        from peft import PromptEncoderConfig

        return PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=self.cfg.num_virtual_tokens,
                                   encoder_reparameterization_type=self.cfg.encoder.upper(),
                                   encoder_hidden_size=self.cfg.encoder_hidden,
                                   encoder_num_layers=self.cfg.encoder_layers,
                                   encoder_dropout=self.cfg.encoder_dropout)
