"""Continuous batching: which sequences run in the next step, and which of their tokens.

Each step has a token budget. Running sequences that are decoding take one token each; sequences still in their
prompt take the next chunk of it (chunked prefill, so one long prompt does not stall everyone's decode); waiting
sequences are admitted, oldest first, while a cache slot and budget remain. Finished sequences leave between
steps and free their slot at once, so a new request joins the running batch at the next step.
"""

from __future__ import annotations

from collections import deque

from .kv_cache import SlotCache
from .sequence import Sequence


class Scheduler:
    def __init__(self, cache: SlotCache, max_batched_tokens: int = 256, max_waiting: int = 256):
        self.cache, self.max_batched_tokens, self.max_waiting = cache, max_batched_tokens, max_waiting
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def __len__(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> bool:
        """Queue a sequence; False when the queue is full (the caller answers 503)."""
        if len(self.waiting) >= self.max_waiting:
            return False
        self.waiting.append(seq)
        return True

    def schedule(self) -> list[tuple[Sequence, list[int]]]:
        budget = self.max_batched_tokens
        plan = []
        for seq in self.running:  # decodes first: one token each, they are what users are waiting on
            if not seq.in_prefill:
                plan.append((seq, seq.next_tokens(1)))
                budget -= 1
        for seq in self.running:  # then prompts already started
            if seq.in_prefill and budget > 0:
                chunk = seq.next_tokens(budget)
                plan.append((seq, chunk))
                budget -= len(chunk)
        while self.waiting and budget > 0:
            slot = self.cache.take_slot()
            if slot is None:
                break
            seq = self.waiting.popleft()
            seq.slot = slot
            self.running.append(seq)
            chunk = seq.next_tokens(budget)
            plan.append((seq, chunk))
            budget -= len(chunk)
        return plan

    def finish(self, seq: Sequence) -> None:
        """Take a sequence out (finished, aborted or failed) and free its cache slot."""
        if seq in self.running:
            self.running.remove(seq)
            self.cache.release_slot(seq.slot)
        elif seq in self.waiting:
            self.waiting.remove(seq)
