"""Per-request decoding parameters and the sampler that applies them to a batch of next-token logits.

Each request owns a torch.Generator seeded from its `seed` (or a fresh random seed), so a sampled request gives the
same tokens whatever else shares its batch: the draw for row i uses only row i's generator.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    """What one request asks of the decoder. temperature 0 is greedy (top_p/top_k then do nothing)."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k cut
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # stop strings: the output ends before the first one
    stop_token_ids: list[int] = field(default_factory=list)  # extra to the model's end-of-turn tokens
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; 0: the chosen token's; k: and the k most likely

    def generator(self) -> torch.Generator:
        g = torch.Generator()
        g.manual_seed(self.seed if self.seed is not None else random.getrandbits(63))
        return g


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """(V,) logits with everything outside the top-k and the top-p nucleus set to -inf (a new tensor)."""
    if top_k > 0 and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # keep a token while the mass *before* it is < top_p: the first token always stays
        drop = (probs.cumsum(-1) - probs) >= top_p
        logits = logits.clone()
        logits[order[drop]] = float("-inf")
    return logits


def sample_next(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> list[int]:
    """One token per row of (B, V) fp32 logits: argmax for greedy rows, a seeded draw for the others."""
    greedy = logits.argmax(-1).tolist()
    out = []
    for row, (p, g) in enumerate(zip(params, generators)):
        if p.temperature <= 0:
            out.append(greedy[row])
            continue
        filtered = filter_top_k_top_p(logits[row] / p.temperature, p.top_k, p.top_p)
        probs = torch.softmax(filtered, dim=-1)
        out.append(int(torch.multinomial(probs, 1, generator=g)))
    return out


def token_logprobs(logits: torch.Tensor, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """(log p(token), [(id, log p)] of the `top` most likely) from one row of fp32 logits, before sampling filters."""
    logp = torch.log_softmax(logits, dim=-1)
    best = torch.topk(logp, top) if top > 0 else None
    pairs = list(zip(best.indices.tolist(), best.values.tolist())) if best is not None else []
    return float(logp[token]), pairs
