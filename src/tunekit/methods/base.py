"""The one small interface every fine-tuning method implements.

The engine only ever calls these methods; it never branches on a method's name. A method owns: how it
injects itself into a base model, which parameters train, how its result is saved and loaded, and (where
it can) how it folds into the base weights.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from ..attention import cu_seq_lens


class MethodError(ValueError):
    """A method cannot do what was asked (bad target, cannot merge, ...); the message says what is valid."""


class Method(ABC):
    name: str
    # Whether training may pack several sequences into one row (per-sequence attention via cu_seq_lens). Methods
    # that prepend virtual tokens (prompt/prefix tuning) need one sequence per row: the loop pads instead.
    supports_packing: bool = True
    # Whether the engine may torch.compile the decoder layers with this method's modules inside them.
    supports_compile: bool = True
    # Whether merge() can fold the result into plain base weights (LoRA, IA3, BitFit, freeze, full).
    can_merge: bool = False

    def prepare(self, model: nn.Module, batches: Iterator, forward_loss: Callable, device: torch.device) -> None:
        """Look at a sample of the training data before apply() (e.g. to choose what trains); default: nothing.

        `batches` yields training micro-batches (engine.batching.Batch) in a seeded order; `forward_loss(model,
        batch)` is the training step's forward on `device` under the run's precision and returns (summed label
        loss, number of targets). A method that uses them moves `model` to `device` first, and leaves no
        gradients, requires_grad changes or train/eval mode change behind.
        """

    @abstractmethod
    def apply(self, model: nn.Module) -> nn.Module:
        """Prepare `model` for training: inject modules, set requires_grad. Returns the model to train."""

    @abstractmethod
    def save(self, model: nn.Module, out_dir: Path) -> None:
        """Write the trained result (adapter or full weights) into `out_dir`."""

    @abstractmethod
    def load(self, base: nn.Module, path: Path) -> nn.Module:
        """Attach a saved result to a freshly loaded base model."""

    def merge(self, model: nn.Module) -> nn.Module:
        """Fold the method into plain base weights (zero inference overhead)."""
        raise MethodError(f"method {self.name!r} cannot be merged into the base weights; load the run folder as "
                          f"an adapter instead (tunekit generate --adapter RUN_DIR)")

    def causal_lm(self, model: nn.Module) -> nn.Module:
        """The underlying transformers *ForCausalLM (with the method's layers injected)."""
        return model

    def hidden_states(
        self, model: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Final hidden states (B, T, H) before the LM head; methods that change the forward override this."""
        decoder = self.causal_lm(model).get_decoder()
        out = decoder(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, use_cache=False,
                      **packed_attention_kwargs(position_ids, attention_mask))
        return out.last_hidden_state

    def lm_head(self, model: nn.Module) -> nn.Module:
        return self.causal_lm(model).get_output_embeddings()

    def report(self) -> dict[str, str | int | float]:
        """Method-specific facts for the run card (e.g. measured bits per quantized weight); {} if none."""
        return {}

    def card_section(self) -> str:
        """Extra Markdown for the run card after its main table (e.g. a per-group table); '' if none."""
        return ""


def packed_attention_kwargs(position_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> dict:
    """Sequence boundaries of a packed (1, T) row, in the keywords varlen attention kernels read."""
    if attention_mask is not None or position_ids.shape[0] != 1:
        return {}
    cu = cu_seq_lens(position_ids)
    longest = int((cu[1:] - cu[:-1]).max())
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def trainable_named_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def restore_forward_(model: nn.Module, *functions) -> int:
    """Drop the instance `forward` of every module of `model` that one of `functions` was bound to (undoing a
    `module.forward = types.MethodType(fn, module)` switch), so its class forward runs again; returns how many."""
    n = 0
    for module in model.modules():
        if getattr(module.__dict__.get("forward"), "__func__", None) in functions:
            del module.forward
            n += 1
    return n


def cast_frozen_linears_(model: nn.Module, dtype: torch.dtype) -> int:
    """Store frozen nn.Linear weights in `dtype` (mutates `model`); returns how many were cast.

    Under bf16 autocast every linear layer casts its fp32 weight to bf16 on each call, forward and backward.
    Storing frozen weights in bf16 once gives bit-identical matmuls without the per-step copies and halves
    their memory. Weights shared with the input embedding (tied LM heads) stay as they are, so embedding
    lookups and the residual stream keep their precision.
    """
    embedding = model.get_input_embeddings().weight if hasattr(model, "get_input_embeddings") else None
    cast = 0
    for module in model.modules():
        if type(module) is not nn.Linear or module.weight is embedding:
            continue
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            continue
        module.to(dtype)
        cast += 1
    return cast


def logical_numel(p: torch.Tensor) -> int:
    """Weights a parameter stands for: a packed 4-bit tensor (bitsandbytes) holds two per byte."""
    quant_state = getattr(p, "quant_state", None)
    return quant_state.shape.numel() if quant_state is not None else p.numel()


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights are counted once, quantized ones by their logical size."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += logical_numel(p)
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


# --- our own on-disk format, for methods HF peft does not have (adapter, bitfit, freeze) ---------------------
# A run folder holds `tunekit_method.json` ({"format": "tunekit", "version": 1, "method": {the method's config
# section}, ...method-specific keys}) and `tunekit_weights.safetensors` (the trained tensors, keyed by their
# parameter names in the transformers *ForCausalLM, e.g. "model.layers.0.mlp.down_proj.bias").

METHOD_FILE = "tunekit_method.json"
WEIGHTS_FILE = "tunekit_weights.safetensors"
FORMAT_VERSION = 1


def save_own_format(out_dir: Path, cfg, tensors: dict[str, torch.Tensor], **extra) -> None:
    """Write the method config (+ `extra` keys) as JSON and `tensors` as safetensors into `out_dir`."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"format": "tunekit", "version": FORMAT_VERSION, "method": cfg.model_dump(mode="json"), **extra}
    save_file({k: t.detach().contiguous().cpu() for k, t in tensors.items()}, str(out_dir / WEIGHTS_FILE))
    (out_dir / METHOD_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def read_own_format(path: Path, method_name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, tensors) of a folder written by save_own_format for `method_name`; clear errors otherwise."""
    from safetensors.torch import load_file

    path = Path(path)
    meta_file = path / METHOD_FILE
    if not meta_file.exists():
        raise MethodError(f"{path}: no {METHOD_FILE}; is this a run folder of method {method_name!r}?")
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != "tunekit" or meta.get("version") != FORMAT_VERSION:
        raise MethodError(f"{meta_file}: not a tunekit method file of version {FORMAT_VERSION}")
    saved = meta.get("method", {}).get("name")
    if saved != method_name:
        raise MethodError(f"{path} holds a {saved!r} result, not {method_name!r}")
    return meta, load_file(str(path / WEIGHTS_FILE))


def copy_tensors_(model: nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Copy saved tensors into `model`'s parameters of the same names (mutates `model`); every name must exist."""
    params = dict(model.named_parameters(remove_duplicate=False))
    unknown = sorted(set(tensors) - set(params))
    if unknown:
        raise MethodError(f"{path}: tensors {', '.join(unknown[:5])} do not exist in this model; was it saved "
                          f"from a different base model?")
    with torch.no_grad():
        for name, tensor in tensors.items():
            if params[name].shape != tensor.shape:
                raise MethodError(f"{path}: {name} has shape {tuple(tensor.shape)}, the model's is "
                                  f"{tuple(params[name].shape)}; was it saved from a different base model?")
            params[name].copy_(tensor)
