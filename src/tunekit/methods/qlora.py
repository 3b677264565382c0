"""QLoRA (Dettmers et al. 2023, https://arxiv.org/abs/2305.14314): LoRA on a base whose linear layers are 4-bit.

Every linear layer except the output head is replaced by a bitsandbytes `Linear4bit` (NF4 or FP4 blocks of
`block_size` weights, one absmax scale per block; with double quantization the scales themselves are stored in
8 bits with one fp32 scale per 256 of them). LoRA is then added exactly as in lora.py, through peft, which wraps
`Linear4bit` layers natively. The saved adapter is plain PEFT LoRA format.

Storage per quantized weight, from the tensors actually stored (see `quantization_stats`):
    4 bits + 32 / block_size (fp32 scales)                         = 4.5 bits at block 64, or
    4 bits + 8 / block_size + 32 / (256 * block_size) (double quant) ~ 4.127 bits at block 64,
plus two small codebooks per layer (16 NF4 values, 256 values for the 8-bit scale code), the same constants in
every layer, counted in the model memory but not in the per-weight figure.

The 4-bit layer is bitsandbytes' with one change: under autocast it returns the autocast dtype, as nn.Linear does
(see `autocast_linear4bit_class`; bitsandbytes returns the input's dtype, fp32 after a norm, which made QLoRA keep
fp32 activations: its peak RSS was 21-24% above LoRA r16's on SmolLM2-135M, now below it).

bitsandbytes >= 0.45 runs this on CPU too. Its CPU backend would, on the first no-grad eval pass on CPUs with
AVX512-BF16, repack the weights into an inference-only layout (bf16 scales, not differentiable, double
quantization undone); we switch that off per layer so training and evaluation compute the same function.

`merge` dequantizes the base to fp32 and folds the adapter into it with peft's regular (non-quantized) merge:
the result is a plain model equal to the quantized base + adapter, not to the original fp32 base + adapter.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import torch
from torch import nn

from ..config import QLoraMethod
from .base import MethodError
from .lora import Lora, changes_base

COMPUTE_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def _require_bitsandbytes():
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise MethodError("method 'qlora' needs bitsandbytes: pip install 'tunekit[qlora]' "
                          "(or pip install 'bitsandbytes>=0.45')") from None


def tensor_bytes(tensors) -> int:
    """Bytes of distinct tensors (shared storage counted once)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def quant_state_tensors(state) -> dict[str, torch.Tensor]:
    """The tensors of a bitsandbytes QuantState, by role."""
    out = {"absmax": state.absmax, "code": state.code}
    if state.nested:
        out.update(offset=state.offset, absmax2=state.state2.absmax, code2=state.state2.code)
    return out


def model_bytes(model: nn.Module) -> int:
    """Parameters, buffers and 4-bit quantization states of `model`, in bytes."""
    tensors = list(model.parameters()) + list(model.buffers())
    for p in model.parameters():
        if getattr(p, "quant_state", None) is not None:
            tensors += list(quant_state_tensors(p.quant_state).values())
    return tensor_bytes(tensors)


@functools.cache
def autocast_linear4bit_class() -> type:
    """bitsandbytes' Linear4bit, returning the autocast dtype under autocast as nn.Linear does.

    bitsandbytes casts each output back to its input's dtype. Under bf16 autocast the RMSNorm outputs that q/k/v and
    gate/up read are fp32, so their outputs came back fp32 and everything autograd saves after them (RoPE'd q/k, the
    MLP's gate, activation and up outputs) was kept at twice the size of the LoRA path's: 25% more saved activations
    on a tiny Llama (tests/test_plan.py), and a peak RSS 21-24% above LoRA r16's on SmolLM2-135M. Casting the input
    to the autocast dtype first makes that final cast a no-op when compute_dtype is the autocast dtype.
    """
    import bitsandbytes as bnb

    class AutocastLinear4bit(bnb.nn.Linear4bit):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            kind = x.device.type
            if torch.is_autocast_enabled(kind):
                x = x.to(torch.get_autocast_dtype(kind))
            return super().forward(x)

    return AutocastLinear4bit


