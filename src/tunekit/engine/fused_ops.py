"""Fused element-wise work of a decoder layer under CPU bf16 autocast: RMSNorm, SiLU x up, rotary embedding.

Eager transformers code runs each of these as several whole-tensor passes forward and more backward, mixing fp32
and bf16: RMSNorm is 4 passes in fp32 whose output every following linear casts to bf16 again (q, k and v each
cast it, and their gradients are cast back and summed in fp32); RoPE multiplies bf16 q and k by fp32 cos/sin, so
q and k become fp32 (neg, cat, two multiplies and an add), to be cast back to bf16 by the attention matmuls;
`act(gate) * up` is two passes plus three backward. Here each is one small function compiled by Inductor into one
vectorised loop forward and one backward, computing in fp32 and writing the autocast dtype once:

    rms_norm(x, w)         fp32 x (T, H) -> bf16 w * x / rms(x)       read by q/k/v or gate/up without casts
    silu_mul(g, u)         bf16 (T, I) x2 -> bf16 silu(g) * u          one rounding instead of two
    rope(q, k, cos, sin)   bf16 (B, H, T, D) -> bf16 rotated q, k      fp32 math, rounded once (as the cast was)

Numerics: forward values are those of the eager path (same fp32 math, the same single rounding to bf16 that
autocast's casts did), except silu_mul rounding once instead of twice; in backward the gradients of q, k and v
(or gate and up) reach the norm summed in bf16 instead of fp32.

Measured (SmolLM2-135M LoRA, 2 cores, tcmalloc, steps alternated in one process, 10 rounds, with packed weights
on): norm +2.9%, silu_mul +1.7%, rope +3.6%, all three +6.6% tokens/s. Compiling takes ~25 s on a cold Inductor
cache (once per machine), ~2-3 s per process after.

Which modules: decoder layers of the model types listed in MODEL_TYPES (pre-norm decoders whose RMSNorm, MLP and
RoPE are the Llama ones), `input_layernorm`, `post_attention_layernorm`, the final `norm`, `mlp` with
gate/up/down projections and SiLU, and RoPE through the modeling module's `apply_rotary_pos_emb`. Each norm and
the RoPE function are also checked numerically against our reference before they are switched.
"""

from __future__ import annotations

import contextvars
import sys
import types

import torch
import torch.nn.functional as F
from torch import nn

# Model types whose decoder layers are pre-norm (norm output feeds linears only), with Llama's RMSNorm, gated SiLU
# MLP and rotate-half RoPE. Post-norm architectures (OLMo2, Gemma2/3) must not get a bf16 norm output.
MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3"}
NORM_NAMES = ("input_layernorm", "post_attention_layernorm")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """(..., H) -> weight * x / sqrt(mean(x^2) + eps) in fp32, returned in `dtype`."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.float() * y).to(dtype)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up in fp32, in gate's dtype: (..., I) x2 -> (..., I)."""
    return (F.silu(gate.float()) * up.float()).to(gate.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, -1)
    return x * cos + torch.cat((-x2, x1), -1) * sin


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
         dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half RoPE in fp32: q (B, H, T, D), k (B, Hkv, T, D), cos/sin (B, T, D) -> q, k in `dtype`."""
    c, s = cos.unsqueeze(1).float(), sin.unsqueeze(1).float()
    return _rotate(q.float(), c, s).to(dtype), _rotate(k.float(), c, s).to(dtype)


class Kernel:
    """A function compiled on first use (dynamic shapes: packed rows of any length share one graph); should
    Inductor fail on some call, that call and the rest of the process run the eager function (same results)."""

    def __init__(self, fn):
        self.eager = fn
        self.compiled = None
        self.failed: str | None = None

    def __call__(self, *args):
        if self.failed is None:
            if self.compiled is None:
                self.compiled = torch.compile(self.eager, dynamic=True)
            try:
                return self.compiled(*args)
            except Exception as e:  # noqa: BLE001 - only compiler failures are swallowed
                if not type(e).__module__.startswith(("torch._dynamo", "torch._inductor")):
                    raise
                self.failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                print(f"[tunekit] fused {self.eager.__name__} runs eagerly: Inductor failed ({self.failed})",
                      flush=True)
        return self.eager(*args)


KERNELS = {"rms_norm": Kernel(rms_norm), "silu_mul": Kernel(silu_mul), "rope": Kernel(rope)}
_ROPE_ON = contextvars.ContextVar("tunekit_fused_rope", default=False)  # set while a switched attention runs


def _bf16_autocast(x: torch.Tensor) -> bool:
    """The fused path applies: CPU tensor under bf16 autocast, not inside a compiled region (dynamo traces the
    model's own code there)."""
    return (x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16 and not torch.compiler.is_compiling())


def norm_forward(self, x: torch.Tensor) -> torch.Tensor:
    if not _bf16_autocast(x):
        return type(self).forward(self, x)
    return KERNELS["rms_norm"](x, self.weight, _eps(self), torch.bfloat16)


def mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    if not _bf16_autocast(x):
        return type(self).forward(self, x)
    return self.down_proj(KERNELS["silu_mul"](self.gate_proj(x), self.up_proj(x)))


def attention_forward(self, *args, **kwargs):
    token = _ROPE_ON.set(True)  # this attention's apply_rotary_pos_emb call takes the fused path
    try:
        return type(self).forward(self, *args, **kwargs)
    finally:
        _ROPE_ON.reset(token)


def _eps(norm: nn.Module) -> float:
    eps = getattr(norm, "variance_epsilon", None)
    return getattr(norm, "eps", 1e-6) if eps is None else eps


def _norm_matches(norm: nn.Module) -> bool:
    """The module computes Llama's RMSNorm (checked on a random fp32 input against `rms_norm`)."""
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or type(norm).forward is nn.Module.forward:
        return False
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, weight.shape[0], generator=gen).to(weight.device)
    with torch.no_grad(), torch.autocast(weight.device.type, enabled=False):
        ours = rms_norm(x, weight, _eps(norm), torch.float32)
        theirs = type(norm).forward(norm, x).float()
    return theirs.shape == ours.shape and torch.allclose(theirs, ours, rtol=1e-5, atol=1e-6)


