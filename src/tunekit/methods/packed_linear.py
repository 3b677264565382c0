"""Frozen bf16 linear layers on CPU with their weights kept in oneDNN's blocked layout.

`F.linear` on a CPU hands a plain row-major weight to oneDNN, which re-lays it out for its bf16 kernel on every call,
forward and backward. A frozen weight never changes, so it can be laid out once: `torch.ops.mkldnn._reorder_linear_weight`
(what Inductor's CPU freezing pass uses for inference) gives the blocked copy, `torch.ops.mkldnn._linear_pointwise`
multiplies with it. Training also needs dx = dy @ W, a product with W^T, so W^T gets a blocked copy too.

Measured on this repository's 2-core CPU (AVX512-BF16), bf16, the matmul shapes of a SmolLM2-135M training step
(2,202 tokens; medians of 60 alternated calls): forward 1,358 -> 1,175 ms and backward (dx) 1,334 -> 1,164 ms per
step summed over its 30 layers' linears, i.e. 330-420 GFLOP/s instead of 310-360. Whole training step, A/B in one
process: +5%. Cost: two more copies of the frozen linear weights (2 bytes per weight each).

The branch of a LoRA layer is added inside the matmul (oneDNN's binary "add" post-op works on the fp32 accumulator
before the one rounding, like `torch.addmm`, see lora_kernel.base_plus_branch): the small adapter contribution
survives bf16 rounding.

Where the CPU lacks the instructions oneDNN's bf16 path needs (AVX2-only x86: no avx512bw/vl/dq, no avx_ne_convert),
`available` says so and `pack_frozen_linears_` leaves the model as it is, with one log line: F.linear runs instead.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch
from torch import nn

_ATTR = "_tunekit_packed"


def available(device: torch.device) -> tuple[bool, str]:
    """Whether packed bf16 weights can be used on `device`, and if not, why."""
    if device.type != "cpu":
        return False, f"not used on {device.type} (CPU only)"
    from ..engine.device import cpu_onednn_bf16  # here: tunekit.engine imports this module

    isa_ok, why = cpu_onednn_bf16()  # first: TUNEKIT_CPU_FLAGS can simulate a CPU without the instructions
    if not isa_ok:
        return False, why
    if not torch.backends.mkldnn.is_available():
        return False, "this torch build has no oneDNN (mkldnn)"
    if not hasattr(torch.ops.mkldnn, "_linear_pointwise") or not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return False, "this torch build lacks mkldnn._linear_pointwise"
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False, "this CPU has no bf16 support in oneDNN"
    return True, ""


@dataclass
class PackedWeight:
    """A frozen (out, in) bf16 weight in oneDNN's blocked layout, for x @ W^T, and its transpose, for dy @ W."""

    w: torch.Tensor  # blocked (out, in)
    wt: torch.Tensor  # blocked (in, out)
    source: torch.Tensor  # the module's weight it was made from
    version: int  # source._version when packed: an in-place change makes the copy stale

    @classmethod
    def of(cls, weight: torch.Tensor) -> "PackedWeight":
        plain = weight.detach()
        reorder = torch.ops.mkldnn._reorder_linear_weight
        return cls(reorder(plain), reorder(plain.t().contiguous()), weight, weight._version)

    def fresh_for(self, weight: torch.Tensor) -> bool:
        return weight is self.source and weight._version == self.version


class PackedLinearFn(torch.autograd.Function):
    """x (..., in) bf16 -> x @ W^T (+ bias) (+ branch) (..., out) bf16, with W frozen (no weight gradient)."""

    @staticmethod
    def forward(ctx, x, branch, packed: PackedWeight, bias, out_dtype_of_dx: torch.dtype):
        linear = torch.ops.mkldnn._linear_pointwise
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        out_features = packed.source.shape[0]
        if branch is None:
            y = linear(x2, packed.w, bias, "none", [], "")
        else:  # branch added to the fp32 accumulator before the output is rounded (see module docstring)
            y = linear.binary(x2, branch.reshape(-1, out_features).to(torch.bfloat16), packed.w, bias, "add")
        ctx.packed, ctx.dx_dtype = packed, out_dtype_of_dx
        return y.view(*lead, out_features)

    @staticmethod
    def backward(ctx, gy):
        dx = dbranch = None
        if ctx.needs_input_grad[0]:
            g2 = gy.reshape(-1, gy.shape[-1]).to(torch.bfloat16)
            dx = torch.ops.mkldnn._linear_pointwise(g2, ctx.packed.wt, None, "none", [], "")  # (N, in) = dy @ W
            dx = dx.view(*gy.shape[:-1], dx.shape[-1]).to(ctx.dx_dtype)
        if ctx.needs_input_grad[1]:
            dbranch = gy
        return dx, dbranch, None, None, None


def packed_of(module: nn.Module) -> PackedWeight | None:
    """The module's packed weight, re-packed if its weight was changed in place since; None when not packed."""
    packed = module.__dict__.get(_ATTR)
    if packed is None or module.weight.dtype != torch.bfloat16:
        return None
    if not packed.fresh_for(module.weight):
        packed = PackedWeight.of(module.weight)
        module.__dict__[_ATTR] = packed
    return packed


def usable(x: torch.Tensor) -> bool:
    """Whether a call with input `x` can take the packed path: CPU, bf16 input or bf16 autocast, eager mode."""
    if x.device.type != "cpu" or torch.compiler.is_compiling():
        return False
    return x.dtype == torch.bfloat16 or (torch.is_autocast_enabled("cpu")
                                         and torch.get_autocast_dtype("cpu") == torch.bfloat16)


def packed_linear(x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None,
                  branch: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W^T (+ bias) (+ branch) in bf16 from the packed W; dx comes back in x's dtype (as autocast's cast)."""
    return PackedLinearFn.apply(x, branch, packed, bias, x.dtype)


def packed_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """Instance forward of a packed frozen nn.Linear; nn.Linear's own where the packed path does not apply."""
    packed = packed_of(self) if usable(x) else None
    if packed is None:
        return type(self).forward(self, x)
    return packed_linear(x, packed, self.bias)


def pack_frozen_linears_(model: nn.Module) -> int:
    """Give every frozen bf16 nn.Linear of `model` a packed weight and the packed forward (mutates the modules);
    returns how many. Trained layers and fp32 ones keep nn.Linear's forward. Where packing is not available
    (see `available`: an AVX2-only CPU, a torch without oneDNN) it prints why and packs nothing, instead of
    failing in oneDNN's reorder."""
    ok, why = available(torch.device("cpu"))
    if not ok:
        print(f"[tunekit] frozen linears not packed for oneDNN: {why} (plain F.linear instead)", flush=True)
        return 0
    n = 0
    for module in model.modules():
        if type(module) is not nn.Linear or module.weight.dtype != torch.bfloat16:
            continue
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            continue
        module.__dict__[_ATTR] = PackedWeight.of(module.weight)
        module.forward = types.MethodType(packed_forward, module)
        n += 1
    return n


def unpack_frozen_linears_(model: nn.Module) -> int:
    """Undo `pack_frozen_linears_` (frees the packed copies); returns how many layers were restored."""
    from .base import restore_forward_

    for module in model.modules():
        module.__dict__.pop(_ATTR, None)
    return restore_forward_(model, packed_forward)
