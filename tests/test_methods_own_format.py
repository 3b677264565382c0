"""Bottleneck adapters, BitFit and freeze (our own implementations and file format) against references: the base
model (all start as the identity), closed-form parameter counts, the in-memory model at the end of a run, and
transformers itself for a merged BitFit model."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import torch_globals_preserved
from method_checks import ATTENTION, MLP, H, INTER, L, base, in_out, method_logits, model_logits, \
    perturb_trainable_, perturbed_method, rebuild_from_checkpoint
from tunekit.config import AdapterMethod, BitFitMethod, FreezeMethod
from tunekit.engine import train
from tunekit.methods import MethodError, build_method, count_parameters, load_saved_method, saved_method
from tunekit.methods.base import METHOD_FILE, WEIGHTS_FILE

pytestmark = pytest.mark.usefixtures("single_thread")
STEPS = 4


def adapter_count(bottleneck: int, sites: int) -> int:
    return sites * (H * bottleneck + bottleneck + bottleneck * H + H)  # down (W, b) + up (W, b)


def layer_params() -> int:
    """One decoder layer: 7 linear weights + 2 RMSNorm weights."""
    return sum(i * o for i, o in in_out().values()) + 2 * H


CONFIGS = {
    "adapter": AdapterMethod(bottleneck=8),
    "adapter-pfeiffer": AdapterMethod(bottleneck=8, placement="pfeiffer", activation="gelu"),
    "adapter-silu": AdapterMethod(bottleneck=16, activation="silu"),
    "bitfit": BitFitMethod(),
    "bitfit-attention": BitFitMethod(target_modules="attention"),
    "freeze": FreezeMethod(),
    "freeze-patterns": FreezeMethod(trainable=["layers.0.mlp", "self_attn.*_proj", "norm"]),
    "freeze-embeddings": FreezeMethod(trainable=["layers.0-1.mlp.down_proj"], train_embeddings=True),
}
EXPECTED_TRAINABLE = {
    "adapter": adapter_count(8, 2 * L),  # houlsby: after attention and after the MLP
    "adapter-pfeiffer": adapter_count(8, L),  # after the MLP only
    "adapter-silu": adapter_count(16, 2 * L),
    "bitfit": L * sum(out for _, out in in_out().values()),  # one bias per output of every linear layer
    "bitfit-attention": L * sum(in_out()[n][1] for n in ATTENTION),
    "freeze": layer_params(),  # the last layer
    "freeze-patterns": sum(i * o for n, (i, o) in in_out().items() if n in MLP)  # layer 0's MLP
                       + L * sum(i * o for n, (i, o) in in_out().items() if n in ATTENTION) + H,  # + final norm
    "freeze-embeddings": L * INTER * H,  # + the (tied) embedding, counted below
}


@pytest.mark.parametrize("key", CONFIGS)
def test_trainable_parameters_closed_form(tiny_model_dir, key):
    plain = base(tiny_model_dir)
    plain_total = sum(p.numel() for p in plain.parameters())
    expected = EXPECTED_TRAINABLE[key] + (plain.get_input_embeddings().weight.numel() if key.endswith("embeddings")
                                          else 0)
    added = 0 if key.startswith("freeze") else EXPECTED_TRAINABLE[key]
    assert count_parameters(build_method(CONFIGS[key]).apply(plain)) == (expected, plain_total + added)


@pytest.mark.parametrize("key", CONFIGS)
def test_fresh_method_reproduces_the_base_logits_exactly(tiny_model_dir, prompt_ids, key):
    # Adapters: up-projection zero; BitFit: zero biases added; freeze: nothing added.
    method = build_method(CONFIGS[key])
    assert torch.equal(method_logits(method, method.apply(base(tiny_model_dir)), prompt_ids),
                       model_logits(base(tiny_model_dir), prompt_ids))


@pytest.mark.parametrize("key", CONFIGS)
def test_save_load_round_trip_gives_identical_logits(tiny_model_dir, prompt_ids, tmp_path, key):
    method, model, expected = perturbed_method(CONFIGS[key], tiny_model_dir, prompt_ids)
    assert float((expected - model_logits(base(tiny_model_dir), prompt_ids)).abs().max()) > 1e-3
    method.save(model, tmp_path)
    meta = json.loads((tmp_path / METHOD_FILE).read_text())
    assert (meta["format"], meta["version"], meta["method"]) == ("tunekit", 1, CONFIGS[key].model_dump(mode="json"))
    # Rebuilt from the folder alone (the JSON names the method and its options).
    assert type(saved_method(tmp_path)) is type(method)
    loaded = load_saved_method(base(tiny_model_dir), tmp_path)
    assert torch.equal(model_logits(loaded, prompt_ids), expected)


def test_adapter_file_layout(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    method = build_method(AdapterMethod(bottleneck=8))
    method.save(method.apply(base(tiny_model_dir)), tmp_path)
    meta = json.loads((tmp_path / METHOD_FILE).read_text())
    assert meta["hidden_size"] == H
    assert meta["sites"] == [f"model.layers.{i}.{s}" for i in range(L) for s in ("self_attn", "mlp")]
    tensors = load_file(str(tmp_path / WEIGHTS_FILE))
    assert tensors["model.layers.1.mlp.bottleneck_adapter.down.weight"].shape == (8, H)
    assert tensors["model.layers.1.mlp.bottleneck_adapter.up.weight"].shape == (H, 8)
    assert not tensors["model.layers.1.mlp.bottleneck_adapter.up.weight"].any()  # zero-initialised
    assert len(tensors) == 4 * 2 * L


RUNS = {"adapter": {"method.name": "adapter", "method.bottleneck": 8},
        "bitfit": {"method.name": "bitfit"},
        "freeze": {"method.name": "freeze", "method.trainable": ["layers.1", "norm"]}}


@pytest.mark.parametrize("key", RUNS)
def test_training_lowers_the_eval_loss_and_the_run_folder_loads(tmp_path, make_config, tiny_model_dir, prompt_ids, key):
    from tunekit.inference import load_for_inference

    cfg = make_config(tmp_path / "run", RUNS[key])
    with torch_globals_preserved():
        result = train(cfg)
    assert result.eval_loss_after < result.eval_loss_before
    method = build_method(cfg.method)
    in_memory = rebuild_from_checkpoint(method, tiny_model_dir, tmp_path / "run", STEPS)
    expected = method_logits(method, in_memory, prompt_ids)
    loaded = build_method(cfg.method).load(base(tiny_model_dir), tmp_path / "run")
    assert torch.equal(method_logits(method, loaded, prompt_ids), expected)
    model, _ = load_for_inference(str(tiny_model_dir), adapter=str(tmp_path / "run"), device="cpu", dtype="float32")
    assert torch.equal(model_logits(model, prompt_ids), expected)
    # Only the trained tensors changed; the frozen base is untouched.
    before = dict(base(tiny_model_dir).named_parameters())
    frozen = {n for n, p in in_memory.named_parameters() if not p.requires_grad}
    assert all(torch.equal(p, before[n]) for n, p in in_memory.named_parameters() if n in frozen)
    card = (tmp_path / "run" / "README.md").read_text()
    assert "load_saved_method" in card


@pytest.mark.parametrize("key", ["bitfit", "bitfit-attention", "freeze-patterns", "freeze-embeddings"])
def test_merge_equals_base_plus_the_trained_tensors(tiny_model_dir, prompt_ids, key):
    method, model, expected = perturbed_method(CONFIGS[key], tiny_model_dir, prompt_ids)
    merged = method.merge(model)
    assert type(merged.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    torch.testing.assert_close(model_logits(merged, prompt_ids), expected, rtol=0, atol=1e-5)


def test_merged_bitfit_model_saves_and_reloads_with_transformers(tiny_model_dir, prompt_ids, tmp_path):
    from transformers import AutoModelForCausalLM

    method = build_method(BitFitMethod())
    model = method.apply(base(tiny_model_dir))
    perturb_trainable_(model)
    merged = method.merge(model)
    assert merged.config.attention_bias and merged.config.mlp_bias
    merged.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32)
    assert reloaded.model.layers[1].mlp.down_proj.bias is not None
    torch.testing.assert_close(model_logits(reloaded, prompt_ids), method_logits(method, model, prompt_ids), rtol=0, atol=1e-5)


def test_adapters_cannot_merge(tiny_model_dir):
    method = build_method(AdapterMethod(bottleneck=8))
    with pytest.raises(MethodError, match="cannot be merged"):
        method.merge(method.apply(base(tiny_model_dir)))


def test_bad_options_name_the_valid_values(tiny_model_dir, tmp_path):
    with pytest.raises(MethodError, match=f"larger than the model's hidden size {H}"):
        build_method(AdapterMethod(bottleneck=H + 1)).apply(base(tiny_model_dir))
    with pytest.raises(MethodError) as err:
        build_method(BitFitMethod(target_modules=["q_proj", "qkv"])).apply(base(tiny_model_dir))
    assert "qkv" in str(err.value) and "down_proj" in str(err.value)
    with pytest.raises(MethodError) as err:
        build_method(FreezeMethod(trainable=["layers.0.feed_forward"])).apply(base(tiny_model_dir))
    assert all(w in str(err.value) for w in ("feed_forward", "layers.0 .. layers.1", "mlp", "q_proj", "embed_tokens"))
    with pytest.raises(MethodError, match=r"layers 0..1"):
        build_method(FreezeMethod(trainable=["layers.1-5"])).apply(base(tiny_model_dir))
    with pytest.raises(MethodError, match=r"layers 0..1"):
        build_method(FreezeMethod(trainable=["layers.-3"])).apply(base(tiny_model_dir))
    # A folder of another method is refused with what it holds.
    method = build_method(BitFitMethod())
    method.save(method.apply(base(tiny_model_dir)), tmp_path)
    with pytest.raises(MethodError, match="holds a 'bitfit' result, not 'freeze'"):
        build_method(FreezeMethod()).load(base(tiny_model_dir), tmp_path)


def test_freeze_patterns_match_whole_name_components(tiny_model_dir):
    from tunekit.methods.freeze import expand_layer_spec, pattern_matches

    assert pattern_matches("layers.1", "model.layers.1.mlp.up_proj.weight")
    assert not pattern_matches("layers.1", "model.layers.10.mlp.up_proj.weight")
    assert not pattern_matches("norm", "model.layers.0.input_layernorm.weight")
    assert pattern_matches("self_attn.*_proj", "model.layers.0.self_attn.q_proj.weight")
    assert expand_layer_spec("layers.28-29.mlp", "layers", 30) == ["layers.28.mlp", "layers.29.mlp"]
    assert expand_layer_spec("layers.-1", "layers", 30) == ["layers.29"]
    trained = build_method(FreezeMethod(trainable=["layers.-1"])).trainable_names(base(tiny_model_dir))
    assert trained and all(n.startswith(f"model.layers.{L - 1}.") for n in trained)
