"""LoRA and full fine-tuning against references: the base model, HF peft, a hand-made merge, closed-form counts."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from conftest import LORA_RUN, TINY
from tunekit.config import FullMethod, LoraMethod
from tunekit.engine import train
from tunekit.methods import MethodError, build_method, count_parameters, trainable_named_parameters
from tunekit.methods.lora import resolve_targets
from tunekit.models import load_model

pytestmark = pytest.mark.usefixtures("single_thread")

ATTENTION = ["k_proj", "o_proj", "q_proj", "v_proj"]
MLP = ["down_proj", "gate_proj", "up_proj"]


def in_out() -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each Llama linear layer, from the tiny config alone."""
    h, inter = TINY["hidden_size"], TINY["intermediate_size"]
    kv = TINY["num_key_value_heads"] * h // TINY["num_attention_heads"]
    return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
            "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}


def logits(model, ids) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def base(model_dir):
    return load_model(str(model_dir))


@pytest.mark.parametrize("targets", ["all-linear", "attention", "mlp", ["q_proj", "v_proj"]])
def test_fresh_lora_reproduces_the_base_logits_exactly(tiny_model_dir, prompt_ids, targets):
    expected = logits(base(tiny_model_dir), prompt_ids)
    model = build_method(LoraMethod(r=8, target_modules=targets)).apply(base(tiny_model_dir))
    assert any("lora_A" in n for n, _ in model.named_parameters())
    assert torch.equal(logits(model, prompt_ids), expected)


@pytest.mark.parametrize("preset, names", [("all-linear", sorted(ATTENTION + MLP)), ("attention", ATTENTION),
                                           ("mlp", MLP), (["v_proj", "down_proj"], ["v_proj", "down_proj"])])
