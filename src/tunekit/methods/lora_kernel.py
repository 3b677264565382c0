"""A faster training forward/backward for peft's LoRA linear layers (same parameters, same saved adapters).

peft computes the adapter branch as `lora_B(lora_A(dropout(x))) * scaling`: five autograd nodes, each with its own
copies (dropout mask in the input dtype, autocast casts of x, A and B, the scaling multiply), and torch's dropout
draws one float per element (`bernoulli_`), which on a CPU costs more than the branch's two matmuls: measured on
2 cores for a (2300, 576) fp32 input, F.dropout 10.6 ms against ~1.4 ms for the mask below, applied. Per SmolLM2-135M
training step with LoRA on q_proj and v_proj that is 60 dropouts, ~12% of the step.

`LoraBranch` computes the same branch as one autograd node:

    forward:  xm = x * keep               keep ~ Bernoulli(1 - p), drawn 15 bits per element from random int64 words,
                                          applied as a bitwise AND on x's bits
              h  = xm @ (A / (1 - p))^T   dropout's rescale and peft's scaling s go on the small matrices
              y  = h @ (s·B)^T            in the compute dtype (bf16 under autocast)
    backward: gh = gy @ (s·B)             (T, r)
              dB = s · gy^T @ h,  dA = gh^T @ xm / (1 - p),  dx = (gh @ A / (1 - p)) * keep

and `fast_forward` replaces the forward of peft `lora.Linear` layers in the plain case (one active adapter, not
merged, no DoRA or other variant, dropout or no dropout); anything else goes through peft's own forward. The
dropout probability is rounded to a multiple of 1/32768 (0.05 -> 0.0499878...). The mask uses torch's default
generator, so seeded runs repeat and resumed runs continue the same random stream.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from .packed_linear import packed_linear, packed_of, usable

_MASK_BITS = 15  # each int64 word from torch's generator gives four 16-bit lanes; the low 15 bits of each are used
_INT_OF_SIZE = {2: torch.int16, 4: torch.int32, 8: torch.int64}  # same-size integer view of a float dtype


def keep_bits(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """int16 tensor of `shape`: -1 (all bits set: keep) with probability 1 - p, else 0 (drop).

    p is rounded to a multiple of 2**-15. The mask is made with four in-place integer passes over the random
    words and applied with a bitwise AND on the input's bits (`apply_bits`): on 2 CPU cores for a (2350, 576)
    input, 1.3 ms to draw and 0.07 ms to apply, against 2.2 + 0.6 ms for a bool mask and `torch.where`.
    """
    n = 1
    for d in shape:
        n *= d
    # random_() on int64 fills bits 0..62 (bit 63 is 0): lanes 0-2 are fully random, lane 3 has its top bit 0,
    # so only the low 15 bits of each lane are used.
    words = torch.empty(((n + 3) // 4,), dtype=torch.int64, device=device).random_()
    u = words.view(torch.int16)[:n]
    threshold = round(p * 2**_MASK_BITS)
    # (u & 0x7FFF) - threshold lies in [-threshold, 32767 - threshold]: no overflow, negative exactly when the
    # element is dropped; >> 15 gives -1 there and 0 elsewhere, ~ flips it to the keep mask.
    return u.bitwise_and_(2**_MASK_BITS - 1).sub_(threshold).bitwise_right_shift_(15).bitwise_not_().view(shape)


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """Bool tensor of `shape`, True with probability 1 - p: the same draw as `keep_bits` (for references)."""
    return keep_bits(shape, p, device) != 0


def apply_bits(t: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """t where the keep mask `bits` (0 / -1 integers, broadcastable) is set, +0.0 elsewhere (new tensor)."""
    int_dtype = _INT_OF_SIZE.get(t.element_size())
    if int_dtype is None or not t.is_floating_point():
        return torch.where(bits != 0, t, 0)
    return (t.view(int_dtype) & bits.to(int_dtype)).view(t.dtype)  # -1 sign-extends to all bits set


def compute_dtype(x: torch.Tensor, weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype the branch's matmuls run in: autocast's when it is on, else the adapter weights' (as peft)."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else weight_dtype


class LoraBranch(torch.autograd.Function):
    """x (..., in), A (r, in), B (out, r) -> s · dropout_p(x) @ A^T @ B^T  (..., out), in `dtype`."""

    @staticmethod
    def forward(ctx, x, A, B, scaling: float, p: float, dtype: torch.dtype):
        xm = x.to(dtype)
        keep = None
        if p > 0.0:
            bits = keep_bits(xm.shape, p, xm.device)  # (..., in) int16, -1 = keep
            xm = apply_bits(xm, bits)  # dropped, not yet rescaled: the 1/(1-p) goes into A below
            keep = bits.to(torch.int8)  # saved for backward at one byte per element
        inv = 1.0 / (1.0 - p)
        a = (A * inv).to(dtype) if p > 0.0 else A.to(dtype)  # (r, in): dropout's rescale on the small matrix
        sb = (B * scaling).to(dtype)  # (out, r): the scaling folded into the small matrix
        h = xm @ a.t()  # (..., r) = dropout(x) @ A^T
        ctx.save_for_backward(xm, keep, h, a, sb)
        ctx.scaling, ctx.inv, ctx.x_dtype, ctx.A_dtype, ctx.B_dtype = scaling, inv, x.dtype, A.dtype, B.dtype
        return h @ sb.t()  # (..., out)

    @staticmethod
    def backward(ctx, gy):
        xm, keep, h, a, sb = ctx.saved_tensors
        gy = gy.to(a.dtype)
        gh = gy @ sb  # (..., r), includes the scaling
        dx = dA = dB = None
        if ctx.needs_input_grad[0]:
            dx = gh @ a  # (..., in), includes 1/(1-p)
            if keep is not None:
                dx = apply_bits(dx, keep)
            dx = dx.to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            dA = (gh.flatten(0, -2).t() @ xm.flatten(0, -2)).to(ctx.A_dtype) * ctx.inv  # (r, in)
        if ctx.needs_input_grad[2]:
            dB = (gy.flatten(0, -2).t() @ h.flatten(0, -2)).to(ctx.B_dtype) * ctx.scaling  # (out, r)
        return dx, dA, dB, None, None, None


def lora_branch(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, p: float) -> torch.Tensor:
    """The adapter branch of one LoRA linear layer: x (..., in) -> (..., out) in the compute dtype."""
    return LoraBranch.apply(x, A, B, scaling, p, compute_dtype(x, A.dtype))


def _plain_adapter(layer) -> str | None:
    """The one active adapter of `layer` when peft's plain LoRA path applies to it, else None."""
    if layer.disable_adapters or layer.merged:
        return None
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if len(active) != 1 or active[0] in getattr(layer, "lora_variant", {}):
        return None
    dropout = layer.lora_dropout[active[0]]
    if not isinstance(dropout, (nn.Dropout, nn.Identity)):
        return None
    return active[0]


