"""torch.compile of the decoder layers: same training as eager within float tolerance, and clear skips."""

from __future__ import annotations

import json

import pytest
import torch

from tunekit.engine import train
from tunekit.engine.compile import compile_decoder_layers_

pytestmark = pytest.mark.usefixtures("single_thread")


def losses(run_dir) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if "loss" in r]


def test_compiled_run_trains_like_eager(make_config, tmp_path):
    """Fused kernels change rounding, not the math: the loss curve of a compiled run follows the eager one."""
    eager = train(make_config(tmp_path / "eager", {"train.compile": "off"}))
    compiled = train(make_config(tmp_path / "compiled", {"train.compile": "on"}))
    assert eager.steps == compiled.steps
    torch.testing.assert_close(torch.tensor(losses(tmp_path / "compiled")), torch.tensor(losses(tmp_path / "eager")),
                               rtol=1e-3, atol=1e-4)


def test_auto_skips_short_runs_and_off_does_nothing(tiny_model_dir):
    from tunekit.models import load_model

    model = load_model(str(tiny_model_dir))
    assert "not used" in compile_decoder_layers_(model, "auto", torch.device("cpu"), True, steps=10)
    assert compile_decoder_layers_(model, "off", torch.device("cpu"), True, steps=10_000) == "torch.compile off"
    assert "skipped" in compile_decoder_layers_(model, "auto", torch.device("cpu"), False, steps=10_000)
    with pytest.raises(RuntimeError, match="cannot be used"):
        compile_decoder_layers_(model, "on", torch.device("cpu"), False, steps=10)
    assert not any(hasattr(layer, "_compiled_call_impl") and layer._compiled_call_impl for layer in model.model.layers)


def test_auto_keeps_the_fused_lora_branch_and_on_restores_peft_forward(tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    from tunekit.methods.lora_kernel import fast_forward, use_fast_lora_
    from tunekit.models import load_model

    model = get_peft_model(load_model(str(tiny_model_dir)), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    n = use_fast_lora_(model)
    assert n > 0
    lm = model.get_base_model()
    assert "not used" in compile_decoder_layers_(lm, "auto", torch.device("cpu"), True, steps=10_000,
                                                 fused_lora_layers=n)

    def fused() -> int:
        return sum(getattr(m.__dict__.get("forward"), "__func__", None) is fast_forward for m in lm.modules())

    assert fused() == n
    note = compile_decoder_layers_(lm, "on", torch.device("cpu"), True, steps=10, fused_lora_layers=n)
    assert f"restored on {n} layers" in note and fused() == 0  # one shared graph, not one per layer
    torch._dynamo.reset()
