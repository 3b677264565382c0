"""The KV cache: one slot per running sequence, contiguous in positions (not paged).

Layout per layer: K and V of shape (slots, kv_heads, capacity, head_dim). A sequence owns one slot from admission
to finish, so its keys are a strided view `K[slot, :, :length]` and decode attention reads the cache in place, with
no gather (a paged cache needs a per-step gather on CPU, where no paged-attention kernel exists: for SmolLM2 at 16
sequences x 600 tokens that is ~220 MB copied per step, as much as reading the bf16 weights once).
`capacity` grows by doubling when a sequence needs more positions, up to `max_len`, and shrinks back to its
initial size when the engine goes idle, so memory returns to the idle level after a burst.
"""

from __future__ import annotations

import heapq

import torch


class SlotCache:
    def __init__(self, layers: int, slots: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 max_len: int, initial: int = 256):
        self.layers, self.slots, self.kv_heads, self.head_dim = layers, slots, kv_heads, head_dim
        self.dtype, self.max_len, self.initial = dtype, max_len, min(initial, max_len)
        self.free = list(range(slots))  # a heap, lowest first: keeps the used range [0, max slot] dense
        self._alloc(self.initial)

    def _alloc(self, capacity: int) -> None:
        shape = (self.slots, self.kv_heads, capacity, self.head_dim)
        self.k = [torch.zeros(shape, dtype=self.dtype) for _ in range(self.layers)]
        self.v = [torch.zeros(shape, dtype=self.dtype) for _ in range(self.layers)]
        self.capacity = capacity

    @property
    def nbytes(self) -> int:
        return 2 * self.layers * self.k[0].numel() * self.k[0].element_size()

    def bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.k[0].element_size()

    def take_slot(self) -> int | None:
        return heapq.heappop(self.free) if self.free else None

    def release_slot(self, slot: int) -> None:
        heapq.heappush(self.free, slot)

    def ensure(self, length: int) -> None:
        """Make room for positions [0, length) in every slot (copies the cache when it grows)."""
        if length <= self.capacity:
            return
        if length > self.max_len:
            raise ValueError(f"sequence of {length} tokens exceeds the cache's max_len {self.max_len}")
        new = self.capacity
        while new < length:
            new *= 2
        new = min(new, self.max_len)
        old_k, old_v, old = self.k, self.v, self.capacity
        self._alloc(new)
        for layer in range(self.layers):
            self.k[layer][:, :, :old].copy_(old_k[layer])
            self.v[layer][:, :, :old].copy_(old_v[layer])

    def shrink_if_idle(self) -> None:
        """Back to the initial capacity when no slot is in use (frees a burst's growth)."""
        if len(self.free) == self.slots and self.capacity > self.initial:
            self._alloc(self.initial)

    def write(self, layer: int, slots: torch.Tensor, positions: torch.Tensor, k: torch.Tensor,
              v: torch.Tensor) -> None:
        """Store keys/values (N, kv_heads, head_dim) of N tokens at (slots[i], positions[i])."""
        self.k[layer][slots, :, positions] = k
        self.v[layer][slots, :, positions] = v