def fast_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Instance forward for a peft lora.Linear: base layer + LoraBranch; peft's forward for other cases."""
    # Should torch.compile trace it anyway, peft's own forward is traced (our Function's random_ would break the
    # graph each call); engine/compile.py restores peft's forward before compiling (`use_peft_forward_`).
    name = None if (args or kwargs or torch.compiler.is_compiling()) else _plain_adapter(self)
    if name is None:
        return type(self).forward(self, x, *args, **kwargs)
    base = self.get_base_layer()
    dropout = self.lora_dropout[name]
    p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
    dtype = compute_dtype(x, self.lora_A[name].weight.dtype)
    xc = x.to(dtype) if torch.is_autocast_enabled(x.device.type) else x  # one cast shared by base and branch
    branch = LoraBranch.apply(xc, self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name], p, dtype)
    if type(base) is nn.Linear and not (base._forward_hooks or base._forward_pre_hooks):
        packed = packed_of(base)  # frozen weight in oneDNN's layout (CPU; bf16, or fp32 where it pays)
        if packed is not None and usable(xc, packed.dtype):
            return packed_linear(xc, packed, base.bias, branch)
        return base_plus_branch(xc, base.weight, base.bias, branch)
    result = base(xc)
    return (result + branch.to(result.dtype)).to(result.dtype)


def base_plus_branch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     branch: torch.Tensor) -> torch.Tensor:
    """x @ weight^T (+ bias) + branch, with the branch added inside the matmul (addmm) before its output is rounded.

    x (..., in), weight (out, in), branch (..., out). In bf16, `base(x) + branch` first rounds the base output to
    bf16 and then adds the adapter's contribution, which early in training is far below one bf16 step of the
    output: x + d rounds back to x whenever |d| < half a step, so the forward pass loses most of what LoRA has
    learned (for d = 1/8 of a step, all of it) and training lags fp32 (measured: training loss ~1.8% above fp32 on
    the same batches after 6-12 steps). addmm adds the branch to the fp32 accumulator before the single rounding,
    so d survives on average (mean shift 0.998e-3 for d = 1e-3 on outputs ~1, against 0.47e-3), and it saves the
    separate add.
    """
    lead = x.shape[:-1]
    out = torch.addmm(branch.reshape(-1, weight.shape[0]), x.reshape(-1, x.shape[-1]), weight.t())
    out = out.view(*lead, weight.shape[0])
    return out if bias is None else out + bias


def use_fast_lora_(model: nn.Module) -> int:
    """Route the plain-LoRA forward of every peft lora.Linear in `model` through LoraBranch (mutates the
    modules' forward in place); returns how many layers were switched."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    n = 0
    for module in model.modules():
        if type(module) is LoraLinear and isinstance(module.get_base_layer(), nn.Linear):
            module.forward = types.MethodType(fast_forward, module)
            n += 1
    return n


def use_peft_forward_(model: nn.Module) -> int:
    """Undo `use_fast_lora_`: every peft lora.Linear in `model` runs peft's own forward again; returns how many."""
    from .base import restore_forward_

    return restore_forward_(model, fast_forward)
