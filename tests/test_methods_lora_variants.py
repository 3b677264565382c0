"""LoRA variants (rsLoRA, DoRA, inits, per-module ranks) and QLoRA against references: the base model, HF peft,
closed-form parameter counts, and bits per weight measured from the stored 4-bit tensors."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import torch_globals_preserved
from method_checks import ATTENTION, KV, MLP, H, INTER, L, base, in_out, method_logits, model_logits, \
    perturbed_method, rebuild_from_checkpoint
from tunekit.config import ConfigError, LoraMethod, QLoraMethod, load_config
from tunekit.engine import train
from tunekit.methods import MethodError, build_method, count_parameters

pytestmark = pytest.mark.usefixtures("single_thread")
STEPS = 4


def lora_count(r: int, names=ATTENTION + MLP, ranks: dict[str, int] | None = None) -> int:
    """Each adapted layer adds A (r x in) and B (out x r); `ranks` overrides r per leaf name."""
    return L * sum((ranks or {}).get(n, r) * sum(in_out()[n]) for n in names)


# --- LoRA variants ---------------------------------------------------------------------------------------------

EXACT_INITS = [{}, {"init": "gaussian"}, {"dora": True}, {"rslora": True},
               {"rank_pattern": {"down_proj": 2, "q_proj": 6}, "alpha_pattern": {"k_proj": 3.0}}]
# PiSSA / OLoRA move the top part of W into A, B (W = W_res + s B A): the base is rebuilt up to fp32 rounding.
# Orthogonal init has B A = 0 only in exact arithmetic (products of orthogonal rows), likewise.
BASE_REBUILDING_INITS = [{"init": "pissa"}, {"init": "pissa_niter_4"}, {"init": "olora"}, {"init": "orthogonal"}]


@pytest.mark.parametrize("options", EXACT_INITS, ids=str)
def test_fresh_lora_variant_reproduces_the_base_logits_exactly(tiny_model_dir, prompt_ids, options):
    expected = model_logits(base(tiny_model_dir), prompt_ids)
    method = build_method(LoraMethod(r=4, **options))
    assert torch.equal(method_logits(method, method.apply(base(tiny_model_dir)), prompt_ids), expected)


@pytest.mark.parametrize("options", BASE_REBUILDING_INITS, ids=str)
def test_pissa_olora_orthogonal_start_at_the_base_logits_within_fp32(tiny_model_dir, prompt_ids, options):
    expected = model_logits(base(tiny_model_dir), prompt_ids)
    method = build_method(LoraMethod(r=4, **options))
    model = method.apply(base(tiny_model_dir))
    got = method_logits(method, model, prompt_ids)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    if options["init"] != "orthogonal":  # the base weights really were rewritten
        q = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
        assert not torch.equal(q, base(tiny_model_dir).model.layers[0].self_attn.q_proj.weight)


@pytest.mark.parametrize("options, expected", [
    ({}, lora_count(4)),
    ({"rslora": True}, lora_count(4)),
    ({"init": "pissa"}, lora_count(4)),
    ({"dora": True}, lora_count(4) + L * sum(out for _, out in in_out().values())),  # + magnitude per output row
    ({"rank_pattern": {"down_proj": 2, "q_proj": 6}}, lora_count(4, ranks={"down_proj": 2, "q_proj": 6})),
    ({"rank_pattern": {"layers.0.self_attn.q_proj": 8}}, lora_count(4) + 4 * sum(in_out()["q_proj"])),
], ids=str)
def test_lora_variant_trainable_parameters_closed_form(tiny_model_dir, options, expected):
    plain_total = sum(p.numel() for p in base(tiny_model_dir).parameters())
    model = build_method(LoraMethod(r=4, **options)).apply(base(tiny_model_dir))
    assert count_parameters(model) == (expected, plain_total + expected)


def test_rslora_and_alpha_pattern_set_the_scaling(tiny_model_dir):
    model = build_method(LoraMethod(r=4, alpha=8.0, rslora=True, alpha_pattern={"v_proj": 2.0})).apply(
        base(tiny_model_dir))
    layers = model.get_base_model().model.layers[0].self_attn
    assert layers.q_proj.scaling["default"] == pytest.approx(8.0 / math.sqrt(4))
    assert layers.v_proj.scaling["default"] == pytest.approx(2.0 / math.sqrt(4))


@pytest.mark.parametrize("options", EXACT_INITS + BASE_REBUILDING_INITS, ids=str)
def test_lora_variant_save_load_peft_and_merge_agree(tiny_model_dir, prompt_ids, tmp_path, options):
    from peft import PeftModel

    method, model, expected = perturbed_method(LoraMethod(r=4, **options), tiny_model_dir, prompt_ids)
    method.save(model, tmp_path)
    # PiSSA/OLoRA adapters are saved converted to plain LoRA (rank 2r) on the *original* base: fp32 tolerance.
    atol = 1e-5 if "init" in options and options["init"] != "gaussian" else 0
    loaded = build_method(LoraMethod(r=4, **options)).load(base(tiny_model_dir), tmp_path)
    torch.testing.assert_close(method_logits(method, loaded, prompt_ids), expected, rtol=0, atol=atol)
    peft = PeftModel.from_pretrained(base(tiny_model_dir), str(tmp_path))
    torch.testing.assert_close(model_logits(peft, prompt_ids), expected, rtol=0, atol=atol)
    merged = method.merge(loaded)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(model_logits(merged, prompt_ids), expected, rtol=0, atol=5e-5)  # fp32 rounding of W + BA; 1.2e-5 seen
    assert float((expected - model_logits(base(tiny_model_dir), prompt_ids)).abs().max()) > 1e-3  # the adapter matters


def test_pissa_adapter_is_saved_as_plain_lora_of_twice_the_rank(tiny_model_dir, tmp_path):
    import json

    method = build_method(LoraMethod(r=4, alpha=8.0, init="pissa"))
    method.save(method.apply(base(tiny_model_dir)), tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (8, 16.0, True)
    a = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert a["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (8, H)


@pytest.mark.parametrize("options", [{"dora": True}, {"init": "pissa"},
                                     {"rslora": True, "rank_pattern": {"q_proj": 2}}], ids=str)
def test_lora_variant_training_lowers_the_eval_loss(tmp_path, make_config, tiny_model_dir, prompt_ids, options):
    overrides = {"method.name": "lora", "method.r": 4, **{f"method.{k}": v for k, v in options.items()}}
    result = train(make_config(tmp_path / "run", overrides))
    assert result.eval_loss_after < result.eval_loss_before
    # The run folder (PiSSA: converted adapter) reproduces the in-memory model of the last step.
    method = build_method(LoraMethod(r=4, **options))
    expected = method_logits(method, rebuild_from_checkpoint(method, tiny_model_dir, tmp_path / "run", STEPS), prompt_ids)
    loaded = method.load(base(tiny_model_dir), tmp_path / "run")
    torch.testing.assert_close(method_logits(method, loaded, prompt_ids), expected, rtol=0, atol=1e-5)


def test_rank_above_a_layers_size_names_the_layer_and_the_limit(tiny_model_dir):
    with pytest.raises(MethodError) as err:
        build_method(LoraMethod(r=KV + 1)).apply(base(tiny_model_dir))
    assert "k_proj" in str(err.value) and f"at most {KV}" in str(err.value)
    with pytest.raises(MethodError, match="at most 32"):
        build_method(LoraMethod(r=4, rank_pattern={"v_proj": 64})).apply(base(tiny_model_dir))


def test_pattern_key_that_matches_no_adapted_layer_is_an_error(tiny_model_dir):
    with pytest.raises(MethodError, match="'gate' matches no adapted layer"):
        build_method(LoraMethod(rank_pattern={"gate": 2})).apply(base(tiny_model_dir))
    with pytest.raises(MethodError, match="alpha_pattern key 'down_proj'"):
        build_method(LoraMethod(target_modules="attention", alpha_pattern={"down_proj": 2.0})).apply(
            base(tiny_model_dir))


def test_unsupported_lora_combinations_fail_before_training(tiny_model_dir):
    with pytest.raises(MethodError, match="dora"):
        build_method(LoraMethod(init="pissa", dora=True)).apply(base(tiny_model_dir))
    with pytest.raises(MethodError, match="rank_pattern"):
        build_method(LoraMethod(r=4, init="olora", rslora=True, rank_pattern={"q_proj": 2})).apply(base(tiny_model_dir))
    with pytest.raises(ConfigError) as err:
        load_config(None, {"method.init": "loftq"})
    assert "default, gaussian, orthogonal, pissa, olora, pissa_niter_<n>" in str(err.value)
    with pytest.raises(ConfigError, match="method.rank_pattern"):
        load_config(None, {"method.rank_pattern": {"q_proj": 0}})


# --- QLoRA -----------------------------------------------------------------------------------------------------


@pytest.fixture
def bnb():
    return pytest.importorskip("bitsandbytes")


def qlora(**options) -> QLoraMethod:
    return QLoraMethod(r=4, compute_dtype="float32", **options)


def expected_bits(n_weights: int, block: int, double_quant: bool) -> float:
    """Bits per weight of one layer: 4-bit codes + scales (fp32 per block; or uint8 per block + fp32 per 256
    blocks + one fp32 offset with double quantization)."""
    blocks = math.ceil(n_weights / block)
    scales = 8 * blocks + 32 * math.ceil(blocks / 256) + 32 if double_quant else 32 * blocks
    return (4 * n_weights + scales) / n_weights


@pytest.mark.parametrize("double_quant, quant_type, block", [(True, "nf4", 64), (False, "nf4", 64),
                                                             (True, "fp4", 64), (False, "nf4", 128)])
def test_qlora_bits_per_weight_measured_from_the_stored_tensors(bnb, tiny_model_dir, double_quant, quant_type,
                                                                block):
    from tunekit.methods.qlora import quantization_stats

    method = build_method(qlora(double_quant=double_quant, quant_type=quant_type, block_size=block))
    model = method.apply(base(tiny_model_dir))
    sizes = [i * o for i, o in in_out().values()] * L
    expected = sum(expected_bits(n, block, double_quant) * n for n in sizes) / sum(sizes)
    assert method.stats["weights"] == sum(sizes)
    assert method.stats["bits_per_weight"] == pytest.approx(expected, rel=1e-9)
    assert quantization_stats(model) == method.stats
    # On a layer of realistic size the overhead is QLoRA's: 0.127 bits (double quant) or 0.5 bits (fp32 scales).
    big = torch.nn.Sequential(torch.nn.Linear(2048, 2048, bias=False))
    big.get_output_embeddings = lambda: None
    from tunekit.methods.qlora import quantize_linears_

    quantize_linears_(big, qlora(double_quant=double_quant, block_size=64))
    bits = quantization_stats(big)["bits_per_weight"]
    assert bits == pytest.approx(4 + 8 / 64 + 32 / (64 * 256) if double_quant else 4.5, abs=1e-4)
    assert bits == pytest.approx(4.127 if double_quant else 4.5, abs=1e-3)


def test_qlora_layer_returns_the_autocast_dtype_with_bitsandbytes_values(bnb):
    """Under bf16 autocast tunekit's 4-bit layer returns bf16 (as nn.Linear does; bitsandbytes returns the input's
    fp32, which doubles what autograd saves downstream) with exactly bitsandbytes' values; outside autocast it is
    bitsandbytes' layer."""
    from tunekit.methods.qlora import quantize_linears_

    torch.manual_seed(0)
    ours = torch.nn.Sequential(torch.nn.Linear(128, 64))
    ours.get_output_embeddings = lambda: None
    quantize_linears_(ours, QLoraMethod(r=4, compute_dtype="bfloat16"))
    layer = ours[0]
    theirs = bnb.nn.Linear4bit(128, 64, compute_dtype=torch.bfloat16, quant_type="nf4", device="meta")
    theirs.weight, theirs.bias, theirs.support_avx512bf16_for_cpu = layer.weight, layer.bias, False
    x = torch.randn(5, 128, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = layer(x), theirs(x)
    assert got.dtype == torch.bfloat16 and want.dtype == torch.float32
    assert torch.equal(got.float(), want)
    got.float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert torch.equal(layer(x), theirs(x))


def test_qlora_quantizes_every_linear_but_the_head_and_reports_memory(bnb, tiny_model_dir):
    method = build_method(qlora())
    plain = base(tiny_model_dir)
    plain_total = sum(p.numel() for p in plain.parameters())
    model = method.apply(plain)
    quantized = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == L * 7
    assert not isinstance(model.get_base_model().get_output_embeddings(), bnb.nn.Linear4bit)
    # Trainable = LoRA's closed form; the total counts each 4-bit weight once (not per packed byte).
    assert count_parameters(model) == (lora_count(4), plain_total + lora_count(4))
    # Memory: fp32 linear weights out; 4-bit codes + scales + the per-layer codebooks (16 + 256 values) in.
    n = L * sum(i * o for i, o in in_out().values())
    stored = n * (method.stats["bits_per_weight"] + method.stats["codebook_bits_per_weight"]) / 8
    assert method.stats["codebook_bits_per_weight"] * n == 32 * (16 + 256) * L * 7
    assert method.memory_before - method.memory_after == pytest.approx(4 * n - stored, abs=1e-6)
    report = method.report()
    assert report["Bits per quantized weight"] == round(method.stats["bits_per_weight"], 4)
    assert "MiB before quantization" in report["Model memory"]


def test_qlora_forward_and_backward_match_the_dequantized_layer(bnb, tiny_model_dir):
    from tunekit.methods.qlora import dequantize_linears_, quantize_linears_

    model = base(tiny_model_dir)
    quantize_linears_(model, qlora())
    layer = model.model.layers[0].mlp.down_proj
    reference = torch.nn.Sequential(torch.nn.Linear(INTER, H, bias=False))
    reference[0].weight.data = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    x = torch.randn(3, 5, INTER, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    torch.testing.assert_close(layer(x), reference(x_ref), rtol=0, atol=1e-5)
    layer(x).square().sum().backward()
    reference(x_ref).square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=1e-4)  # gradients reach LoRA layers below
    # A no-grad eval pass keeps the stored 4-bit weights (bitsandbytes' CPU inference repacking is off).
    before = layer.weight.data.clone()
    layer.eval()
    with torch.no_grad():
        layer(x.detach())
    assert torch.equal(layer.weight.data, before) and layer.weight.quant_state.nested
    assert dequantize_linears_(model) == L * 7


def test_fresh_qlora_reproduces_the_quantized_base_exactly(bnb, tiny_model_dir, prompt_ids):
    from tunekit.methods.qlora import quantize_linears_

    quantized = base(tiny_model_dir)
    quantize_linears_(quantized, qlora())
    method = build_method(qlora())
    assert torch.equal(method_logits(method, method.apply(base(tiny_model_dir)), prompt_ids), model_logits(quantized, prompt_ids))


def test_qlora_bf16_compute_runs_close_to_fp32(bnb, tiny_model_dir, prompt_ids):
    fp32 = build_method(qlora())
    bf16 = build_method(QLoraMethod(r=4, compute_dtype="bfloat16"))
    a = method_logits(fp32, fp32.apply(base(tiny_model_dir)), prompt_ids)
    b = method_logits(bf16, bf16.apply(base(tiny_model_dir)), prompt_ids)
    assert b.dtype == torch.float32 and 0 < float((a - b).abs().max()) < 0.05


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory, make_config):
    pytest.importorskip("bitsandbytes")
    out = tmp_path_factory.mktemp("qlora-run") / "run"
    overrides = {"method.name": "qlora", "method.r": 4, "method.compute_dtype": "float32"}
    with torch_globals_preserved():
        result = train(make_config(out, overrides))
    return result, out


