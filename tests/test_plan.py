"""Memory planner: closed-form terms on the tiny config, presets, errors, and the pre-training warning."""

from __future__ import annotations

import json
import re

import pytest

from conftest import TINY
from tunekit.planner import QLORA_BITS, PlanError, load_shape, plan, presets

H, I, L = TINY["hidden_size"], TINY["intermediate_size"], TINY["num_hidden_layers"]
KV = TINY["num_key_value_heads"] * H // TINY["num_attention_heads"]


@pytest.fixture(scope="module")
def vocab(tiny_model_dir):
    return json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]


def linear_params_per_layer() -> int:
    # q, o: H x H; k, v: H x KV; gate, up: H x I; down: I x H
    return 2 * H * H + 2 * H * KV + 3 * H * I


def test_lora_terms_by_hand(tiny_model_dir, vocab, monkeypatch):
    import tunekit.planner

    # The closed form with packed weights, on any CPU (test_engine_device.py: a CPU that cannot pack plans none).
    monkeypatch.setattr(tunekit.planner, "_packing_available", lambda: (True, ""))
    p = plan(str(tiny_model_dir), method="lora", rank=4, precision="bf16", seq_len=32, batch=2)
    r = 4
    lora = L * r * ((H + H) + 2 * (H + KV) + (H + H) + 2 * (H + I) + (I + H))
    assert p.trainable_params == lora
    assert p.adapter == 4 * lora and p.gradients == 4 * lora and p.optimizer == 8 * lora
    embed, norms = vocab * H, (2 * L + 1) * H
    # fp32 tied embedding + its bf16 copy for the loss, fp32 norms, bf16 frozen linears + their packed W and W^T
    assert p.weights == 4 * embed + 2 * embed + 4 * norms + (2 + 4) * L * linear_params_per_layer()
    assert any("packed_weights" in n for n in p.notes)
    unpacked = plan(str(tiny_model_dir), method="lora", rank=4, precision="bf16", seq_len=32, batch=2,
                    packed_weights=False)
    assert p.weights - unpacked.weights == 4 * L * linear_params_per_layer()
    assert plan(str(tiny_model_dir), method="lora", rank=4, precision="bf16", seq_len=32, batch=2,
                device="cuda").weights == unpacked.weights  # CPU only
    assert p.total_params == embed + norms + L * linear_params_per_layer() + lora
    assert p.tokens_per_micro_batch == 64


def test_full_fp32_and_qlora_by_hand(tiny_model_dir, vocab):
    n = vocab * H + (2 * L + 1) * H + L * linear_params_per_layer()
    full = plan(str(tiny_model_dir), method="full", precision="fp32")
    assert full.trainable_params == n and full.adapter == 0
    assert full.weights == 4 * n and full.gradients == 4 * n and full.optimizer == 8 * n
    q = plan(str(tiny_model_dir), method="qlora", rank=4, precision="bf16")
    frozen = L * linear_params_per_layer()
    assert q.weights == int(4 * vocab * H + 2 * vocab * H + 4 * (2 * L + 1) * H + frozen * QLORA_BITS / 8)
    assert abs(QLORA_BITS - 4.127) < 1e-3


def test_small_methods_by_hand(tiny_model_dir):
    m = str(tiny_model_dir)
    assert plan(m, method="ia3").trainable_params == L * (2 * KV + I)
    assert plan(m, method="bitfit").trainable_params == L * (2 * H + 2 * KV + 2 * I + H)
    assert plan(m, method="prompt", virtual_tokens=5).trainable_params == 5 * H
    assert plan(m, method="prefix", virtual_tokens=5).trainable_params == 5 * L * 2 * KV
    assert plan(m, method="adapter", bottleneck=8).trainable_params == L * 2 * (2 * H * 8 + 8 + H)


def test_select_budget_matches_the_methods_own_budget(tiny_model_dir, make_config):
    """The plan's select budget is importance.budget_for's on the real groups (fraction, max_params, LoRA rank)."""
    from tunekit.methods.importance import budget_for, parameter_groups
    from tunekit.models import load_model
    from tunekit.planner import plan_for_run

    m = str(tiny_model_dir)
    groups = parameter_groups(load_model(m, dtype="float32"), "all-linear")
    assert plan(m, method="select", fraction=0.25).trainable_params == budget_for(groups, None, 0.25, None)
    assert plan(m, method="select", fraction=0.25, select_rank=4).trainable_params == budget_for(groups, 4, 0.25, None)
    assert plan(m, method="select", max_params=1000).trainable_params == 1000
    cfg = make_config(tiny_model_dir / "unused", {"method.name": "select", "method.fraction": 0.5, "method.lora_r": 2})
    run_plan = plan_for_run(cfg, 40, 0.3, "cpu")
    assert run_plan.trainable_params == budget_for(groups, 2, 0.5, None) and run_plan.method == "select"