def _rope_matches(original) -> bool:
    """`original(q, k, cos, sin)` is rotate-half RoPE (checked on random fp32 inputs against `rope`)."""
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 5, 8, generator=gen), torch.randn(1, 1, 5, 8, generator=gen)
    freqs = torch.arange(5.0)[:, None] * torch.rand(4, generator=gen)
    emb = torch.cat((freqs, freqs), -1)[None]  # (1, T, D)
    try:
        theirs = original(q, k, emb.cos(), emb.sin())
    except Exception:  # noqa: BLE001 - another signature: not the function we replace
        return False
    ours = rope(q, k, emb.cos(), emb.sin(), torch.float32)
    return all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(theirs, ours))


def _install_rope(attention: nn.Module) -> bool:
    """Wrap the modeling module's `apply_rotary_pos_emb` (once per module, kept for the process): it takes the
    fused path only inside an attention switched by `fuse_decoder_ops_` and under bf16 autocast, and is the
    original function everywhere else."""
    module = sys.modules.get(type(attention).__module__)
    current = getattr(module, "apply_rotary_pos_emb", None)
    if current is None:
        return False
    if getattr(current, "_tunekit_original", None) is not None:
        return True
    if not _rope_matches(current):
        return False
    original = current

    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        if _ROPE_ON.get() and not args and not kwargs and _bf16_autocast(q):
            return KERNELS["rope"](q, k, cos, sin, torch.bfloat16)
        return original(q, k, cos, sin, *args, **kwargs)

    apply_rotary_pos_emb._tunekit_original = original
    setattr(module, "apply_rotary_pos_emb", apply_rotary_pos_emb)
    return True


def _gated_silu_mlp(mlp: nn.Module) -> bool:
    act = getattr(mlp, "act_fn", None)
    return (all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj"))
            and (isinstance(act, nn.SiLU) or type(act).__name__ in ("SiLU", "SiLUActivation")))


def applies(device: torch.device, precision: str, model_type: str | None, compiled_layers: bool) -> tuple[bool, str]:
    """Whether the fused kernels can switch a model of `model_type` trained in `precision` on `device`, and if
    not, why (the loop's switch and the memory planner ask the same question)."""
    from .compile import can_compile

    if device.type != "cpu":
        return False, f"CPU only, not {device.type}"
    if precision != "bf16":
        return False, "used under bf16 only"
    # No instruction-set check: the kernels are element-wise fp32 math with bf16 conversions, which Inductor
    # vectorises for whatever the CPU has (AVX2 or AVX-512) without raising. Where bf16 is emulated (AVX2-only
    # CPUs) precision auto is fp32, so they run there only when bf16 is asked for (tests/test_fused_ops.py passes
    # under ATEN_CPU_CAPABILITY=avx2, which makes Inductor emit AVX2 code, given a fresh TORCHINDUCTOR_CACHE_DIR:
    # kernels cached from AVX-512 runs on the same machine gave NaNs).
    if compiled_layers:
        return False, "the decoder layers are compiled whole"
    if model_type not in MODEL_TYPES:
        return False, f"model type {model_type!r} is not one of {', '.join(sorted(MODEL_TYPES))}"
    return can_compile(device)


def fuse_decoder_ops_(model: nn.Module, setting: str, device: torch.device, precision: str,
                      compiled_layers: bool) -> str:
    """Switch the norms, MLPs and RoPE of `model` (the transformers causal LM) to the fused kernels (mutates the
    modules' forward) when `setting` is on, or auto and they apply. Returns a one-line account for the log."""
    if setting == "off":
        return "fused element-wise ops off"
    from .compile import decoder_layers

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    ok, why = applies(device, precision, model_type, compiled_layers)
    layers = decoder_layers(model) if ok else None
    if ok and layers is None:
        ok, why = False, "no decoder layer list found"
    if not ok:
        if setting == "on":
            raise RuntimeError(f"train.fused_ops is on but cannot be used: {why}")
        return f"fused element-wise ops not used: {why}"
    counts = {"norm": 0, "mlp": 0, "rope": 0}
    norms = [getattr(layer, name, None) for layer in layers for name in NORM_NAMES]
    norms.append(getattr(model.get_decoder(), "norm", None))
    for norm in norms:
        if norm is not None and _norm_matches(norm):
            norm.forward = types.MethodType(norm_forward, norm)
            counts["norm"] += 1
    for layer in layers:
        mlp, attention = getattr(layer, "mlp", None), getattr(layer, "self_attn", None)
        if mlp is not None and _gated_silu_mlp(mlp):
            mlp.forward = types.MethodType(mlp_forward, mlp)
            counts["mlp"] += 1
        if attention is not None and _install_rope(attention):
            attention.forward = types.MethodType(attention_forward, attention)
            counts["rope"] += 1
    return (f"fused element-wise ops (Inductor, compiled at first use): {counts['norm']} RMSNorms, "
            f"{counts['mlp']} MLPs, RoPE in {counts['rope']} attentions")


def unfuse_decoder_ops_(model: nn.Module) -> int:
    """Undo `fuse_decoder_ops_` on `model`; returns how many modules were restored."""
    from ..methods.base import restore_forward_

    return restore_forward_(model, norm_forward, mlp_forward, attention_forward)