def test_qlora_training_lowers_the_eval_loss_and_reports_on_the_card(qlora_run):
    result, out = qlora_run
    assert result.eval_loss_after < result.eval_loss_before
    card = (out / "README.md").read_text()
    assert "| Bits per quantized weight | 4.137 |" in card and "MiB before quantization" in card


def test_qlora_adapter_loads_in_peft_on_a_quantized_base(bnb, qlora_run, tiny_model_dir, prompt_ids):
    from peft import PeftModel

    from tunekit.methods.qlora import quantize_linears_

    _, out = qlora_run
    method = build_method(qlora())
    expected = method_logits(method, rebuild_from_checkpoint(method, tiny_model_dir, out, STEPS), prompt_ids)
    quantized = base(tiny_model_dir)
    quantize_linears_(quantized, qlora())
    torch.testing.assert_close(model_logits(PeftModel.from_pretrained(quantized, str(out)), prompt_ids), expected,
                               rtol=0, atol=1e-5)
    loaded = build_method(qlora()).load(base(tiny_model_dir), out)
    torch.testing.assert_close(method_logits(method, loaded, prompt_ids), expected, rtol=0, atol=1e-5)
    # Merge: dequantized base + adapter as one plain fp32 model.
    merged = build_method(qlora()).merge(loaded)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in merged.modules())
    torch.testing.assert_close(model_logits(merged, prompt_ids), expected, rtol=0, atol=1e-5)


