"""Several adapters on one base (tunekit.adapters): switch, disable, delete, combine, save."""

from __future__ import annotations

import pytest
import torch

from method_checks import base, perturb_trainable_
from tunekit.adapters import AdapterSet
from tunekit.config import IA3Method, LoraMethod
from tunekit.methods import MethodError, build_method

IDS = torch.tensor([[1, 15, 27, 300, 4000, 9, 12, 77]])


def saved_adapter(tiny_model_dir, out, cfg, seed: int):
    m = build_method(cfg)
    model = m.apply(base(tiny_model_dir))
    perturb_trainable_(model, scale=0.1, seed=seed)
    m.save(model, out)
    return out


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("adapters")
    lora = LoraMethod(r=4, alpha=8.0)
    return {"a": saved_adapter(tiny_model_dir, root / "a", lora, 1),
            "b": saved_adapter(tiny_model_dir, root / "b", lora, 2),
            "r8": saved_adapter(tiny_model_dir, root / "r8", LoraMethod(r=8), 3),
            "ia3": saved_adapter(tiny_model_dir, root / "ia3", IA3Method(), 4)}


def alone(tiny_model_dir, folder) -> torch.Tensor:
    from peft import PeftModel

    model = PeftModel.from_pretrained(base(tiny_model_dir), str(folder)).eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


def base_logits(tiny_model_dir) -> torch.Tensor:
    with torch.no_grad():
        return base(tiny_model_dir).eval()(input_ids=IDS).logits.float()


def two_loras(tiny_model_dir, folders) -> AdapterSet:
    aset = AdapterSet(base(tiny_model_dir))
    aset.load("a", folders["a"])
    aset.load("b", folders["b"])
    return aset


def test_switch_disable_delete(tiny_model_dir, folders):
    aset = two_loras(tiny_model_dir, folders)
    assert aset.names == ["a", "b"] and aset.active == "b"
    ref_a, ref_b = alone(tiny_model_dir, folders["a"]), alone(tiny_model_dir, folders["b"])
    assert (ref_a - ref_b).abs().max() > 1e-3
    aset.use("a")
    assert torch.allclose(aset.logits(IDS), ref_a, atol=1e-6)
    aset.use("b")
    assert torch.allclose(aset.logits(IDS), ref_b, atol=1e-6)
    with aset.disabled():
        assert torch.allclose(aset.logits(IDS), base_logits(tiny_model_dir), atol=1e-6)
    assert torch.allclose(aset.logits(IDS), ref_b, atol=1e-6)  # enabled again after the block
    aset.delete("b")
    assert aset.names == ["a"] and aset.active == "a"
    assert torch.allclose(aset.logits(IDS), ref_a, atol=1e-6)
    with pytest.raises(MethodError, match="no adapter named 'b'; loaded adapters: a"):
        aset.use("b")


def test_linear_with_weights_one_zero_is_the_first_adapter(tiny_model_dir, folders, tmp_path):
    aset = two_loras(tiny_model_dir, folders)
    aset.combine("mix", {"a": 1.0, "b": 0.0}, how="linear")
    assert aset.active == "mix"
    ref_a = alone(tiny_model_dir, folders["a"])
    assert torch.allclose(aset.logits(IDS), ref_a, atol=1e-5)
    out = aset.save("mix", tmp_path / "mix")
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    assert torch.allclose(alone(tiny_model_dir, out), ref_a, atol=1e-5)  # a normal PEFT adapter folder


def test_cat_is_the_exact_weighted_sum(tiny_model_dir, folders):
    """cat stacks the ranks: its delta is exactly w_a B_a A_a s_a + w_b B_b A_b s_b (checked through merging)."""
    aset = two_loras(tiny_model_dir, folders)
    aset.combine("sum", {"a": 0.7, "b": 0.3}, how="cat")
    got = aset.logits(IDS)
    lm = aset.model.base_model.model
    layer = lm.model.layers[0].self_attn.q_proj
    delta = layer.get_delta_weight("sum")
    expected = 0.7 * layer.get_delta_weight("a") + 0.3 * layer.get_delta_weight("b")
    assert torch.allclose(delta, expected, atol=1e-6)
    assert got.isfinite().all()


@pytest.mark.parametrize("how", ["ties", "dare_ties", "dare_linear", "ties_svd"])
def test_ties_and_dare_give_a_loadable_adapter(how, tiny_model_dir, folders, tmp_path):
    torch.manual_seed(0)  # DARE drops entries at random
    aset = two_loras(tiny_model_dir, folders)
    aset.combine("merged", {"a": 0.5, "b": 0.5}, how=how, density=0.5)
    out = aset.save("merged", tmp_path / how)
    logits = alone(tiny_model_dir, out)
    assert logits.isfinite().all()
    assert (logits - base_logits(tiny_model_dir)).abs().max() > 1e-4


def test_errors(tiny_model_dir, folders):
    aset = two_loras(tiny_model_dir, folders)
    with pytest.raises(MethodError, match="IA3 adapter but the loaded ones .* are LORA"):
        aset.load("c", folders["ia3"])
    with pytest.raises(MethodError, match="already loaded"):
        aset.load("a", folders["a"])
    with pytest.raises(MethodError, match="unknown combination 'mean'; choose one of: linear, cat"):
        aset.combine("x", {"a": 0.5, "b": 0.5}, how="mean")
    with pytest.raises(MethodError, match="needs a density"):
        aset.combine("x", {"a": 0.5, "b": 0.5}, how="ties")
    with pytest.raises(MethodError, match="no adapter named 'zz'"):
        aset.combine("x", {"a": 0.5, "zz": 0.5})
    aset.load("r8", folders["r8"])
    with pytest.raises(MethodError, match="needs equal ranks"):
        aset.combine("x", {"a": 0.5, "r8": 0.5}, how="linear")
    aset.combine("x", {"a": 0.5, "r8": 0.5}, how="cat")  # different ranks are fine for cat


def test_ia3_combines_linearly(tiny_model_dir, folders):
    aset = AdapterSet(base(tiny_model_dir))
    aset.load("i", folders["ia3"])
    with pytest.raises(MethodError, match="IA3 adapters combine only linearly"):
        aset.combine("x", {"i": 1.0}, how="ties", density=0.5)
    aset.combine("same", {"i": 1.0})
    assert torch.allclose(aset.logits(IDS), alone(tiny_model_dir, folders["ia3"]), atol=1e-6)


def test_cli_combine(tiny_model_dir, folders, tmp_path, capsys):
    from tunekit.cli import main

    out = tmp_path / "combined"
    argv = ["adapters", "combine", "--base", str(tiny_model_dir), "--adapter", f"a={folders['a']}",
            "--adapter", f"b={folders['b']}", "--how", "ties", "--weights", "0.5", "0.5", "--density", "0.5",
            "--out", str(out)]
    assert main(argv) == 0
    assert (out / "adapter_config.json").exists() and (out / "tokenizer_config.json").exists()
    assert main(argv[:-2] + ["--weights", "1", "--out", str(tmp_path / "x")]) == 2
    assert "one weight per adapter" in capsys.readouterr().err
