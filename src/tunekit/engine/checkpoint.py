"""Atomic, resumable checkpoints.

Layout: <run>/checkpoints/step-000050/{trainable.safetensors, optimizer.pt, state.pt, COMPLETE}
and <run>/checkpoints/latest (a text file naming the newest complete checkpoint).

A checkpoint is written into a hidden temporary folder, fsync'ed, then renamed into place; `latest` is
replaced atomically after that. A crash at any moment leaves either the old or the new checkpoint as
"latest", never a half-written one. Only trainable parameters are stored: the frozen base is reloaded.
"""

from __future__ import annotations

import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

MARKER = "COMPLETE"


@dataclass
class TrainingState:
    step: int  # optimizer steps done
    stream: dict  # BatchStream.state_dict()
    scheduler: dict
    tokens_seen: int
    rng: dict  # torch / cuda / python RNG states
    # Time and throughput of the run so far, over every process that worked on it, so a resumed run reports its
    # whole wall time and tokens/s (checkpoints written before these existed read as 0).
    elapsed_s: float = 0.0
    rate_tokens: int = 0
    rate_time: float = 0.0


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for f in path.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(path)


def save_checkpoint(run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: TrainingState,
                    keep: int = 2, trainable: dict | None = None, optimizer_state: dict | None = None) -> Path:
    """Write a checkpoint. `trainable` / `optimizer_state` replace what is read from model / optimizer when the
    caller gathered them already (FSDP2 shards both: distributed/state.py)."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{state.step:06d}"
    final = root / name
    tmp = root / f".tmp-{name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    if trainable is None:
        trainable = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}
    save_file(trainable, str(tmp / "trainable.safetensors"))
    torch.save(optimizer.state_dict() if optimizer_state is None else optimizer_state, tmp / "optimizer.pt")
    torch.save({"step": state.step, "stream": state.stream, "scheduler": state.scheduler,
                "tokens_seen": state.tokens_seen, "rng": state.rng, "elapsed_s": state.elapsed_s,
                "rate_tokens": state.rate_tokens, "rate_time": state.rate_time}, tmp / "state.pt")
    (tmp / MARKER).write_text(name)
    _fsync_tree(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    latest_tmp = root / ".latest.tmp"
    latest_tmp.write_text(name)
    with open(latest_tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(latest_tmp, root / "latest")
    _fsync_dir(root)
    _prune(root, keep)
    return final


def _complete(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("step-*") if (p / MARKER).exists())


def _prune(root: Path, keep: int) -> None:
    for old in _complete(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for tmp in root.glob(".tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint named by `latest`, or the newest complete one if `latest` is missing or broken."""
    root = Path(run_dir) / "checkpoints"
    pointer = root / "latest"
    if pointer.exists():
        candidate = root / pointer.read_text().strip()
        if (candidate / MARKER).exists():
            return candidate
    done = _complete(root) if root.exists() else []
    return done[-1] if done else None


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> TrainingState:
    """Restore trainable weights and optimizer in place (mutates both); returns the loop state."""
    weights = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
    unexpected = [n for n in weights if n not in params]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {path} does not match this model/method: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}; was the config changed since the run started?")
    with torch.no_grad():
        for n, t in weights.items():
            params[n].copy_(t)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    return read_training_state(path)


def read_training_state(path: Path) -> TrainingState:
    """The loop state of checkpoint `path` (step, stream position, scheduler, RNG, throughput so far)."""
    s = torch.load(Path(path) / "state.pt", map_location="cpu", weights_only=True)
    return TrainingState(step=s["step"], stream=s["stream"], scheduler=s["scheduler"],
                         tokens_seen=s["tokens_seen"], rng=s["rng"], elapsed_s=s.get("elapsed_s", 0.0),
                         rate_tokens=s.get("rate_tokens", 0), rate_time=s.get("rate_time", 0.0))
