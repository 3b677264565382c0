"""`tunekit train --nproc N`: torchrun (torch.distributed.run) starts N workers that each run `tunekit train`.

The same command without --nproc, under `torchrun --nproc-per-node N -m tunekit.cli train ...` (or across machines
with torchrun's --nnodes / --rdzv-endpoint), is the same run: this module only builds that torchrun command on one
machine and turns a failed worker into one clear error that names the checkpoint to resume from.
"""

from __future__ import annotations

import os
import subprocess
import sys

from ..config import Config, ConfigError
from ..engine.checkpoint import latest_checkpoint
from .context import DistributedError, world_from_env
from .sharding import check_world_divides


def pop_nproc(argv: list[str]) -> tuple[list[str], int | None]:
    """(argv without --nproc N / --nproc=N, N or None)."""
    rest, nproc, i = [], None, 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--nproc" or arg.startswith("--nproc="):
            value = arg.partition("=")[2] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else "")
            i += 1 if "=" in arg else 2
            if not value.isdigit() or int(value) < 1:
                raise ConfigError(f"--nproc takes a number of processes (1, 2, ...), got {value!r}")
            nproc = int(value)
            continue
        rest.append(arg)
        i += 1
    return rest, nproc


def torchrun_command(command: str, argv: list[str], nproc: int) -> list[str]:
    """torchrun on this machine: a free local port (--standalone), no restarts, workers = this command."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "--max-restarts=0", "-m", "tunekit.cli", command, *argv]


def worker_env(cfg: Config, nproc: int) -> dict[str, str]:
    """The workers' environment: on CPU each gets its share of the cores as OpenMP threads (torchrun would set 1),
    unless OMP_NUM_THREADS or train.threads says otherwise."""
    env = dict(os.environ)
    if "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(cfg.train.threads or max(1, (os.cpu_count() or 1) // nproc))
    return env


def launch(command: str, argv: list[str], nproc: int, cfg: Config) -> int:
    """Run `tunekit <command> argv` as `nproc` processes; 0 on success, DistributedError when a worker fails."""
    if world_from_env()[1] > 1:
        raise DistributedError("--nproc inside a torchrun worker: drop --nproc when torchrun starts the processes")
    check_world_divides(cfg.train.batch_size, cfg.train.grad_accum, nproc)
    if cfg.train.parallel == "fsdp" and cfg.method.name != "full":  # the workers would refuse it one by one
        raise ConfigError(f"train.parallel fsdp shards full fine-tuning (method full); method {cfg.method.name} "
                          f"trains few parameters: use train.parallel ddp")
    rc = subprocess.run(torchrun_command(command, argv, nproc), env=worker_env(cfg, nproc)).returncode
    if rc == 0:
        return 0
    last = latest_checkpoint(cfg.train.output_dir)
    where = (f"the last complete checkpoint, {last}, is intact: continue with `tunekit {command} --config "
             f"{cfg.train.output_dir}/config.yaml --resume --nproc N` (any N that divides the global batch of "
             f"{cfg.train.batch_size * cfg.train.grad_accum})" if last else
             "no checkpoint had been written yet (train.save_every sets how often one is)")
    raise DistributedError(f"a training process failed (torchrun exit code {rc}; the failing rank's error is "
                           f"above) and the others were stopped; {where}")
