"""Fused element-wise kernels (engine/fused_ops.py): each compiled kernel against a float64 reference, values and
gradients; a switched tiny Llama against the unswitched one under bf16 autocast; where it is not used, and why."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tunekit.engine import fused_ops
from tunekit.engine.compile import can_compile
from tunekit.engine.fused_ops import KERNELS, Kernel, fuse_decoder_ops_, unfuse_decoder_ops_
from tunekit.methods.packed_linear import available

CPU = torch.device("cpu")
needs_compiler = pytest.mark.skipif(not can_compile(CPU)[0], reason="no C++ compiler for Inductor")
BF16 = torch.bfloat16


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def rope_reference(x, cos, sin):  # (B, H, T, D), (B, T, D): the rotate-half formula in float64
    x1, x2 = x.chunk(2, -1)
    return x * cos[:, None] + torch.cat((-x2, x1), -1) * sin[:, None]


@needs_compiler
@pytest.mark.parametrize("length", [37, 50])  # two lengths: one graph for both (dynamic shapes)
def test_kernels_match_float64(length):
    torch.manual_seed(length)
    # RMSNorm: fp32 residual in, bf16 out
    x = torch.randn(1, length, 48, requires_grad=True)
    w = torch.rand(48) + 0.5
    y = KERNELS["rms_norm"](x, w, 1e-5, BF16)
    gy = torch.randn_like(y)
    y.backward(gy)
    xd = x.detach().double().requires_grad_()
    ref = w.double() * xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5)
    ref.backward(gy.double())
    assert y.dtype == BF16 and rel(y, ref) < 4e-3 and rel(x.grad, xd.grad) < 4e-3
    # silu(gate) * up
    g = torch.randn(1, length, 64, dtype=BF16, requires_grad=True)
    u = torch.randn(1, length, 64, dtype=BF16, requires_grad=True)
    y = KERNELS["silu_mul"](g, u)
    gy = torch.randn_like(y)
    y.backward(gy)
    gd, ud = g.detach().double().requires_grad_(), u.detach().double().requires_grad_()
    ref = F.silu(gd) * ud
    ref.backward(gy.double())
    assert y.dtype == BF16 and rel(y, ref) < 4e-3
    assert rel(g.grad, gd.grad) < 8e-3 and rel(u.grad, ud.grad) < 8e-3  # bf16 inputs and output gradient
    # RoPE: bf16 q (3 heads) and k (1 head), fp32 cos/sin
    q = torch.randn(1, length, 3, 16, dtype=BF16).transpose(1, 2).requires_grad_()  # a transposed view, as in attention
    k = torch.randn(1, 1, length, 16, dtype=BF16, requires_grad=True)
    freqs = torch.arange(length, dtype=torch.float32)[:, None] * (1e4 ** -torch.arange(0, 1, 1 / 8))
    emb = torch.cat((freqs, freqs), -1)[None]
    qr, kr = KERNELS["rope"](q, k, emb.cos(), emb.sin(), BF16)
    gq, gk = torch.randn_like(qr), torch.randn_like(kr)
    torch.autograd.backward((qr, kr), (gq, gk))
    qd, kd = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    rq, rk = rope_reference(qd, emb.cos().double(), emb.sin().double()), rope_reference(kd, emb.cos().double(),
                                                                                       emb.sin().double())
    torch.autograd.backward((rq, rk), (gq.double(), gk.double()))
    assert qr.dtype == kr.dtype == BF16
    assert max(rel(qr, rq), rel(kr, rk), rel(q.grad, qd.grad), rel(k.grad, kd.grad)) < 4e-3


def tiny_llama(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")


def loss_and_embedding_grad(model, ids):
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
    with torch.autocast("cpu", BF16):
        logits = model(inputs_embeds=embeds).logits.float()
    loss = F.cross_entropy(logits[0, :-1], ids[0, 1:])
    loss.backward()
    return logits.detach(), embeds.grad


@needs_compiler
def test_switched_model_matches_the_eager_one(tiny_model_dir, prompt_ids):
    model = tiny_llama(tiny_model_dir)
    ids = prompt_ids[:1]
    logits_ref, grad_ref = loss_and_embedding_grad(model, ids)
    note = fuse_decoder_ops_(model, "on", CPU, "bf16", compiled_layers=False)
    n_layers = model.config.num_hidden_layers
    assert f"{2 * n_layers + 1} RMSNorms, {n_layers} MLPs, RoPE in {n_layers} attentions" in note
    logits, grad = loss_and_embedding_grad(model, ids)
    assert rel(logits, logits_ref) < 1e-2 and rel(grad, grad_ref) < 2e-2  # bf16 model: a few roundings differ
    # Outside autocast (fp32 evaluation) every switched module computes exactly what transformers does.
    with torch.no_grad():
        fp32_fused = model(ids).logits
    assert unfuse_decoder_ops_(model) == 3 * n_layers + 1 + n_layers
    with torch.no_grad():
        assert torch.equal(model(ids).logits, fp32_fused)


def test_the_rope_wrapper_is_the_original_outside_a_switched_attention(tiny_model_dir):
    import transformers.models.llama.modeling_llama as modeling

    model = tiny_llama(tiny_model_dir)
    fuse_decoder_ops_(model, "on", CPU, "bf16", compiled_layers=False) if can_compile(CPU)[0] else None
    q, k = torch.randn(1, 2, 5, 8, dtype=BF16), torch.randn(1, 1, 5, 8, dtype=BF16)
    cos, sin = torch.rand(1, 5, 8), torch.rand(1, 5, 8)
    original = getattr(modeling.apply_rotary_pos_emb, "_tunekit_original", modeling.apply_rotary_pos_emb)
    with torch.autocast("cpu", BF16):  # even under autocast: not inside a switched attention's forward
        for a, b in zip(modeling.apply_rotary_pos_emb(q, k, cos, sin), original(q, k, cos, sin)):
            assert a.dtype == b.dtype == torch.float32 and torch.equal(a, b)


def test_where_it_is_not_used_the_note_says_why(tiny_model_dir):
    model = tiny_llama(tiny_model_dir)
    assert fuse_decoder_ops_(model, "off", CPU, "bf16", False) == "fused element-wise ops off"
    assert "bf16 only" in fuse_decoder_ops_(model, "auto", CPU, "fp32", False) or not can_compile(CPU)[0]
    assert "compiled whole" in fuse_decoder_ops_(model, "auto", CPU, "bf16", True) or not can_compile(CPU)[0]
    model.config.model_type = "olmo2"  # post-norm: a bf16 norm output would be added to the residual
    note = fuse_decoder_ops_(model, "auto", CPU, "bf16", False)
    assert "not used" in note and ("'olmo2'" in note or not can_compile(CPU)[0])
    with pytest.raises(RuntimeError, match="train.fused_ops is on"):
        fuse_decoder_ops_(model, "on", CPU, "bf16", False)
    assert unfuse_decoder_ops_(model) == 0


def test_a_compiler_failure_falls_back_to_the_eager_function(capsys):
    from torch._dynamo.exc import BackendCompilerFailed

    def double(x):
        return 2 * x

    kernel = Kernel(double)

    def broken(*args):
        raise BackendCompilerFailed(lambda *a: None, RuntimeError("g++ exploded"), None)

    kernel.compiled = broken
    assert torch.equal(kernel(torch.ones(3)), 2 * torch.ones(3))
    assert kernel.failed and "runs eagerly" in capsys.readouterr().out
    assert torch.equal(kernel(torch.ones(2)), 2 * torch.ones(2))  # stays eager

    def bug(*args):
        raise ValueError("a real bug")

    other = Kernel(double)
    other.compiled = bug
    with pytest.raises(ValueError):  # not a compiler failure: not swallowed
        other(torch.ones(1))


@needs_compiler
def test_bf16_training_with_fused_ops_and_packed_weights_follows_the_eager_run(make_config, tmp_path, capsys):
    from tunekit.engine.loop import train
    from tunekit.engine.metrics import read_metrics

    common = {"train.precision": "bf16", "train.max_steps": 6, "method.name": "lora", "method.r": 4,
              "method.target_modules": ["q_proj", "v_proj"], "data.packing": True}
    fast = train(make_config(tmp_path / "fast", common))
    log = capsys.readouterr().out
    assert "fused element-wise ops (Inductor" in log
    # Packed weights where the CPU has oneDNN's bf16 instructions; elsewhere (AVX2-only) the run goes on without
    # them and says why, and the fused kernels are still checked against the eager run.
    packs, why = available(CPU)
    assert ("frozen linears packed for oneDNN" if packs else f"frozen linears not packed for oneDNN: {why}") in log
    plain = train(make_config(tmp_path / "plain", {**common, "train.fused_ops": "off",
                                                     "train.packed_weights": False}))
    losses = [[m["loss"] for m in read_metrics(tmp_path / run / "metrics.jsonl") if "loss" in m]
              for run in ("fast", "plain")]
    assert len(losses[0]) == len(losses[1]) == 6
    for a, b in zip(*losses):
        assert a == pytest.approx(b, rel=2e-2)
    assert fast.eval_loss_after == pytest.approx(plain.eval_loss_after, rel=2e-2)
