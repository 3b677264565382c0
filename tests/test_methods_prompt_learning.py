"""Prefix tuning, prompt tuning, p-tuning and IA3 (thin mappings onto HF peft) against references: peft's own
forward, closed-form parameter counts, the base model where the method starts as the identity (IA3)."""

from __future__ import annotations

import pytest
import torch

from conftest import torch_globals_preserved
from method_checks import KV, H, INTER, L, base, method_logits, model_logits, perturb_trainable_, \
    perturbed_method, rebuild_from_checkpoint
from tunekit.config import ConfigError, IA3Method, PrefixMethod, PromptMethod, PTuningMethod, load_config
from tunekit.engine import train
from tunekit.methods import MethodError, build_method, count_parameters

pytestmark = pytest.mark.usefixtures("single_thread")
N = 5  # virtual tokens
STEPS = 4

CONFIGS = {
    "prefix": PrefixMethod(num_virtual_tokens=N),
    "prefix-projection": PrefixMethod(num_virtual_tokens=N, projection=True),
    "prompt": PromptMethod(num_virtual_tokens=N),
    "prompt-text": PromptMethod(num_virtual_tokens=N, init="text", init_text="Extract the invoice fields"),
    "ptuning": PTuningMethod(num_virtual_tokens=N),
    "ptuning-lstm": PTuningMethod(num_virtual_tokens=N, encoder="lstm", encoder_hidden=16),
    "ia3": IA3Method(),
}
VIRTUAL = [k for k in CONFIGS if k != "ia3"]


@pytest.fixture(scope="module")
def batch(tokenizer):
    """A right-padded (2, T) batch and its mask: the padded batches these methods train on."""
    texts = ["<|im_start|>user\nInvoice INV-2024-0042 from Northwind Foods, total EUR 1,234.50.<|im_end|>\n",
             "<|im_start|>user\nPay by 3 June<|im_end|>\n"]
    enc = tokenizer(texts, add_special_tokens=False, padding=True, padding_side="right", return_tensors="pt")
    assert enc["attention_mask"][1].sum() < enc["attention_mask"].shape[1]  # the second row really is padded
    return enc["input_ids"], enc["attention_mask"]


def lstm_params(inp: int, hidden: int, layers: int) -> int:
    """Bidirectional nn.LSTM: per layer and direction 4 gates of (in x h + h x h + 2 biases of h)."""
    return sum(2 * 4 * ((inp if i == 0 else 2 * hidden) * hidden + hidden * hidden + 2 * hidden)
               for i in range(layers))


EXPECTED_TRAINABLE = {
    "prefix": N * L * 2 * KV,  # keys and values of every layer, at the key/value width (GQA)
    "prefix-projection": N * KV + (KV * KV + KV) + (KV * L * 2 * KV + L * 2 * KV),  # embedding + 2-layer MLP
    "prompt": N * H,
    "prompt-text": N * H,
    "ptuning": N * H + 3 * (H * H + H),  # embedding + MLP H -> H -> H -> H
    "ptuning-lstm": N * H + lstm_params(H, 16, 2) + (32 * 32 + 32) + (32 * H + H),  # + LSTM + MLP head
    "ia3": L * (KV + KV + INTER),  # k_proj, v_proj outputs; down_proj input (feed-forward)
}


@pytest.mark.parametrize("key", CONFIGS)
def test_trainable_parameters_closed_form(tiny_model_dir, key):
    plain_total = sum(p.numel() for p in base(tiny_model_dir).parameters())
    model = build_method(CONFIGS[key]).apply(base(tiny_model_dir))
    assert count_parameters(model) == (EXPECTED_TRAINABLE[key], plain_total + EXPECTED_TRAINABLE[key])


def test_fresh_ia3_reproduces_the_base_logits_exactly(tiny_model_dir, batch):
    ids, mask = batch
    method = build_method(IA3Method())
    assert torch.equal(method_logits(method, method.apply(base(tiny_model_dir)), ids, mask),
                       model_logits(base(tiny_model_dir), ids, mask))


@pytest.mark.parametrize("key", VIRTUAL)
def test_hidden_states_are_aligned_with_the_input_and_equal_peft_forward(tiny_model_dir, batch, key):
    # Prefix/prompt/p-tuning are not zero-initialised (a fresh prompt already changes the logits), so the
    # reference is peft's own forward, with the virtual positions dropped, compared where the mask is 1.
    ids, mask = batch
    method = build_method(CONFIGS[key])
    model = method.apply(base(tiny_model_dir))
    ours = method_logits(method, model, ids, mask)
    assert ours.shape[:2] == ids.shape
    real = mask.bool()
    torch.testing.assert_close(ours[real], model_logits(model, ids, mask)[real], rtol=0, atol=1e-5)
    assert float((ours - model_logits(base(tiny_model_dir), ids, mask))[real].abs().max()) > 1e-3


