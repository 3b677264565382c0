"""`method: select`: importance scores against a hand-computed reference, the budget rule, the baselines' choices,
start/save/load/merge against the base model, and a training run whose reported relative changes are recomputed
from its checkpoint."""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import torch_globals_preserved
from method_checks import L, base, in_out, method_logits, model_logits, perturbed_method
from tunekit.config import ConfigError, SelectMethod, load_config
from tunekit.engine import train
from tunekit.engine.batching import BatchStream
from tunekit.engine.loop import micro_batch_loss
from tunekit.methods import MethodError, build_method, count_parameters, method_for_folder
from tunekit.methods.importance import normalized, parameter_groups, score_groups

pytestmark = pytest.mark.usefixtures("single_thread")
MODULES = list(in_out())  # q, k, v, o, gate, up, down: the tiny Llama's module order
GROUP_PARAMS = sum(i * o for i, o in in_out().values())  # one decoder layer's linear weights (no biases)


@pytest.fixture(scope="module")
def train_examples(make_config, tokenizer, tmp_path_factory):
    from tunekit.data import prepare_data

    cfg = make_config(tmp_path_factory.mktemp("select-data"))
    return prepare_data(cfg.data, tokenizer).train, tokenizer.pad_token_id


def batches(train_examples, packing=True, n=3, batch_size=2):
    examples, pad_id = train_examples
    stream = BatchStream(examples, batch_size, 0, packing, pad_id)
    return [next(stream) for _ in range(n)]


def prepared(cfg: SelectMethod, model, train_examples, packing=True):
    """A Select method that has scored `model` as tunekit train does (fp32 on CPU)."""
    method = build_method(cfg)
    forward = partial(micro_batch_loss, method=method, device=torch.device("cpu"), precision="fp32")
    method.prepare(model, iter(batches(train_examples, packing, n=cfg.score_batches)), forward, torch.device("cpu"))
    return method


# --- scores ---------------------------------------------------------------------------------------------------

def reference_scores(model, groups, batch_list, importance: str) -> list[float]:
    """Plain autograd on full logits of padded batches: mean over batches of sum(g^2) (or sum|g|) / group size."""
    modules = dict(model.named_modules())
    weights = [modules[g.path].weight for g in groups]
    totals = [0.0] * len(groups)
    for b in batch_list:
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1), b.targets.flatten(), ignore_index=-100)  # mean over targets
        grads = torch.autograd.grad(loss, weights)
        for i, (g, group) in enumerate(zip(grads, groups)):
            totals[i] += float(g.square().sum() if importance == "fisher" else g.abs().sum()) / group.params
    return [t / len(batch_list) for t in totals]


@pytest.mark.parametrize("importance", ["fisher", "grad"])
@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
def test_scores_equal_a_hand_computed_mean_squared_gradient(tiny_model_dir, train_examples, importance, packing):
    model = base(tiny_model_dir)
    method = prepared(SelectMethod(importance=importance, score_batches=3), model, train_examples, packing)
    groups = parameter_groups(model, "all-linear")
    assert [g.key for g in groups] == [f"layers.{i}.{m}" for i in range(L) for m in MODULES]
    expected = reference_scores(base(tiny_model_dir), groups, batches(train_examples, packing=False), importance)
    torch.testing.assert_close(torch.tensor(method.scores), torch.tensor(expected), rtol=2e-4, atol=0)
    assert min(expected) > 0


def test_scoring_leaves_the_model_as_it_was_and_repeats_exactly(tiny_model_dir, train_examples):
    model = base(tiny_model_dir)
    model.train()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    first = prepared(SelectMethod(score_batches=2), model, train_examples).scores
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters()) and model.training
    assert prepared(SelectMethod(score_batches=2), model, train_examples).scores == first
    fresh = base(tiny_model_dir).state_dict()
    assert all(torch.equal(t, fresh[k]) for k, t in model.state_dict().items())  # no weight moved