def test_presets_resolve_to_llama_module_names(tiny_model_dir, preset, names):
    model = base(tiny_model_dir)
    assert sorted(resolve_targets(model, preset)) == sorted(names)
    peft_model = build_method(LoraMethod(target_modules=preset)).apply(model)
    adapted = {n.split(".")[-1] for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == set(names)
    # Every layer gets them: L layers x len(names) adapted modules.
    n_adapted = sum(1 for _, m in peft_model.named_modules() if hasattr(m, "lora_A"))
    assert n_adapted == TINY["num_hidden_layers"] * len(names)


@pytest.mark.parametrize("r, preset", [(1, "all-linear"), (4, "attention"), (8, "mlp"), (16, ["q_proj", "v_proj"])])
def test_lora_trainable_parameters_closed_form(tiny_model_dir, r, preset):
    names = preset if isinstance(preset, list) else {"all-linear": ATTENTION + MLP, "attention": ATTENTION,
                                                     "mlp": MLP}[preset]
    # Each adapted linear layer adds A (r x in) and B (out x r).
    expected = TINY["num_hidden_layers"] * sum(r * sum(in_out()[n]) for n in names)
    plain_total = sum(p.numel() for p in base(tiny_model_dir).parameters())  # tied embedding counted once
    model = build_method(LoraMethod(r=r, target_modules=preset)).apply(base(tiny_model_dir))
    trainable, total = count_parameters(model)
    assert trainable == expected
    assert total == plain_total + expected
    assert all("lora_" in n for n in trainable_named_parameters(model))


def test_unknown_target_module_lists_the_valid_names(tiny_model_dir):
    with pytest.raises(MethodError) as err:
        build_method(LoraMethod(target_modules=["q_proj", "qkv_proj"])).apply(base(tiny_model_dir))
    msg = str(err.value)
    assert "qkv_proj" in msg
    for name in ATTENTION + MLP:
        assert name in msg
    assert "lm_head" not in msg  # the output head is not a LoRA target


def manual_merge(model_dir, adapter: dict[str, torch.Tensor], scale: float):
    """Base weights + scale * B @ A for every adapted layer, computed by hand in a plain model."""
    model = base(model_dir)
    prefix = "base_model.model."
    done = 0
    with torch.no_grad():
        for key, a in adapter.items():
            if not key.endswith("lora_A.weight"):
                continue
            path = key[len(prefix) : -len(".lora_A.weight")]
            b = adapter[key.replace("lora_A", "lora_B")]
            model.get_submodule(path).weight += scale * (b @ a)
            done += 1
    assert done == TINY["num_hidden_layers"] * 7
    return model


def test_saved_adapter_loads_in_peft_and_matches_a_hand_merge(lora_run, tiny_model_dir, prompt_ids):
    from peft import PeftModel

    adapter = load_file(str(lora_run / "adapter_model.safetensors"))
    assert max(float(t.abs().max()) for k, t in adapter.items() if "lora_B" in k) > 1e-3  # it trained
    scale = LORA_RUN["method.alpha"] / LORA_RUN["method.r"]

    peft_logits = logits(PeftModel.from_pretrained(base(tiny_model_dir), str(lora_run)), prompt_ids)
    merged_logits = logits(manual_merge(tiny_model_dir, adapter, scale), prompt_ids)
    torch.testing.assert_close(peft_logits, merged_logits, rtol=0, atol=1e-5)
    # ... and differ from the base model by far more than that tolerance.
    assert float((peft_logits - logits(base(tiny_model_dir), prompt_ids)).abs().max()) > 1e-2

    # The method's own load and merge agree with the same reference.
    method = build_method(LoraMethod(r=LORA_RUN["method.r"], alpha=LORA_RUN["method.alpha"]))
    loaded = method.load(base(tiny_model_dir), lora_run)
    torch.testing.assert_close(logits(loaded, prompt_ids), merged_logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(logits(method.merge(loaded), prompt_ids), merged_logits, rtol=0, atol=1e-5)


def test_saved_adapter_equals_the_in_memory_weights_at_the_end(lora_run, tiny_model_dir, prompt_ids):
    # The final checkpoint holds the trained in-memory parameters under their in-memory names.
    from peft import PeftModel

    final = lora_run / "checkpoints" / f"step-{LORA_RUN['train.max_steps']:06d}"
    state = load_file(str(final / "trainable.safetensors"))
    method = build_method(LoraMethod(r=LORA_RUN["method.r"], alpha=LORA_RUN["method.alpha"]))
    in_memory = method.apply(base(tiny_model_dir))
    params = dict(in_memory.named_parameters())
    assert set(state) == {n for n, p in params.items() if p.requires_grad}
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor)
    expected = logits(in_memory, prompt_ids)
    got = logits(PeftModel.from_pretrained(base(tiny_model_dir), str(lora_run)), prompt_ids)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_load_for_inference_with_a_run_folder(lora_run, tiny_model_dir, prompt_ids):
    from tunekit.inference import load_for_inference

    adapter = load_file(str(lora_run / "adapter_model.safetensors"))
    expected = logits(manual_merge(tiny_model_dir, adapter, LORA_RUN["method.alpha"] / LORA_RUN["method.r"]),
                      prompt_ids)
    model, tok = load_for_inference(str(tiny_model_dir), adapter=str(lora_run), device="cpu", dtype="float32")
    torch.testing.assert_close(logits(model, prompt_ids), expected, rtol=0, atol=1e-5)
    assert tok.chat_template


# --- full fine-tuning ------------------------------------------------------------------------------


def test_full_method_trains_every_parameter(tiny_model_dir):
    model = build_method(FullMethod()).apply(base(tiny_model_dir))
    trainable, total = count_parameters(model)
    assert trainable == total == sum(p.numel() for p in base(tiny_model_dir).parameters())

    frozen = build_method(FullMethod(freeze_embeddings=True)).apply(base(tiny_model_dir))
    trainable, total = count_parameters(frozen)
    vocab_h = frozen.get_input_embeddings().weight.numel()
    assert trainable == total - vocab_h
    assert not frozen.get_output_embeddings().weight.requires_grad  # tied head frozen with it


def test_full_run_folder_loads_with_transformers(full_run, tiny_model_dir, prompt_ids):
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(str(full_run), dtype=torch.float32)
    assert loaded.get_output_embeddings().weight.data_ptr() == loaded.get_input_embeddings().weight.data_ptr()

    # Every tensor moved away from the base weights (all of them trained) ...
    before = dict(base(tiny_model_dir).named_parameters())
    after = dict(loaded.named_parameters())
    assert before.keys() == after.keys()
    unchanged = [n for n in before if torch.equal(before[n], after[n])]
    assert not unchanged

    # ... and the saved model is exactly the in-memory one at the end (the final checkpoint's weights).
    state = load_file(str(full_run / "checkpoints" / "step-000006" / "trainable.safetensors"))
    reference = base(tiny_model_dir)
    params = dict(reference.named_parameters())
    assert set(state) == set(params)
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor)
    torch.testing.assert_close(logits(loaded, prompt_ids), logits(reference, prompt_ids), rtol=0, atol=1e-5)
    torch.testing.assert_close(logits(build_method(FullMethod()).load(base(tiny_model_dir), full_run), prompt_ids),
                               logits(reference, prompt_ids), rtol=0, atol=1e-5)


def test_full_with_frozen_embeddings_keeps_them_in_a_real_run(tmp_path, make_config, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    cfg = make_config(tmp_path / "run", {"method.name": "full", "method.freeze_embeddings": True,
                                         "train.max_steps": 1, "data.val_fraction": 0.0})
    result = train(cfg)
    assert result.trainable_params == result.total_params - TINY["hidden_size"] * len_vocab(tiny_model_dir)
    loaded = dict(AutoModelForCausalLM.from_pretrained(str(tmp_path / "run"), dtype=torch.float32).named_parameters())
    before = dict(base(tiny_model_dir).named_parameters())
    emb = "model.embed_tokens.weight"
    assert torch.equal(loaded[emb], before[emb])
    assert all(not torch.equal(loaded[n], before[n]) for n in before if n != emb)


def len_vocab(model_dir) -> int:
    return base(model_dir).config.vocab_size