def test_qlora_rejects_inits_that_rewrite_the_base(bnb, tiny_model_dir):
    with pytest.raises(MethodError, match="default, gaussian or orthogonal"):
        build_method(QLoraMethod(init="pissa")).apply(base(tiny_model_dir))


@pytest.mark.slow
def test_qlora_on_the_real_model_stores_4_127_bits_per_weight(bnb, tokenizer):
    # SmolLM2-135M: 30 layers x 7 linear layers quantized, the tied embedding kept.
    from tunekit.models import load_model

    text = "<|im_start|>user\nInvoice INV-2024-0042 from Northwind Foods, total EUR 1,234.50.<|im_end|>\n"
    prompt_ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    plain = load_model("smollm2-135m")
    reference = float(model_logits(plain, prompt_ids).log_softmax(-1)[0, :-1].gather(-1, prompt_ids[0, 1:, None]).mean())
    method = build_method(qlora())
    model = method.apply(plain)
    assert method.stats["bits_per_weight"] == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=2e-4)
    assert method.memory_after < 0.32 * method.memory_before  # ~513 MiB -> ~161 MiB
    quantized = float(method_logits(method, model, prompt_ids).log_softmax(-1)[0, :-1].gather(-1, prompt_ids[0, 1:, None]).mean())
    assert abs(quantized - reference) < 0.1 * abs(reference)  # NF4 keeps the model close to itself
