"""The loss and its accumulation, against references that do not use tunekit's loss code.

References: cross-entropy from the model's full logits, transformers' own `labels=` loss, and one AdamW
step computed by hand from the gradient of transformers' loss.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import short_chat_records, write_jsonl
from tunekit.config import DataConfig, FullMethod
from tunekit.data import prepare_data
from tunekit.engine import train
from tunekit.engine.batching import IGNORE, collate_padded
from tunekit.engine.loss import full_logits_loss_sum, label_only_loss_sum, token_weighted_mean
from tunekit.methods import build_method
from tunekit.models import load_model

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def examples(tokenizer, chat_jsonl):
    return prepare_data(DataConfig(train=str(chat_jsonl), val_fraction=0.0, max_length=512), tokenizer).train


def hf_labels(exs, width: int) -> torch.Tensor:
    """Unshifted HF labels, right-padded with -100 (transformers shifts them itself)."""
    labels = torch.full((len(exs), width), IGNORE, dtype=torch.long)
    for i, e in enumerate(exs):
        labels[i, : len(e.labels)] = torch.tensor(e.labels)
    return labels


@pytest.mark.parametrize("train_on", ["completion", "all"])
def test_label_only_loss_matches_full_logits_and_transformers(tiny_model_dir, tokenizer, chat_jsonl, train_on):
    exs = prepare_data(DataConfig(train=str(chat_jsonl), val_fraction=0.0, train_on=train_on), tokenizer).train[:3]
    model = load_model(str(tiny_model_dir)).eval()
    method = build_method(FullMethod())
    b = collate_padded(exs, tokenizer.pad_token_id)

    with torch.no_grad():
        hidden = method.hidden_states(model, b.input_ids, b.position_ids, b.attention_mask)
        ours, n = label_only_loss_sum(hidden, method.lm_head(model), b.targets)
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits  # (B, T, V)
        full, n_full = full_logits_loss_sum(logits, b.targets)
        hf = model(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=hf_labels(exs, b.input_ids.shape[1]))

    # By hand: -log p(next token) at every labelled next position, in float64.
    logp = torch.log_softmax(logits.double(), dim=-1)
    manual, count = 0.0, 0
    for i, e in enumerate(exs):
        for t in range(len(e.labels) - 1):
            if e.labels[t + 1] != IGNORE:
                manual -= float(logp[i, t, e.labels[t + 1]])
                count += 1

    assert n == n_full == count == b.n_targets
    expected_count = sum(sum(label != IGNORE for label in e.labels[1:]) for e in exs)
    assert count == expected_count
    assert float(ours) == pytest.approx(manual, rel=1e-6)
    assert float(full) == pytest.approx(manual, rel=1e-6)
    assert float(ours) / n == pytest.approx(float(hf.loss), rel=1e-6)  # transformers: mean over its shifted labels


def test_label_only_loss_has_the_gradient_of_the_full_loss(tiny_model_dir, examples, tokenizer):
    b = collate_padded(examples[:2], tokenizer.pad_token_id)
    grads = []
    for variant in ("label_only", "full"):
        model = load_model(str(tiny_model_dir))
        method = build_method(FullMethod())
        method.apply(model)
        if variant == "label_only":
            hidden = method.hidden_states(model, b.input_ids, b.position_ids, b.attention_mask)
            loss, _ = label_only_loss_sum(hidden, method.lm_head(model), b.targets)
        else:
            loss, _ = full_logits_loss_sum(model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits,
                                           b.targets)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    # fp32, different summation order (chunked head gradient): equal to ~1e-7 relative of the largest entries
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6)


def test_token_weighted_mean():
    # 10 over 4 tokens and 3 over 1 token: 13 / 5, not the mean of the means (2.5 + 3) / 2.
    assert token_weighted_mean([10.0, 3.0], [4, 1]) == pytest.approx(2.6)
    assert token_weighted_mean([1.0, 2.0, 3.0], [1, 1, 1]) == pytest.approx(2.0)
    assert math.isnan(token_weighted_mean([], []))


# --- accumulation through the real training loop ---------------------------------------------------

LR, EPS = 1.0, 1e-3  # a large eps keeps AdamW's first update proportional to the gradient, not just its sign


@pytest.fixture(scope="module")
def four_records(tmp_path_factory):
    # Four chats whose completions have different token counts, so a per-micro-batch mean would differ
    # from the token-weighted mean.
    return write_jsonl(tmp_path_factory.mktemp("acc") / "four.jsonl", short_chat_records(4, seed=3))


@pytest.fixture(scope="module")
def accumulation_runs(tmp_path_factory, make_config, four_records):
    runs = {}
    for bs, ga in [(4, 1), (2, 2), (1, 4)]:
        out = tmp_path_factory.mktemp("acc") / f"bs{bs}-ga{ga}"
        cfg = make_config(out, {
            "data.val_fraction": 0.0, "train.batch_size": bs, "train.grad_accum": ga, "train.max_steps": 1,
            "optim.lr": LR, "optim.eps": EPS, "optim.schedule": "constant", "optim.max_grad_norm": None,
            "method.name": "lora", "method.r": 4, "method.alpha": 8.0,
        }, train_file=four_records)
        train(cfg)
        runs[(bs, ga)] = out
    return runs


def lora_grads_at_zero_b(model_dir, run_dir, exs, pad_id, per_example: bool):
    """Gradient of transformers' token-mean loss w.r.t. lora_B at B = 0 (A from the run: step 1 leaves A
    unchanged, as dL/dA = 0 while B = 0). Either for the whole batch or one dict per example."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_model(str(model_dir)), str(run_dir), is_trainable=True)
    b_params = {n.replace(".default", ""): p for n, p in model.named_parameters() if "lora_B" in n}
    with torch.no_grad():
        for p in b_params.values():
            p.zero_()
    groups = [[e] for e in exs] if per_example else [exs]
    out = []
    for group in groups:
        batch = collate_padded(group, pad_id)
        loss = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                     labels=hf_labels(group, batch.input_ids.shape[1])).loss
        model.zero_grad()
        loss.backward()
        out.append({n: p.grad.clone() for n, p in b_params.items()})
    return out, float(loss.detach())