def test_a_group_that_cannot_change_the_loss_scores_zero_and_is_not_selected(tiny_model_dir, train_examples):
    model = base(tiny_model_dir)
    with torch.no_grad():
        # Layer 1's MLP output is zero whatever its gate/up weights are; layer 0's attention output is zero whatever
        # its q, k, o weights are (the values are all zero): those groups cannot change the loss.
        model.model.layers[1].mlp.down_proj.weight.zero_()
        model.model.layers[0].self_attn.v_proj.weight.zero_()
    method = prepared(SelectMethod(score_batches=2, fraction=0.5), model, train_examples)
    scores = dict(zip((g.key for g in method.groups), method.scores))
    dead = ["layers.1.gate_proj", "layers.1.up_proj", "layers.0.q_proj", "layers.0.k_proj", "layers.0.o_proj"]
    assert all(scores[k] == 0 for k in dead)
    assert all(scores[k] > 0 for k in scores if k not in dead)
    method.apply(model)
    chosen = {method.groups[i].key for i in method.chosen}
    assert chosen and not chosen & set(dead)


def test_normalize_mean_divides_by_the_group_size(tiny_model_dir, train_examples):
    total = prepared(SelectMethod(score_batches=1, normalize="sum"), base(tiny_model_dir), train_examples)
    mean = prepared(SelectMethod(score_batches=1), base(tiny_model_dir), train_examples)
    assert mean.scores == normalized(total.scores, total.groups, "mean")
    assert mean.scores[0] == pytest.approx(total.scores[0] / (in_out()["q_proj"][0] * in_out()["q_proj"][1]))


# --- the budget and the strategies -----------------------------------------------------------------------------

BUDGETS = {"fraction": {"fraction": 0.3}, "max_params": {"max_params": 20_000}}  # LoRA r=4: max_params / 8 below


