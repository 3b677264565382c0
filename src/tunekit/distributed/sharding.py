"""Which examples this rank trains on.

The config's batch is the global one: one optimizer step trains on train.batch_size x train.grad_accum examples
whatever the number of processes, taken from the same seeded order as a single process (engine/batching.py).
Rank r takes the r-th contiguous slice of them, split into micro-batches of at most train.batch_size. The ranks
never overlap, a world of one gets exactly the single-process micro-batches, and a checkpoint's stream position
means the same on any world size that divides the global batch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..config import ConfigError

if TYPE_CHECKING:  # engine/loop.py imports this module: no engine import at run time
    from ..engine.batching import Batch, BatchStream


def global_batch(batch_size: int, grad_accum: int) -> int:
    return batch_size * grad_accum


def check_world_divides(batch_size: int, grad_accum: int, world_size: int) -> None:
    """A world size must split the global batch evenly; the error lists the sizes that do."""
    g = global_batch(batch_size, grad_accum)
    if world_size < 1 or g % world_size:
        fits = [n for n in range(1, g + 1) if g % n == 0]
        raise ConfigError(f"{world_size} processes cannot split the global batch of {g} examples "
                          f"(train.batch_size {batch_size} x train.grad_accum {grad_accum}) evenly: use a number of "
                          f"processes in {fits}, or change train.batch_size / train.grad_accum")


def rank_slice(examples: list, rank: int, world_size: int) -> list:
    """Rank `rank`'s contiguous share of one step's examples: (G,) -> (G / world_size,)."""
    per = len(examples) // world_size
    return examples[rank * per : (rank + 1) * per]


def rank_micro_batches(stream: BatchStream, batch_size: int, grad_accum: int, rank: int,
                       world_size: int) -> list[Batch]:
    """This rank's micro-batches for the next optimizer step. Every rank advances the stream by the whole global
    batch (cheap: indices only), so all ranks agree on the position a checkpoint stores."""
    step_examples = stream.take(global_batch(batch_size, grad_accum))
    mine = rank_slice(step_examples, rank, world_size)
    return [stream.collate(mine[i : i + batch_size]) for i in range(0, len(mine), batch_size)]