def test_activations_scale_with_tokens_and_attention_is_quadratic_on_cpu(tiny_model_dir):
    m = str(tiny_model_dir)
    a1 = plan(m, seq_len=64, batch=1, device="cuda").activations
    a2 = plan(m, seq_len=64, batch=2, device="cuda").activations
    a4 = plan(m, seq_len=128, batch=1, device="cuda").activations
    assert a2 == a4  # on CUDA only tokens per micro-batch matter
    assert plan(m, seq_len=128, batch=1).activations > plan(m, seq_len=64, batch=2).activations  # CPU: L^2 too
    assert a2 > a1


def test_presets_and_errors(tiny_model_dir):
    assert {"llama-3.2-1b", "llama-3.1-8b", "llama-3.1-70b"} <= set(presets())
    s = load_shape("llama-3.1-8b")
    assert abs(s.total_params() - 8.03e9) < 0.01e9  # Llama 3.1 8B: 8.03 B parameters
    assert abs(load_shape("llama-3.1-70b").total_params() - 70.55e9) < 0.05e9
    assert abs(load_shape("llama-3.2-1b").total_params() - 1.236e9) < 0.005e9
    p8 = plan("llama-3.1-8b", method="qlora", device="cuda", seq_len=1024, batch=1)
    assert 6e9 < p8.weights < 7.5e9  # 3.6 GB of 4-bit linears + fp32 embedding + bf16 untied head
    with pytest.raises(PlanError, match="unknown method 'loar'; choose one of: lora, qlora"):
        plan(str(tiny_model_dir), method="loar")
    with pytest.raises(PlanError, match="preset"):
        plan("no-such-model")
    with pytest.raises(PlanError, match="device 'tpu': choose cpu or cuda"):
        plan(str(tiny_model_dir), device="tpu")


def test_cli_plan(tiny_model_dir, capsys):
    from tunekit.cli import main

    assert main(["plan", "--model", "llama-3.2-1b", "--method", "lora", "--seq-len", "256"]) == 0
    out = capsys.readouterr().out
    assert "activations" in out and "total (peak)" in out
    assert main(["plan", "--model", str(tiny_model_dir), "--method", "nope"]) == 2
    assert "choose one of" in capsys.readouterr().err


def test_training_warns_when_the_plan_exceeds_free_memory(tmp_path, make_config, monkeypatch, capsys):
    import tunekit.planner
    from tunekit.engine import train

    monkeypatch.setattr(tunekit.planner, "free_memory_bytes", lambda device="cpu": 2**20)
    train(make_config(tmp_path / "run", {"train.max_steps": 1}))
    lines = [x for x in capsys.readouterr().out.splitlines() if "warning: the memory plan" in x]
    assert len(lines) == 1 and "GiB is free" in lines[0]
    monkeypatch.setattr(tunekit.planner, "free_memory_bytes", lambda device="cpu": 2**40)
    result = train(make_config(tmp_path / "run2", {"train.max_steps": 1}))
    assert "warning: the memory plan" not in capsys.readouterr().out
    # The plan is kept next to the measured peak (result.json, run card), so every run checks the planner.
    planned = float(re.search(r"this run is ([\d.]+) GiB", lines[0])[1])
    assert result.planned_peak_bytes / 2**30 == pytest.approx(planned, abs=0.006)
    assert "; planned " in (tmp_path / "run2" / "README.md").read_text()


def saved_for_backward_bytes(model, method, ids, pos, targets) -> int:
    """Bytes of the distinct tensors autograd saves in one forward of the engine's path (parameters excluded)."""
    import torch

    from tunekit.engine.device import autocast
    from tunekit.engine.loss import label_only_loss_sum

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen.setdefault(ptr, t.untyped_storage().nbytes())
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast(torch.device("cpu"), "bf16"):
        hidden = method.hidden_states(model, ids, pos, None)
        label_only_loss_sum(hidden, method.lm_head(model), targets)
    return sum(seen.values())