def adam_first_step(grad: torch.Tensor) -> torch.Tensor:
    """AdamW's first update from zero: m_hat = g, v_hat = g^2 (bias-corrected), no weight decay."""
    return -LR * grad / (grad.abs() + EPS)


def test_accumulation_splits_give_the_same_update(accumulation_runs, tiny_model_dir, tokenizer, four_records):
    exs = prepare_data(DataConfig(train=str(four_records), val_fraction=0.0), tokenizer).train
    assert len(exs) == 4 and len({e.n_label_tokens for e in exs}) > 1
    (whole,), mean_loss = lora_grads_at_zero_b(tiny_model_dir, accumulation_runs[(4, 1)], exs,
                                               tokenizer.pad_token_id, per_example=False)

    adapters = {k: load_file(str(run / "adapter_model.safetensors")) for k, run in accumulation_runs.items()}
    for split, adapter in adapters.items():
        b_keys = [k for k in adapter if "lora_B" in k]
        assert sorted(b_keys) == sorted(whole)
        for key in b_keys:
            torch.testing.assert_close(adapter[key], adam_first_step(whole[key]), rtol=1e-4, atol=1e-5,
                                       msg=lambda m: f"{split} {key}: {m}")
        # The step's logged loss is the token-weighted mean over the 4 examples, whatever the split.
        logged = [json.loads(line) for line in (accumulation_runs[split] / "metrics.jsonl").read_text().splitlines()]
        assert [r["loss"] for r in logged if "loss" in r] == [pytest.approx(mean_loss, rel=1e-6)]

    # The test can tell: averaging each micro-batch on its own (then over micro-batches) moves B visibly.
    per_ex, _ = lora_grads_at_zero_b(tiny_model_dir, accumulation_runs[(4, 1)], exs, tokenizer.pad_token_id,
                                     per_example=True)
    wrong = {k: sum(g[k] for g in per_ex) / len(per_ex) for k in whole}
    gap = max(float((adam_first_step(wrong[k]) - adam_first_step(whole[k])).abs().max()) for k in whole)
    assert gap > 1e-2, gap


def test_one_step_changes_only_lora_b(accumulation_runs, tiny_model_dir):
    # With B = 0 the gradient w.r.t. A is exactly zero, so the first step must leave A as initialised: the
    # three runs (same seed) hold the same A, and B moved away from zero.
    adapters = [load_file(str(run / "adapter_model.safetensors")) for run in accumulation_runs.values()]
    for key in adapters[0]:
        if "lora_A" in key:
            assert all(torch.equal(adapters[0][key], a[key]) for a in adapters[1:])
        else:
            assert float(adapters[0][key].abs().max()) > 1e-3