def quantize_linears_(model: nn.Module, cfg: QLoraMethod) -> int:
    """Replace every nn.Linear but the output head by a 4-bit Linear4bit (mutates `model`); returns how many."""
    _require_bitsandbytes()
    import bitsandbytes as bnb

    linear4bit = autocast_linear4bit_class()
    head = model.get_output_embeddings()
    done = 0
    for path, module in list(model.named_modules()):
        if type(module) is not nn.Linear or module is head:
            continue
        q = linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                              compute_dtype=COMPUTE_DTYPES[cfg.compute_dtype], compress_statistics=cfg.double_quant,
                              quant_type=cfg.quant_type, device="meta")
        q.weight = bnb.nn.Params4bit(module.weight.data, requires_grad=False, blocksize=cfg.block_size,
                                     compress_statistics=cfg.double_quant, quant_type=cfg.quant_type, module=q)
        if module.bias is not None:
            q.bias = nn.Parameter(module.bias.data, requires_grad=False)
        q.support_avx512bf16_for_cpu = False  # keep one differentiable code path (see the module docstring)
        q.weight = q.weight.to(module.weight.device)  # quantizes
        q.quant_state = q.weight.quant_state
        parent, _, leaf = path.rpartition(".")
        setattr(model.get_submodule(parent), leaf, q)
        done += 1
    if not done:
        raise MethodError("qlora found no nn.Linear layer to quantize in this model")
    return done


def quantization_stats(model: nn.Module) -> dict[str, float]:
    """Measured storage of the 4-bit layers: weights, their stored bits (packed data + scales) and codebooks."""
    weights = data_bits = scale_bits = code_bits = 0
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        if state is None:
            continue
        weights += state.shape.numel()
        data_bits += 8 * p.numel() * p.element_size()
        parts = quant_state_tensors(state)
        scale_bits += 8 * tensor_bytes([parts[k] for k in ("absmax", "offset", "absmax2") if k in parts])
        code_bits += 8 * tensor_bytes([parts[k] for k in ("code", "code2") if k in parts])
    return {"weights": weights, "bits_per_weight": (data_bits + scale_bits) / weights,
            "data_bits_per_weight": data_bits / weights, "scale_bits_per_weight": scale_bits / weights,
            "codebook_bits_per_weight": code_bits / weights}


def dequantize_linears_(model: nn.Module) -> int:
    """Replace every Linear4bit by an fp32 nn.Linear holding its dequantized weight (mutates `model`)."""
    import bitsandbytes as bnb

    done = 0
    for path, module in list(model.named_modules()):
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
        plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                          device=weight.device)
        with torch.no_grad():
            plain.weight.copy_(weight)
            if module.bias is not None:
                plain.bias.copy_(module.bias.float())
        parent, _, leaf = path.rpartition(".")
        setattr(model.get_submodule(parent), leaf, plain)
        done += 1
    return done


class QLora(Lora):
    name = "qlora"
    supports_compile = False  # bitsandbytes' 4-bit matmuls are opaque to Inductor (graph breaks, no gain)

    def __init__(self, cfg: QLoraMethod):
        super().__init__(cfg)
        self.memory_before: int | None = None  # bytes of the base model before / after quantization
        self.memory_after: int | None = None
        self.stats: dict[str, float] = {}

    def quantize_(self, model: nn.Module) -> nn.Module:
        if changes_base(self.cfg.init):
            raise MethodError(f"qlora cannot use init {self.cfg.init!r} (it rewrites the base weights, which are "
                              f"4-bit here); use default, gaussian or orthogonal")
        self.memory_before = model_bytes(model)
        quantize_linears_(model, self.cfg)
        self.memory_after = model_bytes(model)
        self.stats = quantization_stats(model)
        return model

    def apply(self, model: nn.Module) -> nn.Module:
        return super().apply(self.quantize_(model))

    def load(self, base: nn.Module, path: Path) -> nn.Module:
        return super().load(self.quantize_(base), path)

    def merge(self, model: nn.Module) -> nn.Module:
        from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

        config = copy.deepcopy(model.peft_config["default"])
        config.inference_mode = False
        adapter = get_peft_model_state_dict(model)
        plain = model.unload()  # the 4-bit base without LoRA layers
        dequantize_linears_(plain)
        fresh = get_peft_model(plain, config)
        set_peft_model_state_dict(fresh, adapter)
        return fresh.merge_and_unload()

    def report(self) -> dict[str, str | int | float]:
        if not self.stats:
            return {}
        mib = lambda n: f"{n / 2**20:,.1f} MiB"  # noqa: E731
        cfg = self.cfg
        return {
            "Quantization": f"{cfg.quant_type}, block {cfg.block_size}, double quant "
                            f"{'on' if cfg.double_quant else 'off'}, compute {cfg.compute_dtype}",
            "Bits per quantized weight": round(self.stats["bits_per_weight"], 4),
            "Quantized weights": int(self.stats["weights"]),
            "Model memory": f"{mib(self.memory_before)} before quantization -> {mib(self.memory_after)} after",
        }
