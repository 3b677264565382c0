"""Split documents into chunks of at most `size` tokens with `overlap` tokens shared between neighbours.

Tokens are the embedding model's own (all-MiniLM-L6-v2 reads at most 256 word pieces and truncates the rest), so a
chunk is never cut short when it is embedded. A chunk never crosses a section (heading), and inside a section it
ends, where it can, at a paragraph break, else at the end of a sentence, within the last half of its window.

Defaults: size 240 tokens, the largest that leaves room below the model's 256 (with [CLS]/[SEP]) for a short heading
path, which is prepended to each chunk; overlap 40. On Debian's FAQ MRR@10 rose with the chunk size for all three
retrievers (64 -> 256 tokens; docs/rag.md), because whole answers then stay in one chunk.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass

from .loaders import Document

DEFAULT_CHUNK_TOKENS = 240
DEFAULT_OVERLAP = 40
_SENTENCE_END = re.compile(r"[.!?;:][\"')\]]*\s")


@dataclass
class Chunk:
    source: str
    heading: str  # the heading path, " > "-joined ("" before the first heading)
    page: int | None
    index: int  # position in its document, from 0
    start: int  # character offsets in Document.full_text()
    end: int
    text: str

    def indexed_text(self) -> str:
        """What is embedded and BM25-indexed: the heading path (context for a chunk out of its document) + text."""
        return f"{self.heading}\n{self.text}" if self.heading else self.text


def chunk_document(doc: Document, tokenizer, size: int = DEFAULT_CHUNK_TOKENS,
                   overlap: int = DEFAULT_OVERLAP) -> list[Chunk]:
    """Chunks of `doc`, in order. `tokenizer` is a Hugging Face fast tokenizer (offsets are needed)."""
    if size < 8:
        raise ValueError(f"chunk size {size} is too small (at least 8 tokens)")
    if not 0 <= overlap < size // 2:
        raise ValueError(f"overlap {overlap} must be >= 0 and below half the chunk size ({size // 2})")
    chunks: list[Chunk] = []
    base = 0  # offset of this section's text in doc.full_text()
    for section in doc.sections:
        heading = " > ".join(section.heading)
        for start, end in split_spans(section.text, tokenizer, size, overlap):
            text = section.text[start:end].strip()
            if text:
                lead = len(section.text[start:end]) - len(section.text[start:end].lstrip())
                chunks.append(Chunk(doc.source, heading, section.page, len(chunks), base + start + lead,
                                    base + start + lead + len(text), text))
        base += len(section.text) + 2  # full_text joins sections with "\n\n"
    return chunks


def split_spans(text: str, tokenizer, size: int, overlap: int) -> list[tuple[int, int]]:
    """(start, end) character spans of the chunks of one section's text."""
    offsets = [o for o in tokenizer(text, add_special_tokens=False, return_offsets_mapping=True,
                                         verbose=False)["offset_mapping"]
               if o[1] > o[0]]
    n = len(offsets)
    if n == 0:
        return []
    starts = [o[0] for o in offsets]
    spans, first = [], 0
    while True:
        last = min(first + size, n)  # exclusive token index
        if last < n:
            last = _break_point(text, offsets, starts, first + size // 2, last)
        spans.append((offsets[first][0], offsets[last - 1][1]))
        if last >= n:
            return spans
        nxt = max(last - overlap, first + 1)
        while nxt < last and offsets[nxt][0] == offsets[nxt - 1][1] and not text[offsets[nxt][0]].isspace():
            nxt += 1  # do not start inside a word (word pieces are glued to the one before)
        first = nxt


def _break_point(text: str, offsets, starts: list[int], lo: int, hi: int) -> int:
    """The token index (exclusive end) in (lo, hi] to end a chunk at: after a paragraph break, else after a
    sentence, else at hi."""
    lo_char, hi_char = offsets[lo][0], offsets[hi][0]  # token `hi` is the first one that does not fit
    window = text[lo_char:hi_char]
    cut = window.rfind("\n\n")
    if cut < 0:
        ends = list(_SENTENCE_END.finditer(window))
        cut = ends[-1].end() - 1 if ends else -1
    if cut < 0:
        return hi
    index = bisect.bisect_left(starts, lo_char + cut)
    return min(max(index, lo + 1), hi)