def _reference_ce(h, weight, bias, targets):
    """Plain F.linear + fp32 cross-entropy over all rows at once (what linear_cross_entropy_sum must equal)."""
    return F.cross_entropy(F.linear(h, weight, bias).float(), targets, reduction="sum")


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("chunk_rows", [7, 64, None])
def test_fused_linear_cross_entropy_matches_reference_values_and_gradients(with_bias, chunk_rows):
    from tunekit.engine.loss import linear_cross_entropy_sum

    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 16, generator=g, requires_grad=True)
    weight = torch.randn(101, 16, generator=g).mul_(0.3).requires_grad_()
    bias = torch.randn(101, generator=g).requires_grad_() if with_bias else None
    targets = torch.randint(0, 101, (37,), generator=g)
    leaves = [h, weight] + ([bias] if with_bias else [])
    ref = _reference_ce(h, weight, bias, targets)
    ref_grads = torch.autograd.grad(ref / 37, leaves)
    ours = linear_cross_entropy_sum(h, weight, bias, targets, chunk_rows=chunk_rows)
    grads = torch.autograd.grad(ours / 37, leaves)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-4)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    with torch.no_grad():  # the no-grad path (eval) gives the same value
        torch.testing.assert_close(linear_cross_entropy_sum(h, weight, bias, targets, chunk_rows), ref.detach(),
                                   rtol=1e-6, atol=1e-4)


def test_fused_linear_cross_entropy_under_bf16_autocast_matches_autocast_reference():
    from tunekit.engine.loss import linear_cross_entropy_sum

    g = torch.Generator().manual_seed(1)
    h = torch.randn(50, 32, generator=g, requires_grad=True)
    weight = torch.randn(300, 32, generator=g).mul_(0.2)  # frozen (like a tied LM head under LoRA)
    targets = torch.randint(0, 300, (50,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _reference_ce(h, weight, None, targets)  # bf16 logits, fp32 softmax
        ours = linear_cross_entropy_sum(h, weight, None, targets, chunk_rows=16)
    (ref_grad,) = torch.autograd.grad(ref, h)
    (grad,) = torch.autograd.grad(ours, h)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(grad, ref_grad, rtol=2e-2, atol=2e-3)  # bf16 rounding of softmax - onehot


def test_fused_linear_cross_entropy_for_targets_the_model_rules_out():
    """A target with probability below fp32's normal range (loss > 69 nats) still gets the exact loss."""
    from tunekit.engine.loss import linear_cross_entropy_sum

    h = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], requires_grad=True)
    weight = torch.tensor([[100.0, 0.0], [-100.0, 0.0], [0.0, 0.5], [0.0, -0.5]])
    targets = torch.tensor([1, 0, 2])  # row 0: logit gap 200 (p = e^-200 underflows fp32); row 1: tie; row 2: easy
    ours = linear_cross_entropy_sum(h, weight, None, targets)
    ref = _reference_ce(h.double(), weight.double(), None, targets)
    assert torch.isfinite(ours) and abs(float(ours) - float(ref)) < 1e-3 * float(ref)
    (grad,) = torch.autograd.grad(ours, h)
    (ref_grad,) = torch.autograd.grad(_reference_ce(h, weight, None, targets), h)
    torch.testing.assert_close(grad, ref_grad)


def test_cached_head_cast_follows_weight_updates():
    from tunekit.engine.loss import linear_cross_entropy_sum

    h = torch.randn(4, 8)
    weight = torch.randn(10, 8)
    targets = torch.tensor([1, 2, 3, 4])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        before = linear_cross_entropy_sum(h, weight, None, targets)
        weight.mul_(2)  # an optimizer step changes the head in place: the bf16 copy must be redone
        after = linear_cross_entropy_sum(h, weight, None, targets)
        expected = _reference_ce(h, weight, None, targets)
    assert not torch.equal(before, after)
    torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-3)


def test_cast_of_a_trained_head_follows_fused_adamw_steps():
    """torch's fused AdamW does not bump a parameter's version counter: a cast cached on it went stale and full
    fine-tunes trained against the head of step 0 (found by a distillation run whose saved model was broken)."""
    from tunekit.engine.loss import cached_weight_cast

    w = torch.nn.Parameter(torch.randn(16, 8))
    opt = torch.optim.AdamW([w], lr=0.1, fused=True)
    before = cached_weight_cast(w, torch.bfloat16)
    w.grad = torch.ones_like(w)
    opt.step()
    after = cached_weight_cast(w, torch.bfloat16)
    torch.testing.assert_close(after, w.detach().to(torch.bfloat16), rtol=0, atol=0)
    assert not torch.equal(before, after)
    frozen = torch.randn(16, 8)  # a frozen head is cast once and served from the cache
    assert cached_weight_cast(frozen, torch.bfloat16) is cached_weight_cast(frozen, torch.bfloat16)
