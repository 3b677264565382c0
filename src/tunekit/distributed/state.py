"""Checkpoints and the saved model of a multi-process run: written once, by rank 0, in the single-process format.

Under DDP every rank holds the whole model and optimizer, so rank 0 writes what it has. FSDP2 shards both: every
rank takes part in gathering the full tensors (a collective), rank 0 writes them. The files are the same as a
single process writes (engine/checkpoint.py), so a run resumes on any world size that divides the global batch.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from .context import DistContext


def _checkpoint_module():
    from ..engine import checkpoint  # at call time: engine/loop.py imports this module

    return checkpoint


def _full(t):
    """A DTensor shard -> the whole tensor on CPU (a collective: every rank calls it); other values as they are."""
    if hasattr(t, "full_tensor"):
        return t.full_tensor().cpu()
    return t.detach().cpu() if isinstance(t, torch.Tensor) else t


def _sharded_like(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """`full` split as FSDP2 split `param` (a DTensor); tensors of other shapes (Adam's step) as they are."""
    if not hasattr(param, "device_mesh") or tuple(full.shape) != tuple(param.shape):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(param.dtype), param.device_mesh, param.placements)


def gathered_trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    """{name: full CPU tensor} of the trainable parameters; with FSDP2 every rank must call it."""
    return {n: _full(p).contiguous() for n, p in model.named_parameters() if p.requires_grad}


def gathered_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """optimizer.state_dict() with FSDP2's sharded moments gathered: the single-process format."""
    sd = optimizer.state_dict()
    return {"state": {i: {k: _full(v) for k, v in s.items()} for i, s in sd["state"].items()},
            "param_groups": sd["param_groups"]}


def save_checkpoint_once(ctx: DistContext, run_dir: Path, model: nn.Module, optimizer, state,
                         keep: int) -> None:
    """One checkpoint for the whole run, written by rank 0 (FSDP2: after every rank helped gather it)."""
    if ctx.parallel == "fsdp":
        trainable, opt_state = gathered_trainable(model), gathered_optimizer_state(optimizer)
    else:
        trainable, opt_state = None, None
    if ctx.is_main:
        _checkpoint_module().save_checkpoint(run_dir, model, optimizer, state, keep=keep, trainable=trainable, optimizer_state=opt_state)


def load_checkpoint_any_world(ctx: DistContext, path: Path, model: nn.Module, optimizer):
    """Restore a checkpoint written by any world size (every rank reads the same files: a shared folder across
    machines). Mutates model and optimizer."""
    if ctx.parallel != "fsdp":
        return _checkpoint_module().load_checkpoint(path, model, optimizer)
    weights = load_file(str(Path(path) / "trainable.safetensors"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(_sharded_like(weights[name], p))
    saved = torch.load(Path(path) / "optimizer.pt", map_location="cpu", weights_only=True)
    params = [p for g in optimizer.param_groups for p in g["params"]]  # index -> parameter, as state_dict numbers
    saved["state"] = {i: {k: _sharded_like(v, params[i]) if isinstance(v, torch.Tensor) else v for k, v in s.items()}
                      for i, s in saved["state"].items()}
    optimizer.load_state_dict(saved)
    return _checkpoint_module().read_training_state(path)


def save_result_once(ctx: DistContext, method, model: nn.Module, run_dir: Path) -> None:
    """method.save on rank 0; FSDP2 (full fine-tuning) gathers the full weights first, on every rank."""
    if ctx.parallel != "fsdp":
        if ctx.is_main:
            method.save(model, run_dir)
        return
    seen, full = set(), {}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) not in seen:  # a tied weight (embeddings = head) once, as save_pretrained writes it alone
            seen.add(id(t))
            full[name] = _full(t)
    if ctx.is_main:
        method.causal_lm(model).save_pretrained(run_dir, state_dict=full, safe_serialization=True)