@pytest.mark.parametrize("spec", [{"name": "lora", "r": 4}, {"name": "full"},
                                  # bitsandbytes casts outputs back to the input dtype; tunekit's layer keeps
                                  # autocast's (25% more saved otherwise), so QLoRA saves what LoRA saves
                                  {"name": "qlora", "r": 4},
                                  # every group selected: what the scoring pass keeps, the plan's select bound
                                  {"name": "select", "strategy": "last", "score_batches": 0, "fraction": 1.0}],
                         ids=["lora", "full", "qlora", "select"])
@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused-ops"])
def test_activation_term_matches_what_autograd_saves(spec, fused, tmp_path):
    """The activation formula against the tensors autograd really keeps (bf16 autocast, packed rows, CPU), with
    and without the fused CPU kernels (train.fused_ops) and packed weights."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tunekit.attention import register
    from tunekit.config import METHODS
    from tunekit.methods import build_method, cast_frozen_linears_
    from tunekit.methods.lora_kernel import use_fast_lora_
    from tunekit.planner import LOSS_CHUNK_BYTES

    if spec["name"] == "qlora":
        pytest.importorskip("bitsandbytes")
    register()
    cfg = LlamaConfig(vocab_size=512, hidden_size=96, intermediate_size=256, num_hidden_layers=3,
                      num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True)
    (tmp_path / "config.json").write_text(cfg.to_json_string())
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="tunekit_sdpa")
    method = build_method(METHODS[spec["name"]](**spec))
    model = method.apply(model)
    cast_frozen_linears_(model, torch.bfloat16)
    use_fast_lora_(model)  # as the training loop does (train.fused_lora)
    if fused:
        from tunekit.engine.compile import can_compile
        from tunekit.engine.fused_ops import fuse_decoder_ops_
        from tunekit.methods.packed_linear import pack_frozen_linears_

        if not can_compile(torch.device("cpu"))[0]:
            pytest.skip("no C++ compiler for the fused kernels")
        fuse_decoder_ops_(method.causal_lm(model), "on", torch.device("cpu"), "bf16", compiled_layers=False)
        pack_frozen_linears_(model)
    n_seq, seq_len = 3, 40
    ids = torch.randint(0, 512, (1, n_seq * seq_len))
    targets = ids.clone()
    targets[:, : n_seq * seq_len // 2] = -100
    measured = saved_for_backward_bytes(model, method, ids, torch.arange(seq_len).repeat(n_seq)[None], targets)
    p = plan(str(tmp_path), method=spec["name"], rank=spec.get("r", 16), seq_len=seq_len, batch=n_seq,
             label_fraction=0.5, fraction=spec.get("fraction", 0.1), fused_ops=fused, packed_weights=fused)
    chunk = min(n_seq * seq_len // 2 * 512 * 4, LOSS_CHUNK_BYTES) * 2  # transient logits, not saved
    assert abs((p.activations - chunk) / measured - 1) < 0.03


def test_cpu_allocator_term_follows_the_malloc(tiny_model_dir, monkeypatch):
    from tunekit import allocator
    from tunekit.planner import CPU_HEAP, load_shape

    kw = dict(method="lora", rank=4, seq_len=64, batch=4, device="cpu")
    plans = {m: plan(str(tiny_model_dir), malloc=m, **kw) for m in ("tcmalloc", "jemalloc", "glibc")}
    for m, p in plans.items():
        assert p.malloc == m and m in p.table()
        fit = CPU_HEAP[m]
        expected = max(0, int(fit.activations * p.activations + fit.model * 4 * load_shape(str(tiny_model_dir))
                              .total_params()) - p.optimizer)
        assert p.allocator == expected
        assert p.total - p.allocator == plans["glibc"].total - plans["glibc"].allocator  # only that term differs
    assert plans["tcmalloc"].allocator != plans["glibc"].allocator
    assert any("keeps growing" in n for n in plans["glibc"].notes)
    monkeypatch.setattr(allocator, "planned", lambda: "jemalloc")  # default: what `tunekit train` would use here
    assert plan(str(tiny_model_dir), **kw).total == plans["jemalloc"].total
    other = plan(str(tiny_model_dir), malloc="musl", **kw)  # unmeasured: glibc's factor, said so
    assert other.total == plans["glibc"].total and any("no measured factor" in n for n in other.notes)
    gpu = plan(str(tiny_model_dir), **{**kw, "device": "cuda"})
    assert gpu.malloc == "" and gpu.allocator == int(0.05 * (gpu.weights + gpu.activations))
