"""The CUDA paths: training, QLoRA 4-bit, 8-bit and paged AdamW, the planner against a measured CUDA peak.

Skipped where torch sees no GPU (CI, the 2-core development machine); `benchmarks/gpu/run.sh` runs them on a
lent GPU before the CUDA benchmark.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")

CUDA = {"train.device": "cuda", "train.precision": "bf16", "train.threads": None}


@pytest.mark.parametrize("packing", [True, False])
def test_lora_trains_on_cuda_and_the_adapter_loads_in_peft(make_config, tmp_path, tiny_model_dir, packing):
    from peft import PeftModel

    from tunekit.engine import train
    from tunekit.models import load_model

    cfg = make_config(tmp_path / "run", {**CUDA, "method.name": "lora", "method.r": 4, "train.max_steps": 8,
                                         "data.packing": packing})
    result = train(cfg)
    assert result.device.startswith("cuda") and result.precision == "bf16"
    assert result.eval_loss_after < result.eval_loss_before
    assert 0 < result.peak_memory_bytes < torch.cuda.get_device_properties(0).total_memory
    model = PeftModel.from_pretrained(load_model(str(tiny_model_dir)), tmp_path / "run")
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) == result.trainable_params


@needs_bnb
@pytest.mark.parametrize("optim", ["adamw_8bit", "paged_adamw", "paged_adamw_8bit"])
def test_bitsandbytes_optimizers_train_on_cuda(make_config, tmp_path, optim):
    from tunekit.engine import train

    result = train(make_config(tmp_path / optim, {**CUDA, "method.name": "lora", "optim.name": optim,
                                                  "train.max_steps": 8}))
    assert result.eval_loss_after < result.eval_loss_before


@needs_bnb
def test_qlora_on_cuda_quantizes_trains_and_reports_bits(make_config, tmp_path):
    from tunekit.engine import train

    result = train(make_config(tmp_path / "q", {**CUDA, "method.name": "qlora", "train.max_steps": 8}))
    assert result.eval_loss_after < result.eval_loss_before
    card = (tmp_path / "q" / "README.md").read_text()
    bits = float(card.split("Bits per quantized weight")[1].split("|")[1])
    assert 4.1 < bits < 4.2  # NF4 + double-quantized scales: 4.127 for 64-weight blocks


def test_plan_is_within_15_percent_of_the_measured_cuda_peak(tmp_path):
    """The planner's CUDA prediction against the run's torch.cuda.max_memory_allocated: SmolLM2-135M's shape
    (random weights: only memory matters) on the demo invoices, LoRA r16 on every linear, batch 8."""
    from tunekit.config import load_config
    from tunekit.demo.invoices import write_demo_dataset
    from tunekit.engine import train
    from tunekit.models import resolve_model_path

    data = write_demo_dataset(tmp_path / "data", n_train=64, n_test=8)
    shape = f"{resolve_model_path('smollm2-135m')}/config.json"
    cfg = load_config(None, {**CUDA, "model.name": f"random:{shape}", "data.train": str(data["train"]),
                             "data.val_fraction": 0.0, "method.name": "lora", "method.r": 16,
                             "method.target_modules": "all-linear", "train.batch_size": 8, "train.max_steps": 3,
                             "train.output_dir": str(tmp_path / "run"), "train.progress": False,
                             "train.energy": False, "train.save_every": 0, "train.eval_every": 0})
    result = train(cfg)
    assert result.planned_peak_bytes, "the run made no plan"
    ratio = result.planned_peak_bytes / result.peak_memory_bytes
    print(f"plan {result.planned_peak_bytes / 2**30:.3f} GiB, measured {result.peak_memory_bytes / 2**30:.3f} GiB, "
          f"ratio {ratio:.3f}")
    assert 0.85 <= ratio <= 1.15, f"plan {result.planned_peak_bytes:,} vs measured {result.peak_memory_bytes:,}"
