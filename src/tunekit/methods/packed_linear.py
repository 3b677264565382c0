"""Frozen linear layers on CPU with their weights kept in oneDNN's blocked layout (bf16, or fp32 where it pays).

`F.linear` on a CPU hands a plain row-major weight to oneDNN, which re-lays it out for its bf16 kernel on every call,
forward and backward. A frozen weight never changes, so it can be laid out once: `torch.ops.mkldnn._reorder_linear_weight`
(what Inductor's CPU freezing pass uses for inference) gives the blocked copy, `torch.ops.mkldnn._linear_pointwise`
multiplies with it. Training also needs dx = dy @ W, a product with W^T, so W^T gets a blocked copy too.

Measured on this repository's 2-core CPU (AVX512-BF16), bf16, the matmul shapes of a SmolLM2-135M training step
(2,202 tokens; medians of 60 alternated calls): forward 1,358 -> 1,175 ms and backward (dx) 1,334 -> 1,164 ms per
step summed over its 30 layers' linears, i.e. 330-420 GFLOP/s instead of 310-360. Whole training step, A/B in one
process: +5%. Cost: two more copies of the frozen linear weights (2 bytes per weight each).

fp32: there `F.linear` goes to MKL, not oneDNN. On AMD CPUs MKL's AVX2 code path is slow: with MKL and oneDNN capped
to AVX2 on this Zen 4 (MKL_ENABLE_INSTRUCTIONS=AVX2, ONEDNN_MAX_CPU_ISA=AVX2), the SmolLM2 shapes at 2,048 rows ran
at 38.8 GFLOP/s in MKL and 52.2 in oneDNN's packed product (1.35x; 1.45-1.64x uncapped; medians of 8 alternated
rounds in one process, on a busy machine). Whether it pays is a property of the CPU and its BLAS, so fp32 packing is
decided by measuring both on the model's shapes at start-up (`fp32_packing_pays`), not assumed.

The branch of a LoRA layer is added inside the matmul (oneDNN's binary "add" post-op works on the fp32 accumulator
before the one rounding, like `torch.addmm`, see lora_kernel.base_plus_branch): the small adapter contribution
survives bf16 rounding.

Where the CPU lacks the instructions oneDNN's bf16 path needs (AVX2-only x86: no avx512bw/vl/dq, no avx_ne_convert),
`available` says so for bf16 and `pack_frozen_linears_` leaves the model as it is, with one log line: F.linear runs
instead. oneDNN's fp32 path needs no such instructions.
"""

from __future__ import annotations

import time
import types
from dataclasses import dataclass

import torch
from torch import nn

_ATTR = "_tunekit_packed"


