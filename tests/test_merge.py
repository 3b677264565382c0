"""`tunekit merge`: the merged model is a plain transformers folder whose logits equal base + adapter."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from method_checks import base, perturb_trainable_
from tunekit.config import config_to_yaml
from tunekit.merging import merge
from tunekit.methods import MethodError, build_method

IDS = torch.tensor([[1, 15, 27, 300, 4000, 9, 12, 77], [5, 6, 7, 8, 9, 10, 11, 12]])


def fake_run(make_config, tiny_model_dir, out: Path, method: dict) -> Path:
    """A run folder as training leaves it (config.yaml + the method's saved result), with seeded 'trained' values."""
    cfg = make_config(out, {f"method.{k}": v for k, v in method.items()})
    m = build_method(cfg.method)
    model = m.apply(base(tiny_model_dir))
    perturb_trainable_(model, scale=0.05)
    out.mkdir(parents=True, exist_ok=True)
    m.save(model, out)
    (out / "config.yaml").write_text(config_to_yaml(cfg))
    return out


def reference_logits(cfg_method: dict, tiny_model_dir, run: Path, make_config) -> torch.Tensor:
    """base + adapter, unmerged, loaded the way the method loads its run folder."""
    m = build_method(make_config(run, {f"method.{k}": v for k, v in cfg_method.items()}).method)
    model = m.load(base(tiny_model_dir), run)
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


def merged_logits(out: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)  # plain transformers, no tunekit/peft code involved
    model.eval()
    assert not any("lora" in n or "ia3" in n for n, _ in model.named_parameters())
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


MERGEABLE = {
    "lora": {"name": "lora", "r": 4, "alpha": 8.0},
    "dora": {"name": "lora", "r": 4, "alpha": 8.0, "dora": True},
    "rslora": {"name": "lora", "r": 4, "rslora": True, "target_modules": "attention"},
    "ia3": {"name": "ia3"},
    "bitfit_partial": {"name": "bitfit", "target_modules": ["q_proj", "down_proj"]},
    "freeze": {"name": "freeze", "trainable": ["layers.1.mlp", "norm"]},
}


@pytest.mark.parametrize("case", sorted(MERGEABLE))
def test_merged_logits_equal_base_plus_adapter(case, tmp_path, tiny_model_dir, make_config):
    run = fake_run(make_config, tiny_model_dir, tmp_path / "run", MERGEABLE[case])
    expected = reference_logits(MERGEABLE[case], tiny_model_dir, run, make_config)
    result = merge(str(run), str(tmp_path / "merged"), quiet=True)
    assert result.base_model == str(tiny_model_dir)
    out = Path(result.out_dir)
    assert (out / "model.safetensors").exists() and (out / "tokenizer_config.json").exists()
    got = merged_logits(out)
    assert (got - expected).abs().max() < 1e-4
    base_logits = merged_logits(tiny_model_dir)
    assert (expected - base_logits).abs().max() > 1e-3  # the adapter did change something


def test_qlora_merges_into_the_dequantized_base_and_says_so(tmp_path, tiny_model_dir, make_config, capsys):
    pytest.importorskip("bitsandbytes")
    spec = {"name": "qlora", "r": 4, "compute_dtype": "float32"}
    run = fake_run(make_config, tiny_model_dir, tmp_path / "run", spec)
    expected = reference_logits(spec, tiny_model_dir, run, make_config)  # the 4-bit base + adapter
    result = merge(str(run), str(tmp_path / "merged"))
    assert "dequantized" in capsys.readouterr().out
    assert "dequantized" in result.note
    got = merged_logits(Path(result.out_dir))
    assert (got - expected).abs().max() < 1e-4
    from safetensors.torch import load_file

    tensors = load_file(str(Path(result.out_dir) / "model.safetensors"))
    assert all(t.dtype == torch.float32 for t in tensors.values())  # never 4-bit


def test_merge_to_bfloat16(tmp_path, tiny_model_dir, make_config):
    run = fake_run(make_config, tiny_model_dir, tmp_path / "run", MERGEABLE["lora"])
    result = merge(str(run), str(tmp_path / "merged"), dtype="bfloat16", quiet=True)
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(str(Path(result.out_dir) / "model.safetensors")).values()} == {torch.bfloat16}


@pytest.mark.parametrize("spec", [{"name": "prefix", "num_virtual_tokens": 3}, {"name": "prompt", "num_virtual_tokens": 3},
                                  {"name": "adapter", "bottleneck": 8}])
def test_methods_that_cannot_merge_say_how_to_serve(spec, tmp_path, tiny_model_dir, make_config):
    run = fake_run(make_config, tiny_model_dir, tmp_path / "run", spec)
    with pytest.raises(MethodError, match=r"cannot be merged.*--adapter"):
        merge(str(run), str(tmp_path / "merged"), quiet=True)
    assert not (tmp_path / "merged").exists()


def test_load_for_inference_merge_falls_back_for_prompt_methods(tmp_path, tiny_model_dir, make_config, capsys):
    from tunekit.inference import load_for_inference

    run = fake_run(make_config, tiny_model_dir, tmp_path / "run", {"name": "prefix", "num_virtual_tokens": 3})
    model, _ = load_for_inference(str(tiny_model_dir), str(run), device="cpu", dtype="float32", merge=True)
    assert "cannot be merged" in capsys.readouterr().err
    assert hasattr(model, "peft_config")  # still the adapter, unmerged


def test_merge_cli_and_bad_input(tmp_path, tiny_model_dir, make_config, capsys):
    from tunekit.cli import main

    run = fake_run(make_config, tiny_model_dir, tmp_path / "run", MERGEABLE["ia3"])
    assert main(["merge", "--adapter", str(run), "--out", str(tmp_path / "m")]) == 0
    assert "merged model:" in capsys.readouterr().out
    assert main(["merge", "--adapter", str(tmp_path / "nope"), "--out", str(tmp_path / "m2")]) == 2
    assert "not found" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["merge", "--adapter", str(empty), "--out", str(tmp_path / "m3")]) == 2
    assert "not a tunekit run folder" in capsys.readouterr().err
