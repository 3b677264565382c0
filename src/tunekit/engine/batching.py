"""Turn tokenized examples into micro-batches, in a seeded order that can be resumed mid-epoch.

Targets are shifted per example *before* packing (targets[t] = labels[t + 1]), so the last token of one
packed sequence never predicts the first token of the next.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

IGNORE = -100


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T)
    targets: torch.Tensor  # (B, T) next-token ids, IGNORE where no loss
    position_ids: torch.Tensor  # (B, T) restart at 0 for every packed sequence
    attention_mask: torch.Tensor | None  # (B, T) 1 = real token; None when packed (no padding)
    n_tokens: int  # real (non-padding) tokens
    n_targets: int  # tokens that carry a loss
    sampled: bool = False  # the completions are the student's own samples (on-policy distillation), not gold

    def to(self, device) -> "Batch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(move(self.input_ids), move(self.targets), move(self.position_ids), move(self.attention_mask),
                     self.n_tokens, self.n_targets, self.sampled)


def shifted_targets(labels: Sequence[int]) -> list[int]:
    """targets[t] is the label of token t+1; the last position predicts nothing."""
    return list(labels[1:]) + [IGNORE]


def collate_packed(examples: Sequence) -> Batch:
    """All examples concatenated into one row (1, sum(len)); positions restart per example."""
    ids, tgt, pos = [], [], []
    for ex in examples:
        ids += ex.input_ids
        tgt += shifted_targets(ex.labels)
        pos += range(len(ex.input_ids))
    t = lambda x: torch.tensor([x], dtype=torch.long)  # noqa: E731
    targets = t(tgt)
    return Batch(t(ids), targets, t(pos), None, len(ids), int((targets != IGNORE).sum()))


def collate_padded(examples: Sequence, pad_id: int) -> Batch:
    """Right-padded (B, max_len) batch with an attention mask; padding never carries a target."""
    width = max(len(ex.input_ids) for ex in examples)
    B = len(examples)
    ids = torch.full((B, width), pad_id, dtype=torch.long)
    targets = torch.full((B, width), IGNORE, dtype=torch.long)
    mask = torch.zeros((B, width), dtype=torch.long)
    for i, ex in enumerate(examples):
        n = len(ex.input_ids)
        ids[i, :n] = torch.tensor(ex.input_ids)
        targets[i, :n] = torch.tensor(shifted_targets(ex.labels))
        mask[i, :n] = 1
    pos = torch.arange(width).expand(B, width).clone()
    return Batch(ids, targets, pos, mask, int(mask.sum()), int((targets != IGNORE).sum()))


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """A permutation of range(n) that depends only on (seed, epoch).

    The generator is seeded with seed + epoch, as accelerate's SeedableRandomSampler does for transformers'
    Trainer: for the same seed both see the examples in the same order, so a comparison between them (the
    training benchmark) trains on the same batches.
    """
    g = torch.Generator().manual_seed(seed + epoch)
    return torch.randperm(n, generator=g).tolist()


class BatchStream:
    """Endless micro-batches over shuffled epochs; `state_dict()` pins the exact position for resume."""

    def __init__(self, examples: Sequence, batch_size: int, seed: int, packing: bool, pad_id: int):
        if not examples:
            raise ValueError("no training examples")
        self.examples, self.batch_size, self.seed = examples, batch_size, seed
        self.packing, self.pad_id = packing, pad_id
        self.epoch, self.pos = 0, 0
        self._order = epoch_order(len(examples), seed, 0)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]
        self._order = epoch_order(len(self.examples), self.seed, self.epoch)

    def take(self, n: int) -> list:
        """The next `n` examples of the seeded order (crossing into the next epoch when needed)."""
        chosen = []
        while len(chosen) < n:
            if self.pos >= len(self._order):
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = epoch_order(len(self.examples), self.seed, self.epoch)
            take = self._order[self.pos : self.pos + n - len(chosen)]
            chosen += [self.examples[i] for i in take]
            self.pos += len(take)
        return chosen

    def collate(self, examples: Sequence) -> Batch:
        return collate_packed(examples) if self.packing else collate_padded(examples, self.pad_id)

    def __next__(self) -> Batch:
        return self.collate(self.take(self.batch_size))

    def __iter__(self):
        return self


def eval_batches(examples: Sequence, batch_size: int, packing: bool, pad_id: int):
    """Validation batches in file order."""
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        yield collate_packed(chunk) if packing else collate_padded(chunk, pad_id)