def available(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> tuple[bool, str]:
    """Whether packed `dtype` weights can be used on `device`, and if not, why."""
    if device.type != "cpu":
        return False, f"not used on {device.type} (CPU only)"
    if dtype == torch.bfloat16:
        from ..engine.device import cpu_onednn_bf16  # here: tunekit.engine imports this module

        isa_ok, why = cpu_onednn_bf16()  # first: TUNEKIT_CPU_FLAGS can simulate a CPU without the instructions
        if not isa_ok:
            return False, why
    elif dtype != torch.float32:
        return False, f"no packed path for {dtype}"
    if not torch.backends.mkldnn.is_available():
        return False, "this torch build has no oneDNN (mkldnn)"
    if not hasattr(torch.ops.mkldnn, "_linear_pointwise") or not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return False, "this torch build lacks mkldnn._linear_pointwise"
    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False, "this CPU has no bf16 support in oneDNN"
    return True, ""


def fp32_packing_pays(shapes: dict[tuple[int, int], int], rows: int = 2048, rounds: int = 4) -> tuple[float, str]:
    """(speed-up, note): F.linear's time over the packed product's for the model's linear `shapes` ({(out, in):
    count}), forward (x @ W^T) and input gradient (dy @ W), medians of `rounds` alternated rounds on this CPU.
    About a quarter of a second for a 135M model."""
    ok, why = available(torch.device("cpu"), torch.float32)
    if not ok:
        return 0.0, why
    gen = torch.Generator().manual_seed(0)
    plain_t, packed_t = [], []
    cases = []
    for (n_out, n_in), count in shapes.items():
        w = torch.randn(n_out, n_in, generator=gen)
        x, dy = torch.randn(rows, n_in, generator=gen), torch.randn(rows, n_out, generator=gen)
        pw = PackedWeight.of(w)
        cases.append((count, lambda x=x, dy=dy, w=w: (nn.functional.linear(x, w), dy @ w),
                      lambda x=x, dy=dy, pw=pw: (_pointwise(x, pw.w), _pointwise(dy, pw.wt))))
    for _ in range(rounds):
        for times, which in ((plain_t, 1), (packed_t, 2)):
            total = 0.0
            for case in cases:
                case[which]()  # warm
                t = time.perf_counter()
                case[which]()
                total += case[0] * (time.perf_counter() - t)
            times.append(total)
    speedup = sorted(plain_t)[rounds // 2] / sorted(packed_t)[rounds // 2]
    return speedup, f"oneDNN's packed fp32 product {speedup:.2f}x F.linear on this CPU's model shapes"


FP32_MIN_SPEEDUP = 1.1  # below this the two extra fp32 copies are not worth it


def decide_fp32_packing(shapes: dict[tuple[int, int], int], mode: str, cache_dir=None) -> tuple[bool, str]:
    """(pack fp32 frozen weights?, why) for train.packed_weights_fp32 `mode` (auto, on, off).

    auto: only on CPUs without native bf16 (there fp32 is the training precision; elsewhere fp32 runs are rare and
    packing them was not measured to pay), and only where `fp32_packing_pays` measures >= FP32_MIN_SPEEDUP; the
    verdict is kept per machine, thread count, torch and shapes in ~/.cache/tunekit/fp32_packing.json, so that every
    run (and every rank of a distributed one) after the first decides the same.
    """
    from pathlib import Path

    from ..engine.device import cpu_has_bf16, cpu_name
    from ..engine.flops import read_cache, write_cache

    if mode == "off":
        return False, "train.packed_weights_fp32 off"
    ok, why = available(torch.device("cpu"), torch.float32)
    if not ok:
        return False, why
    if mode == "on":
        return True, "train.packed_weights_fp32 on"
    if cpu_has_bf16():
        return False, "this CPU trains in bf16 natively: fp32 packing is only decided by measurement on CPUs without it"
    path = Path(cache_dir or Path.home() / ".cache" / "tunekit") / "fp32_packing.json"
    tag = ",".join(f"{o}x{i}*{c}" for (o, i), c in sorted(shapes.items()))
    key = f"{cpu_name()}|threads={torch.get_num_threads()}|torch={torch.__version__}|{tag}"
    table = read_cache(path)
    if key not in table:
        table[key] = fp32_packing_pays(shapes)[0]
        write_cache(path, table)
    speedup = table[key]
    verdict = "packed" if speedup >= FP32_MIN_SPEEDUP else f"not packed (below {FP32_MIN_SPEEDUP}x)"
    return speedup >= FP32_MIN_SPEEDUP, (f"oneDNN's packed fp32 product measured {speedup:.2f}x F.linear on this CPU's "
                                         f"model shapes ({path}): {verdict}")


def _pointwise(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


@dataclass
class PackedWeight:
    """A frozen (out, in) bf16 or fp32 weight in oneDNN's blocked layout, for x @ W^T, and its transpose, for dy @ W."""

    w: torch.Tensor  # blocked (out, in)
    wt: torch.Tensor  # blocked (in, out)
    source: torch.Tensor  # the module's weight it was made from
    version: int  # source._version when packed: an in-place change makes the copy stale

    @classmethod
    def of(cls, weight: torch.Tensor) -> "PackedWeight":
        plain = weight.detach()
        reorder = torch.ops.mkldnn._reorder_linear_weight
        return cls(reorder(plain), reorder(plain.t().contiguous()), weight, weight._version)

    @property
    def dtype(self) -> torch.dtype:
        return self.source.dtype

    def fresh_for(self, weight: torch.Tensor) -> bool:
        return weight is self.source and weight._version == self.version


class PackedLinearFn(torch.autograd.Function):
    """x (..., in) -> x @ W^T (+ bias) (+ branch) (..., out) in W's dtype (bf16 or fp32); W frozen, no weight grad."""

    @staticmethod
    def forward(ctx, x, branch, packed: PackedWeight, bias, out_dtype_of_dx: torch.dtype):
        linear = torch.ops.mkldnn._linear_pointwise
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1]).to(packed.dtype)
        out_features = packed.source.shape[0]
        if branch is None:
            y = linear(x2, packed.w, bias, "none", [], "")
        else:  # branch added to the fp32 accumulator before the output is rounded (see module docstring)
            y = linear.binary(x2, branch.reshape(-1, out_features).to(packed.dtype), packed.w, bias, "add")
        ctx.packed, ctx.dx_dtype = packed, out_dtype_of_dx
        return y.view(*lead, out_features)

    @staticmethod
    def backward(ctx, gy):
        dx = dbranch = None
        if ctx.needs_input_grad[0]:
            g2 = gy.reshape(-1, gy.shape[-1]).to(ctx.packed.dtype)
            dx = torch.ops.mkldnn._linear_pointwise(g2, ctx.packed.wt, None, "none", [], "")  # (N, in) = dy @ W
            dx = dx.view(*gy.shape[:-1], dx.shape[-1]).to(ctx.dx_dtype)
        if ctx.needs_input_grad[1]:
            dbranch = gy
        return dx, dbranch, None, None, None


def packed_of(module: nn.Module) -> PackedWeight | None:
    """The module's packed weight, re-packed if its weight was changed in place since; None when not packed."""
    packed = module.__dict__.get(_ATTR)
    if packed is None or module.weight.dtype != packed.dtype:
        return None
    if not packed.fresh_for(module.weight):
        packed = PackedWeight.of(module.weight)
        module.__dict__[_ATTR] = packed
    return packed


def usable(x: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether a call with input `x` can take the packed path of a `dtype` weight: CPU, eager mode, and a bf16
    input or bf16 autocast for a bf16 weight, an fp32 input outside autocast for an fp32 one."""
    if x.device.type != "cpu" or torch.compiler.is_compiling():
        return False
    autocast_bf16 = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    if dtype == torch.float32:
        return x.dtype == torch.float32 and not autocast_bf16
    return x.dtype == torch.bfloat16 or autocast_bf16


def packed_linear(x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None,
                  branch: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W^T (+ bias) (+ branch) in W's dtype from the packed W; dx comes back in x's dtype (as autocast's cast)."""
    return PackedLinearFn.apply(x, branch, packed, bias, x.dtype)


def packed_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """Instance forward of a packed frozen nn.Linear; nn.Linear's own where the packed path does not apply."""
    packed = packed_of(self)
    if packed is None or not usable(x, packed.dtype):
        return type(self).forward(self, x)
    return packed_linear(x, packed, self.bias)


def pack_frozen_linears_(model: nn.Module, dtype: torch.dtype = torch.bfloat16,
                         skip: frozenset[int] = frozenset()) -> int:
    """Give every frozen `dtype` nn.Linear of `model` a packed weight and the packed forward (mutates the modules);
    returns how many; `skip`: ids of weights to leave alone (an LM head the loss reads directly). Trained layers and
    layers of another dtype keep nn.Linear's forward. Where packing is not
    available (see `available`: bf16 on an AVX2-only CPU, a torch without oneDNN) it prints why and packs nothing,
    instead of failing in oneDNN's reorder."""
    ok, why = available(torch.device("cpu"), dtype)
    if not ok:
        print(f"[tunekit] frozen linears not packed for oneDNN: {why} (plain F.linear instead)", flush=True)
        return 0
    n = 0
    for module in model.modules():
        if type(module) is not nn.Linear or module.weight.dtype != dtype or id(module.weight) in skip:
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