@pytest.mark.parametrize("strategy", ["importance", "random", "last"])
@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("lora_r", [None, 4])
def test_trainable_parameters_fit_the_budget_closely(tiny_model_dir, train_examples, strategy, budget, lora_r):
    budget_kw = {k: v if k == "fraction" or lora_r is None else v // 8 for k, v in BUDGETS[budget].items()}
    cfg = SelectMethod(strategy=strategy, lora_r=lora_r, score_batches=1, **budget_kw)
    model = base(tiny_model_dir)
    method = prepared(cfg, model, train_examples)
    trainable, _ = count_parameters(method.apply(model))
    costs = {i: g.cost(lora_r) for i, g in enumerate(method.groups)}
    cost_all = L * (GROUP_PARAMS if lora_r is None else lora_r * sum(i + o for i, o in in_out().values()))
    assert sum(costs.values()) == cost_all
    assert method.budget == (cfg.max_params if cfg.max_params else round(cfg.fraction * cost_all))
    assert trainable == sum(costs[i] for i in method.chosen) <= method.budget
    # Greedy fill: what is left of the budget is smaller than every group left out.
    assert method.budget - trainable < min(c for i, c in costs.items() if i not in method.chosen)


def test_last_takes_whole_layers_from_the_top(tiny_model_dir):
    method = build_method(SelectMethod(strategy="last", score_batches=0, fraction=0.5))  # exactly one layer
    method.apply(base(tiny_model_dir))
    assert [method.groups[i].key for i in method.chosen] == [f"layers.{L - 1}.{m}" for m in MODULES]
    method = build_method(SelectMethod(strategy="last", score_batches=0, max_params=GROUP_PARAMS + 4096))
    method.apply(base(tiny_model_dir))  # one layer + the first group of the layer below that fits (q_proj)
    assert {method.groups[i].key for i in method.chosen} == {f"layers.{L - 1}.{m}" for m in MODULES} | \
        {f"layers.{L - 2}.q_proj"}


def test_random_is_a_seeded_shuffle(tiny_model_dir):
    def chosen(seed):
        method = build_method(SelectMethod(strategy="random", score_batches=0, fraction=0.4, seed=seed))
        method.apply(base(tiny_model_dir))
        return [method.groups[i].key for i in method.chosen]

    order = torch.randperm(L * len(MODULES), generator=torch.Generator().manual_seed(3)).tolist()
    keys = [f"layers.{i}.{m}" for i in range(L) for m in MODULES]
    sizes = [in_out()[k.rpartition(".")[2]][0] * in_out()[k.rpartition(".")[2]][1] for k in keys]
    budget, used, expected = round(0.4 * L * GROUP_PARAMS), 0, []
    for i in order:
        if used + sizes[i] <= budget:
            expected.append(i)
            used += sizes[i]
    assert chosen(3) == [keys[i] for i in sorted(expected)]
    assert chosen(3) == chosen(3) and chosen(3) != chosen(4)


# --- start, save, load, merge ----------------------------------------------------------------------------------

CONFIGS = {"full-rank": SelectMethod(strategy="random", score_batches=0, fraction=0.3),
           "lora": SelectMethod(strategy="random", score_batches=0, fraction=0.3, lora_r=4, modules="mlp")}


@pytest.mark.parametrize("key", CONFIGS)
def test_fresh_select_gives_the_base_logits_exactly(tiny_model_dir, prompt_ids, key):
    method = build_method(CONFIGS[key])
    assert torch.equal(method_logits(method, method.apply(base(tiny_model_dir)), prompt_ids),
                       model_logits(base(tiny_model_dir), prompt_ids))


@pytest.mark.parametrize("key", CONFIGS)
def test_save_load_round_trip_and_merge(tiny_model_dir, prompt_ids, tmp_path, key):
    method, model, expected = perturbed_method(CONFIGS[key], tiny_model_dir, prompt_ids)
    assert float((expected - model_logits(base(tiny_model_dir), prompt_ids)).abs().max()) > 1e-3
    method.save(model, tmp_path)
    (tmp_path / "config.yaml").write_text(f"method: {json.dumps(CONFIGS[key].model_dump(mode='json'))}\n")
    again = method_for_folder(tmp_path)  # rebuilt from the folder alone
    loaded = again.load(base(tiny_model_dir), tmp_path)
    assert torch.equal(method_logits(again, loaded, prompt_ids), expected)
    merged = again.merge(loaded)
    assert type(merged.model.layers[0].mlp.up_proj) is torch.nn.Linear
    torch.testing.assert_close(model_logits(merged, prompt_ids), expected, rtol=0, atol=1e-5)
    info = json.loads((tmp_path / "selection.json").read_text())
    assert [g["key"] for g in info["groups"] if g["selected"]] == [method.groups[i].key for i in method.chosen]
    assert (tmp_path / "selection.png").stat().st_size > 1000


# --- a training run --------------------------------------------------------------------------------------------

RUNS = {"full-rank": {"method.name": "select", "method.fraction": 0.3, "method.score_batches": 2},
        "lora": {"method.name": "select", "method.fraction": 0.5, "method.score_batches": 2, "method.lora_r": 4,
                 "method.lora_alpha": 8.0}}


@pytest.mark.parametrize("key", RUNS)
def test_training_run_reports_the_relative_change_its_checkpoint_shows(tmp_path, make_config, tiny_model_dir,
                                                                      prompt_ids, key):
    from tunekit.inference import load_for_inference

    cfg = make_config(tmp_path / "run", RUNS[key])
    with torch_globals_preserved():
        result = train(cfg)
    assert result.eval_loss_after < result.eval_loss_before
    run = tmp_path / "run"
    info = json.loads((run / "selection.json").read_text())
    assert result.trainable_params == info["trained_params"] <= info["budget"]
    assert info["scoring"]["batches"] == 2 and all(g["score"] > 0 for g in info["groups"])
    ckpt = load_file(str(run / "checkpoints" / "step-000004" / "trainable.safetensors"))
    plain = dict(base(tiny_model_dir).named_modules())
    for g in info["groups"]:
        if not g["selected"]:
            assert g["relative_change"] is None
            continue
        w0 = plain[g["path"]].weight.detach()
        if cfg.method.lora_r is None:
            delta = ckpt[f"{g['path']}.weight"] - w0
        else:
            prefix = f"base_model.model.{g['path']}"
            delta = 8.0 / 4 * ckpt[f"{prefix}.lora_B.default.weight"] @ ckpt[f"{prefix}.lora_A.default.weight"]
        assert g["relative_change"] == pytest.approx(float(delta.norm() / w0.norm()), rel=1e-5)
        assert g["relative_change"] > 0
    card = (run / "README.md").read_text()
    assert "## Parameter groups" in card and "Selected parameters" in card and "selection.png" in card
    assert card.count("**") >= 2 * sum(g["selected"] for g in info["groups"])
    # The run folder loads for inference (merged) with the logits of base + the trained tensors.
    model, _ = load_for_inference(str(tiny_model_dir), adapter=str(run), device="cpu", dtype="float32")
    method = build_method(cfg.method)
    reference = base(tiny_model_dir)
    if cfg.method.lora_r is None:
        with torch.no_grad():
            for name, p in reference.named_parameters():
                if name in ckpt:
                    p.copy_(ckpt[name])
        torch.testing.assert_close(model_logits(model, prompt_ids), model_logits(reference, prompt_ids), rtol=0,
                                   atol=0)
    else:
        loaded = method.load(reference, run)
        torch.testing.assert_close(model_logits(model, prompt_ids), method_logits(method, loaded, prompt_ids),
                                   rtol=0, atol=1e-5)


# --- errors ----------------------------------------------------------------------------------------------------

def test_bad_config_names_the_field():
    def error(overrides):
        with pytest.raises(ConfigError) as err:
            load_config(None, {"method.name": "select", **overrides})
        return str(err.value)

    assert "method.max_params" in error({"method.fraction": 0.2, "method.max_params": 100}) and \
        "exactly one budget" in error({"method.fraction": None})
    assert "method.score_batches" in error({"method.score_batches": 0})
    assert "method.fraction" in error({"method.fraction": 1.5})
    assert "method.strategy" in error({"method.strategy": "best"}) and "'random'" in error({"method.strategy": "x"})
    assert "method.importance" in error({"method.importance": "hessian"})
    assert load_config(None, {"method.name": "select", "method.max_params": 5}).method.fraction is None


def test_bad_choices_against_the_model_say_what_is_valid(tiny_model_dir):
    with pytest.raises(MethodError) as err:
        build_method(SelectMethod(modules=["q_proj", "qkv"])).apply(base(tiny_model_dir))
    assert "qkv" in str(err.value) and "down_proj" in str(err.value)
    with pytest.raises(MethodError, match=r"smaller than the smallest group \(layers.0.k_proj: 2,048\)"):
        build_method(SelectMethod(strategy="last", score_batches=0, max_params=1000)).apply(base(tiny_model_dir))
    with pytest.raises(MethodError, match="strategy importance needs scores"):
        build_method(SelectMethod()).apply(base(tiny_model_dir))


def test_resumed_run_rescores_to_the_same_groups_and_weights(tmp_path, make_config):
    # constant lr: a 2-step run resumed to 4 steps follows the 4-step run exactly
    common = {**RUNS["full-rank"], "optim.schedule": "constant", "train.save_every": 2}
    with torch_globals_preserved():
        train(make_config(tmp_path / "whole", common))
        train(make_config(tmp_path / "parts", {**common, "train.max_steps": 2}))
        train(make_config(tmp_path / "parts", {**common, "train.resume": True}))
    whole, parts = (json.loads((tmp_path / r / "selection.json").read_text()) for r in ("whole", "parts"))
    assert whole["groups"] == parts["groups"]
    assert all(torch.equal(a, b) for a, b in zip(*(
        load_file(str(tmp_path / r / "tunekit_weights.safetensors")).values() for r in ("whole", "parts"))))


def test_merge_note_says_what_merging_a_select_run_does():
    from tunekit.merging import merge_note

    assert "already form a plain model" in merge_note("select", "float32")  # full rank: the weights are copied
    assert "folded into the base weights" in merge_note("select", "float32", low_rank=True)  # lora_r: B @ A added
