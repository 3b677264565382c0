"""Training on several processes through torch.distributed: DDP (gloo on CPU, nccl on GPU) and FSDP2.

The training loop stays one function (engine/loop.py); what changes with the number of processes lives here, in
small functions it calls:

    context.py   who am I (rank, world size, device), process-group setup/teardown, sums across ranks
    sharding.py  which examples of the global batch this rank trains on (contiguous, no overlap)
    wrap.py      the forward DDP/FSDP2 hooks, the loss scale that keeps the token-weighted loss exact, no_sync
    state.py     full tensors for checkpoints and the saved model (FSDP2 shards them), loading them back
    launch.py    `tunekit train --nproc N`: torchrun (torch.distributed.run) with this command as its workers
"""

from .context import DistContext, DistributedError, init_distributed, shutdown_distributed

__all__ = ["DistContext", "DistributedError", "init_distributed", "shutdown_distributed"]
