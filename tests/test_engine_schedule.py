"""Learning-rate schedule values worked out by hand, and which parameters get weight decay."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import LORA_RUN
from tunekit.config import OptimConfig
from tunekit.engine.schedule import build_optimizer, build_scheduler, lr_multiplier
from tunekit.models import load_model

# warmup 4, 12 steps, floor 0.1: warmup gives 1/4, 2/4, 3/4, 1 at steps 0-3; decay runs over steps 4..12.
COS_6 = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 2 / 8))  # step 6 is a quarter into the decay
CASES = {
    "cosine": {0: 0.25, 1: 0.5, 2: 0.75, 3: 1.0, 4: 1.0, 6: COS_6, 8: 0.55, 12: 0.1, 30: 0.1},
    "linear": {0: 0.25, 3: 1.0, 4: 1.0, 6: 0.775, 8: 0.55, 10: 0.325, 12: 0.1, 30: 0.1},
    "constant": {0: 0.25, 2: 0.75, 3: 1.0, 4: 1.0, 8: 1.0, 12: 1.0},
}


@pytest.mark.parametrize("kind", sorted(CASES))
def test_lr_multiplier_values(kind):
    for step, expected in CASES[kind].items():
        assert lr_multiplier(step, 12, 4, kind, 0.1) == pytest.approx(expected, abs=1e-12), (kind, step)


def test_no_warmup_starts_at_peak_and_cosine_reaches_zero():
    assert lr_multiplier(0, 10, 0, "cosine", 0.0) == 1.0
    assert lr_multiplier(5, 10, 0, "cosine", 0.0) == pytest.approx(0.5)
    assert lr_multiplier(10, 10, 0, "cosine", 0.0) == pytest.approx(0.0, abs=1e-12)
    assert lr_multiplier(5, 10, 0, "linear", 0.0) == pytest.approx(0.5)


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_scheduler_drives_the_optimizer_lr(kind):
    p = torch.nn.Parameter(torch.zeros(2, 2))
    cfg = OptimConfig(lr=0.3, warmup_steps=3, schedule=kind, min_lr_ratio=0.2)
    opt = build_optimizer({"w": p}, cfg)
    sched = build_scheduler(opt, cfg, total_steps=9)
    seen = []
    for _ in range(9):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.3 * lr_multiplier(s, 9, 3, kind, 0.2) for s in range(9)], abs=1e-12)
    assert seen[:3] == pytest.approx([0.1, 0.2, 0.3])


def test_training_loop_logs_the_lr_of_each_step(lora_run):
    # The shared run: lr 2e-2, warmup 2, cosine to 10% over 5 steps. Step k (1-based) uses multiplier(k-1).
    records = [json.loads(line) for line in (lora_run / "metrics.jsonl").read_text().splitlines()]
    logged = [r["lr"] for r in records if "loss" in r]
    total, warmup, floor = LORA_RUN["train.max_steps"], LORA_RUN["optim.warmup_steps"], LORA_RUN["optim.min_lr_ratio"]
    by_hand = [0.5, 1.0] + [floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * k / 3)) for k in range(3)]
    assert len(logged) == total
    assert logged == pytest.approx([LORA_RUN["optim.lr"] * m for m in by_hand], rel=1e-12)
    assert by_hand == pytest.approx([lr_multiplier(s, total, warmup, "cosine", floor) for s in range(total)])


def test_weight_decay_skips_one_dimensional_parameters(tiny_model_dir):
    model = load_model(str(tiny_model_dir))
    params = dict(model.named_parameters())
    one_d = {n for n, p in params.items() if p.ndim == 1}
    assert one_d and all("norm" in n for n in one_d)  # the Llama norm gains

    lr, wd = 0.1, 0.5
    opt = build_optimizer(params, OptimConfig(lr=lr, weight_decay=wd))
    by_id = {id(p): n for n, p in params.items()}
    decayed = {by_id[id(p)] for g in opt.param_groups if g["weight_decay"] == wd for p in g["params"]}
    exempt = {by_id[id(p)] for g in opt.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert exempt == one_d
    assert decayed == set(params) - one_d

    # With zero gradients AdamW's only change is the decoupled decay: p <- p * (1 - lr * wd).
    before = {n: p.detach().clone() for n, p in params.items()}
    for p in params.values():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in params.items():
        expected = before[n] if n in one_d else before[n] * (1 - lr * wd)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-8, msg=n)


def test_8bit_adamw_tracks_fp32_adamw_and_stores_uint8_moments():
    """bitsandbytes' AdamW8bit (optim.name adamw_8bit) against torch's AdamW on the same gradients: the updates
    point the same way and the moments of a large tensor are stored in 8 bits."""
    torch.manual_seed(0)
    w0 = torch.randn(128, 128)  # 16,384 values: above bitsandbytes' 4,096-element 8-bit threshold
    params = {k: torch.nn.Parameter(w0.clone()) for k in ("ref", "q")}
    opts = {k: build_optimizer({"w": params[k]}, OptimConfig(name=n, lr=1e-2))
            for k, n in (("ref", "adamw"), ("q", "adamw_8bit"))}
    for _ in range(5):
        g = torch.randn(128, 128)
        for k in params:
            params[k].grad = g.clone()
            opts[k].step()
    d_ref, d_q = params["ref"].detach() - w0, params["q"].detach() - w0
    assert torch.nn.functional.cosine_similarity(d_ref.flatten(), d_q.flatten(), dim=0) > 0.99
    assert (d_q - d_ref).norm() / d_ref.norm() < 0.1
    state = opts["q"].state[params["q"]]
    assert state["state1"].dtype == torch.uint8 and state["state2"].dtype == torch.uint8


def test_paged_optimizers_are_refused_on_cpu():
    from tunekit.config import ConfigError

    w = {"w": torch.nn.Parameter(torch.zeros(4, 4))}
    with pytest.raises(ConfigError, match="paged_adamw_8bit needs CUDA.*adamw_8bit"):
        build_optimizer(w, OptimConfig(name="paged_adamw_8bit"))


def test_8bit_optimizer_state_survives_a_checkpoint_round_trip(tmp_path):
    """What resume needs: the state saved as checkpoint.py saves it (torch.save, loaded with weights_only=True)
    continues exactly like the optimizer that never stopped."""
    torch.manual_seed(0)
    w0, grads = torch.randn(128, 128), [torch.randn(128, 128) for _ in range(4)]
    a = torch.nn.Parameter(w0.clone())
    opt_a = build_optimizer({"w": a}, OptimConfig(name="adamw_8bit", lr=1e-2))
    for g in grads[:2]:
        a.grad = g.clone()
        opt_a.step()
    torch.save(opt_a.state_dict(), tmp_path / "optimizer.pt")
    b = torch.nn.Parameter(a.detach().clone())
    opt_b = build_optimizer({"w": b}, OptimConfig(name="adamw_8bit", lr=1e-2))
    opt_b.load_state_dict(torch.load(tmp_path / "optimizer.pt", map_location="cpu", weights_only=True))
    for g in grads[2:]:
        for p, o in ((a, opt_a), (b, opt_b)):
            p.grad = g.clone()
            o.step()
    assert torch.equal(a.detach(), b.detach())


def test_8bit_run_trains_and_plans_its_smaller_state(make_config, tmp_path):
    from tunekit.engine.loop import train
    from tunekit.planner import plan

    result = train(make_config(tmp_path / "a", {"optim.name": "adamw_8bit", "train.max_steps": 4,
                                                "train.eval_every": 0}))
    assert result.eval_loss_after < result.eval_loss_before
    p32 = plan("smollm2-135m", method="lora", malloc="tcmalloc")
    p8 = plan("smollm2-135m", method="lora", malloc="tcmalloc", optim="adamw_8bit")
    assert p8.optimizer == int(2 * p32.trainable_params * (1 + 4 / 2048)) and p32.optimizer == 8 * p32.trainable_params
