"""Rank, world size and device of this process, the process group, and sums across ranks.

torchrun (torch.distributed.run) starts the workers and sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT;
a plain `tunekit train` has none of them and runs as a world of one, with no process group at all.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


class DistributedError(RuntimeError):
    """A multi-process run cannot start or cannot go on; the message says what to fix or how to resume."""


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # gloo / nccl; None for a single process
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    parallel: str = "none"  # none, ddp, fsdp: set by wrap.wrap_for_training
    # DDP divides the summed gradients by the world size; FSDP2 here is told to sum (wrap.py), one process sums
    # nothing. The loss is multiplied by this so the reduced gradient is sum(token losses) / global targets.
    grad_reduce_divides_by: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of `values` over all ranks (float64, exact for token counts); identity for one."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def say(self, *args, **kwargs) -> None:
        """print on rank 0 only: progress and messages come from one process."""
        if self.is_main:
            print(*args, **kwargs, flush=True)


def world_from_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun sets them; (0, 1, 0) outside torchrun."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


def init_distributed(device: torch.device) -> DistContext:
    """Join the process group torchrun prepared (gloo on CPU, nccl on CUDA) and pick this rank's device.

    With WORLD_SIZE unset or 1 nothing is initialised and the run is the plain single-process one.
    """
    rank, world, local_rank = world_from_env()
    if world <= 1:
        return DistContext(device=device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)  # one GPU per process: LOCAL_RANK picks it
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise DistributedError(f"train.device {device} cannot run several processes: use cpu (gloo) or cuda (nccl)")
    if not dist.is_initialized():
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, **kwargs)
    if rank != 0:
        sys.stdout = open(os.devnull, "w")  # one process prints; errors (stderr) still come from every rank
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, backend=backend, device=device)


def shutdown_distributed(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


LOST_PEER_HINTS = ("connection closed", "connection reset", "broken pipe", "gloo", "nccl", "timed out", "peer")


@contextlib.contextmanager
def peer_failure_is_clear(ctx: DistContext, resume_hint):
    """A collective that fails because another rank died becomes a DistributedError naming the checkpoint to
    resume from (`resume_hint()` gives that sentence); other errors pass unchanged."""
    try:
        yield
    except (RuntimeError, OSError) as e:
        if not ctx.enabled or isinstance(e, DistributedError) or not any(h in str(e).lower() for h in LOST_PEER_HINTS):
            raise
        raise DistributedError(f"rank {ctx.rank}: another of the {ctx.world_size} training processes stopped "
                               f"answering ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
                               f"{resume_hint()}") from e
