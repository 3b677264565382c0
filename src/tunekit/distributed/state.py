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

from ..engine.checkpoint import TrainingState, load_checkpoint, read_training_state, save_checkpoint
from .context import DistContext


def _full_state_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, **kw)


def gathered_trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    """{name: full CPU tensor} of the trainable parameters; with FSDP2 every rank must call it."""
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            t = p.detach()
            t = t.full_tensor() if hasattr(t, "full_tensor") else t  # DTensor shard -> whole tensor
            out[name] = t.contiguous().cpu()
    return out


def indexed_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """FSDP2's optimizer state gathered and keyed like optimizer.state_dict() (parameter index, not name)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    by_name = get_optimizer_state_dict(model, optimizer, options=_full_state_options())
    index, groups = {}, []
    for group in by_name["param_groups"]:
        ids = [index.setdefault(fqn, len(index)) for fqn in group["params"]]
        groups.append({**group, "params": ids})
    return {"state": {index[fqn]: s for fqn, s in by_name["state"].items()}, "param_groups": groups}


def save_checkpoint_once(ctx: DistContext, run_dir: Path, model: nn.Module, optimizer, state: TrainingState,
                         keep: int) -> None:
    """One checkpoint for the whole run, written by rank 0 (FSDP2: after every rank helped gather it)."""
    if ctx.parallel == "fsdp":
        trainable, opt_state = gathered_trainable(model), indexed_optimizer_state(model, optimizer)
    else:
        trainable, opt_state = None, None
    if ctx.is_main:
        save_checkpoint(run_dir, model, optimizer, state, keep=keep, trainable=trainable, optimizer_state=opt_state)


def load_checkpoint_any_world(ctx: DistContext, path: Path, model: nn.Module, optimizer) -> TrainingState:
    """Restore a checkpoint written by any world size (every rank reads the same files: a shared folder across
    machines). Mutates model and optimizer."""
    if ctx.parallel != "fsdp":
        return load_checkpoint(path, model, optimizer)
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    weights = load_file(str(Path(path) / "trainable.safetensors"))
    set_model_state_dict(model, weights, options=_full_state_options(strict=False))
    saved = torch.load(Path(path) / "optimizer.pt", map_location="cpu", weights_only=True)
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]  # index -> name
    by_name = {"state": {order[i]: s for i, s in saved["state"].items()},
               "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in saved["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, by_name, options=_full_state_options())
    return read_training_state(path)


def save_result_once(ctx: DistContext, method, model: nn.Module, run_dir: Path) -> None:
    """method.save on rank 0; FSDP2 (full fine-tuning) gathers the full weights first, on every rank."""
    if ctx.parallel != "fsdp":
        if ctx.is_main:
            method.save(model, run_dir)
        return
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    full = get_model_state_dict(model, options=_full_state_options())
    if ctx.is_main:
        method.causal_lm(model).save_pretrained(run_dir, state_dict=full, safe_serialization=True)