def test_prompt_init_text_starts_from_the_texts_embeddings(tiny_model_dir, tokenizer):
    model = build_method(CONFIGS["prompt-text"]).apply(base(tiny_model_dir))
    text_ids = tokenizer("Extract the invoice fields")["input_ids"]
    wanted = (text_ids * N)[:N]
    embedding = model.get_base_model().get_input_embeddings().weight
    torch.testing.assert_close(model.prompt_encoder["default"].embedding.weight, embedding[wanted], rtol=0, atol=0)


@pytest.mark.parametrize("key", CONFIGS)
def test_save_load_and_peft_give_the_same_logits(tiny_model_dir, batch, tmp_path, key):
    from peft import PeftModel

    ids, mask = batch
    method, model, expected = perturbed_method(CONFIGS[key], tiny_model_dir, ids, mask)
    method.save(model, tmp_path)
    loaded = build_method(CONFIGS[key]).load(base(tiny_model_dir), tmp_path)
    # p-tuning saves the encoder's output (one matmul chain fewer at load): fp32 tolerance.
    real = mask.bool()
    torch.testing.assert_close(method_logits(method, loaded, ids, mask)[real], expected[real], rtol=0, atol=1e-5)
    peft = PeftModel.from_pretrained(base(tiny_model_dir), str(tmp_path))
    torch.testing.assert_close(model_logits(peft, ids, mask)[real], expected[real], rtol=0, atol=1e-5)


def test_ia3_merge_equals_the_adapted_model(tiny_model_dir, batch):
    ids, mask = batch
    method = build_method(IA3Method())
    model = method.apply(base(tiny_model_dir))
    perturb_trainable_(model, scale=0.2)
    expected = method_logits(method, model, ids, mask)
    merged = method.merge(model)
    assert not any("ia3" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(model_logits(merged, ids, mask), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("key", ["prefix", "prompt", "ptuning"])
def test_virtual_token_methods_cannot_merge_or_pack(tiny_model_dir, key):
    method = build_method(CONFIGS[key])
    assert method.supports_packing is False
    model = method.apply(base(tiny_model_dir))
    with pytest.raises(MethodError, match="cannot be merged"):
        method.merge(model)
    packed = torch.tensor([[0, 1, 2, 0, 1]])  # two sequences in one row
    with pytest.raises(MethodError, match="packed rows"):
        method.hidden_states(model, torch.ones(1, 5, dtype=torch.long), packed, None)


RUNS = {"prefix": {"method.name": "prefix", "method.num_virtual_tokens": 4, "optim.lr": 0.1},
        "prompt": {"method.name": "prompt", "method.num_virtual_tokens": 4, "optim.lr": 0.1},
        "ptuning": {"method.name": "ptuning", "method.num_virtual_tokens": 4, "optim.lr": 0.01},
        "ia3": {"method.name": "ia3", "optim.lr": 0.1}}


@pytest.mark.parametrize("key", RUNS)
def test_training_lowers_the_eval_loss_and_the_run_folder_loads(tmp_path, make_config, tiny_model_dir, batch,
                                                                capsys, key):
    from peft import PeftModel

    cfg = make_config(tmp_path / "run", RUNS[key])
    assert cfg.data.packing  # asked for; the loop falls back to padded batches where the method cannot pack
    with torch_globals_preserved():
        result = train(cfg)
    assert result.eval_loss_after < result.eval_loss_before
    packs = key == "ia3"
    assert ("cannot train on packed rows: using padded batches" in capsys.readouterr().out) is not packs
    assert f"packing {'on' if packs else 'off'})" in (tmp_path / "run" / "README.md").read_text()

    ids, mask = batch
    method = build_method(cfg.method)
    expected = method_logits(method, rebuild_from_checkpoint(method, tiny_model_dir, tmp_path / "run", STEPS), ids,
                             mask)
    real = mask.bool()
    peft = PeftModel.from_pretrained(base(tiny_model_dir), str(tmp_path / "run"))
    torch.testing.assert_close(model_logits(peft, ids, mask)[real], expected[real], rtol=0, atol=1e-5)


def test_ia3_bad_targets_list_the_valid_names(tiny_model_dir):
    with pytest.raises(MethodError) as err:
        build_method(IA3Method(target_modules=["k_proj", "key"])).apply(base(tiny_model_dir))
    assert "key" in str(err.value) and "down_proj" in str(err.value)
    with pytest.raises(MethodError, match="up_proj are not among the targets"):
        build_method(IA3Method(feedforward_modules=["up_proj"])).apply(base(tiny_model_dir))


def test_ia3_feed_forward_default_is_the_mlp_down_projection(tiny_model_dir):
    method = build_method(IA3Method(target_modules="all-linear"))
    assert method.peft_config(base(tiny_model_dir)).feedforward_modules == {"down_proj"}


def test_prompt_learning_option_errors():
    with pytest.raises(ConfigError, match="init: text and init_text go together"):
        load_config(None, {"method": "prompt", "method.init": "text"})
    with pytest.raises(ConfigError, match="method.num_virtual_tokens"):
        load_config(None, {"method": "prefix", "method.num_virtual_tokens": 0})
    with pytest.raises(ConfigError, match="do not belong to method 'ptuning'"):
        load_config(None, {"method": "ptuning", "method.init_text": "hello"})
