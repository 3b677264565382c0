"""Helpers shared by the method tests: fresh tiny base models, logits through a Method, closed-form shapes."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from conftest import TINY
from tunekit.models import load_model

ATTENTION = ["k_proj", "o_proj", "q_proj", "v_proj"]
MLP = ["down_proj", "gate_proj", "up_proj"]
L, H, INTER = TINY["num_hidden_layers"], TINY["hidden_size"], TINY["intermediate_size"]
KV = TINY["num_key_value_heads"] * H // TINY["num_attention_heads"]  # key/value width (grouped-query attention)


def in_out() -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each Llama linear layer, from the tiny config alone."""
    return {"q_proj": (H, H), "k_proj": (H, KV), "v_proj": (H, KV), "o_proj": (H, H),
            "gate_proj": (H, INTER), "up_proj": (H, INTER), "down_proj": (INTER, H)}


def base(model_dir):
    return load_model(str(model_dir))


def method_logits(method, model, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T, V) logits the way the training loop computes them: method.hidden_states, then the LM head."""
    model.eval()
    B, T = ids.shape
    with torch.no_grad():
        hidden = method.hidden_states(model, ids, torch.arange(T).expand(B, T), mask)
        return method.lm_head(model)(hidden)


def model_logits(model, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T, V) logits of model(...) itself; the virtual-token positions peft prepends are dropped."""
    model.eval()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).logits
    return out[:, out.shape[1] - ids.shape[1]:]


def perturb_trainable_(model, scale: float = 0.05, seed: int = 1) -> None:
    """Move every trainable tensor by seeded noise (mutates `model`): a stand-in for training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def perturbed_method(cfg, model_dir, ids: torch.Tensor, mask: torch.Tensor | None = None):
    """(method, model, logits) of a freshly applied method whose trainable tensors were moved by seeded noise."""
    from tunekit.methods import build_method

    method = build_method(cfg)
    model = method.apply(base(model_dir))
    perturb_trainable_(model)
    return method, model, method_logits(method, model, ids, mask)


def final_state(run_dir: Path, steps: int) -> dict[str, torch.Tensor]:
    return load_file(str(Path(run_dir) / "checkpoints" / f"step-{steps:06d}" / "trainable.safetensors"))


def rebuild_from_checkpoint(method, model_dir, run_dir: Path, steps: int):
    """A freshly applied method with the final checkpoint's trainable tensors: the in-memory model at the end."""
    model = method.apply(base(model_dir))
    state = final_state(run_dir, steps)
    params = dict(model.named_parameters())
    assert set(state) == {n for n, p in params.items() if p.requires_grad}
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor)
    return model
