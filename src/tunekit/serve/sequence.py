"""One request's state as the engine sees it: tokens, cache slot, decoding state, and the text sent so far."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable

from .sampling import SamplingParams

_ids = itertools.count()


@dataclass
class Event:
    """What the engine reports to the request's owner after a step (called from the engine thread)."""

    text: str  # new text since the last event (stop strings and incomplete characters held back)
    token_ids: list[int]
    logprobs: list[dict]  # per new token: {"token", "logprob", "top": [(token, logprob), ...]}
    finish_reason: str | None = None  # "stop", "length", "abort", "error"
    error: str | None = None


@dataclass(eq=False)  # identity, not field equality: the scheduler looks sequences up in lists
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    adapter: str | None  # None = the base model
    on_event: Callable[[Event], None] = lambda e: None
    matcher: object = None  # an llguidance LLMatcher when the output is constrained
    id: int = field(default_factory=lambda: next(_ids))
    slot: int | None = None
    computed: int = 0  # tokens whose keys/values are in the cache
    output_ids: list[int] = field(default_factory=list)
    sent_chars: int = 0
    text: str = ""  # output decoded so far (Detokenizer: a few tokens per step, not the whole output)
    prefix_offset: int = 0  # output_ids[prefix_offset:read_offset] were decoded into the end of text
    read_offset: int = 0
    finish_reason: str | None = None
    generator: object = None

    def __post_init__(self):
        self.generator = self.params.generator()

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def in_prefill(self) -> bool:
        return self.computed < len(self.prompt_ids)

    def next_tokens(self, budget: int) -> list[int]:
        """The tokens to compute next: a prompt chunk of at most `budget`, or the last sampled token."""
        ids = self.all_ids
        return ids[self.computed: self.computed + budget] if self.in_prefill else ids[-1:]


def detokenize(tokenizer, seq: "Sequence", final: bool) -> None:
    """Append the text of seq's new output tokens to seq.text, decoding only a short window per step.

    Decoding the whole output at every step costs O(n) per token, O(n^2) per request. Instead: decode
    ids[prefix_offset:] and ids[prefix_offset:read_offset]; the difference is the new text. The window starts a
    few tokens back so that tokenizers whose pieces depend on the previous token (a leading space) decode
    right; a new text that ends inside a UTF-8 character (U+FFFD) waits for the token that completes it, unless
    final. (The same scheme as vLLM's and TGI's incremental detokenizers.)"""
    ids = seq.output_ids
    if len(ids) <= seq.read_offset:
        return
    before = tokenizer.decode(ids[seq.prefix_offset: seq.read_offset], skip_special_tokens=True)
    after = tokenizer.decode(ids[seq.prefix_offset:], skip_special_tokens=True)
    if len(after) > len(before) and (final or not after.endswith("\ufffd")):
        seq.text += after[len(before):]
        seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids)


def visible_text(text: str, stops: list[str], final: bool) -> tuple[str, bool]:
    """(text that may be shown, hit a stop string): cut at the first stop string; while not final, hold back a
    tail that could still grow into a stop string or is an incomplete UTF-8 character (U+FFFD from the decoder)."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    if cut >= 0:
        return text[:cut], True
    if final:
        return text, False
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    end = len(text) - hold
    while end > 0 and text[end - 1] == "\ufffd":
        end -= 1
    return text[:end], False
