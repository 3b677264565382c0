"""The server's side of the rounds, without Flower: checkpoints per round, resume, the round's bookkeeping.

A round folder, written atomically (a .tmp folder renamed when complete):

    output_dir/rounds/round-0003/global.safetensors   the aggregated tensors (fp32, the federation's names)
                                 adapter/              the same as the method's adapter (PEFT format for LoRA)
                                 round.json            owners, examples, losses, bytes, dropped owners, DP
    output_dir/result.json                              every round's round.json, in order
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROUND_DIR = "round-{:04d}"


def rounds_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "rounds"


def last_round(output_dir: str | Path) -> tuple[int, Path | None]:
    """(number, folder) of the last complete round; (0, None) when there is none."""
    root = rounds_dir(output_dir)
    done = sorted(p for p in root.glob("round-*") if p.is_dir() and not p.name.endswith(".tmp")
                  and (p / "round.json").exists()) if root.exists() else []
    return (int(done[-1].name.split("-")[1]), done[-1]) if done else (0, None)


def save_round(output_dir: str | Path, number: int, tensors: dict[str, torch.Tensor], record: dict,
               write_adapter) -> Path:
    """Write round `number` (tensors, `write_adapter(folder)`, round.json) and return its folder."""
    final = rounds_dir(output_dir) / ROUND_DIR.format(number)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({n: t.contiguous() for n, t in tensors.items()}, str(tmp / "global.safetensors"))
    write_adapter(tmp / "adapter")
    (tmp / "round.json").write_text(json.dumps(record, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def load_round(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "global.safetensors"))


def history(output_dir: str | Path) -> list[dict]:
    """round.json of every complete round, in order."""
    root = rounds_dir(output_dir)
    if not root.exists():
        return []
    return [json.loads((p / "round.json").read_text()) for p in sorted(root.glob("round-*"))
            if p.is_dir() and not p.name.endswith(".tmp") and (p / "round.json").exists()]
