"""torch.compile of the decoder layers, where it pays.

What it buys: a decoder layer is ~8 matmuls and ~40 small element-wise kernels (RMSNorm in fp32, RoPE, SiLU x up,
residual adds, dtype casts, dropout), each reading and writing whole (T, H) tensors; on a CPU the element-wise part
costs as much as the matmuls. Inductor fuses it into a few vectorised loops, forward and backward.

How: each decoder layer is compiled on its own (`layer.compile(dynamic=True)`): every layer shares one graph (their
weights are graph inputs), the sequence length is symbolic, so packed rows of any length reuse it; the per-sequence
attention (a Python loop over cu_seq_lens) is a graph break, so the graph ends before it and resumes after it.
The first layer compiles twice (its input needs no gradient); evaluation under no_grad compiles once more.
Compilation takes about a minute on 2 CPU cores and is cached on disk by Inductor for later runs. Measured on
SmolLM2-135M LoRA (2 cores, bf16, steps alternated with an eager copy in one process): 380 vs 356 tokens/s (+7%),
first step 55 s (36 s with a warm cache) instead of 6 s; so `auto` compiles only runs of AUTO_MIN_STEPS or more.
`fallback_random` keeps dropout on torch's own RNG, so seeded runs and exact resume behave as in eager mode.
"""

from __future__ import annotations

import shutil

import torch
from torch import nn


def can_compile(device: torch.device) -> tuple[bool, str]:
    """Whether Inductor can build kernels here, and if not, why."""
    if device.type == "cpu":
        if not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
            return False, "no C++ compiler on PATH (install g++)"
        return True, ""
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return False, "triton is not installed"
        return True, ""
    return False, f"not used on {device.type}"


def decoder_layers(model: nn.Module) -> nn.ModuleList | None:
    """The decoder's list of layers for transformers causal LMs (model.model.layers and friends)."""
    try:
        decoder = model.get_decoder()
    except (AttributeError, NotImplementedError):
        return None
    layers = getattr(decoder, "layers", None) or getattr(decoder, "h", None)
    return layers if isinstance(layers, nn.ModuleList) and len(layers) else None


def layers_compiled(model: nn.Module) -> bool:
    """Whether `compile_decoder_layers_` compiled this model's decoder layers."""
    layers = decoder_layers(model)
    return layers is not None and any(getattr(layer, "_compiled_call_impl", None) is not None for layer in layers)


AUTO_MIN_STEPS = 300  # measured: +7% tokens/s after ~40-60 s of compiling (2 CPU cores): pays off after ~10 min


def compile_decoder_layers_(model: nn.Module, setting: str, device: torch.device, method_ok: bool,
                            steps: int, fused_lora_layers: int = 0) -> str:
    """Compile each decoder layer in place (mutates `model`) when `setting` is on, or auto and worth it.

    `model` is the plain transformers causal LM; `fused_lora_layers` counts its LoRA layers switched to the fused
    branch (methods/lora_kernel.py). Returns a one-line account for the log.
    """
    if setting == "off":
        return "torch.compile off"
    if setting == "auto" and fused_lora_layers:
        # Measured (tunekit bench train, 2 cores, tcmalloc, 2026-11-24): the eager fused branch 462 tokens/s,
        # compiled layers (which trace peft's forward) 444, eager peft 425.
        return "torch.compile not used: the fused LoRA branch runs eagerly, faster here (train.compile on forces it)"
    if setting == "auto" and steps < AUTO_MIN_STEPS:
        return f"torch.compile not used for a run of {steps} < {AUTO_MIN_STEPS} steps (train.compile on forces it)"
    ok, why = can_compile(device)
    if ok and not method_ok:
        ok, why = False, "this method's layers are not compiled"
    layers = decoder_layers(model) if ok else None
    if ok and layers is None:
        ok, why = False, "no decoder layer list found in this model"
    if not ok:
        if setting == "on":
            raise RuntimeError(f"train.compile is on but torch.compile cannot be used: {why}")
        return f"torch.compile skipped: {why}"
    import torch._dynamo
    import torch._inductor.config as inductor_config

    inductor_config.fallback_random = True  # dropout from torch's RNG: same streams as eager, exact resume
    if setting == "auto":
        torch._dynamo.config.suppress_errors = True  # a graph that fails to compile runs eagerly instead
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 16)
    note = ""
    if fused_lora_layers:
        from ..methods.lora_kernel import use_peft_forward_

        # Compiled code would take peft's path inside fast_forward anyway (is_compiling); restoring peft's own
        # forward keeps the layers identical for dynamo, with no per-instance function to guard on.
        note = f"; peft's LoRA forward restored on {use_peft_forward_(model)} layers"
    for layer in layers:
        layer.compile(dynamic=True)
    return (f"torch.compile: {len(layers)} decoder layers (first steps compile, ~1 min on 2 CPU cores; cached "
            f"after){note}")
