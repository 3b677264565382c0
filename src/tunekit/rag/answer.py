"""Answers with citations: the retrieved chunks, numbered, go into the prompt; the model is asked to cite them as
[n]; the [n] markers of the answer are checked against the chunks it was given.

The same prompt is used by `tunekit rag ask`, the server's chat completions with `"rag": {...}`, and the
training records of `tunekit rag make-data`, so a LoRA trained on those records sees at inference exactly the
layout it was trained on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .retrieve import Hit

INSTRUCTION = ("Answer the question using only the numbered sources below. After each fact, cite the source it "
               "comes from by its number in square brackets, like [1]. If the sources do not contain the answer, "
               "say that you do not know.")
_MARKER = re.compile(r"\[(\d+(?:\s*,\s*\d+)*)\]")


def source_label(hit_or_chunk) -> str:
    c = getattr(hit_or_chunk, "chunk", hit_or_chunk)
    where = c.source.rsplit("/", 1)[-1]
    if c.heading:
        where += f", {c.heading}"
    if c.page:
        where += f", page {c.page}"
    return where


def rag_prompt(question: str, chunks: list) -> str:
    """The user turn: instruction, numbered sources ([1] ... [n], each with file/heading/page), the question."""
    sources = "\n\n".join(f"[{n}] ({source_label(c)})\n{getattr(c, 'chunk', c).text}"
                          for n, c in enumerate(chunks, start=1))
    return f"{INSTRUCTION}\n\nSources:\n{sources}\n\nQuestion: {question}"


def cited_numbers(answer: str) -> list[int]:
    """Every n of the [n] / [n, m] markers in the answer, in order of first appearance."""
    seen: list[int] = []
    for m in _MARKER.finditer(answer):
        for part in m.group(1).split(","):
            n = int(part)
            if n not in seen:
                seen.append(n)
    return seen


@dataclass
class Answer:
    text: str
    hits: list[Hit]
    cited: list[int] = field(default_factory=list)  # valid [n] markers (1-based, into hits)
    invalid: list[int] = field(default_factory=list)  # [n] markers that name no chunk given

    def citations(self) -> list[dict]:
        return [{"n": n, **h.citation(), "cited": n in self.cited} for n, h in enumerate(self.hits, start=1)]

    def to_dict(self) -> dict:
        return {"answer": self.text, "citations": self.citations(), "invalid_citations": self.invalid}


def check_answer(text: str, hits: list[Hit]) -> Answer:
    numbers = cited_numbers(text)
    return Answer(text, hits, [n for n in numbers if 1 <= n <= len(hits)],
                  [n for n in numbers if not 1 <= n <= len(hits)])


def ask(question: str, retriever, model: str = "smollm2-135m", adapter: str | None = None, top_k: int = 5,
        method: str = "hybrid", sources: list[str] | None = None, max_new_tokens: int = 256,
        device: str = "auto", dtype: str = "auto", system: str | None = None) -> Answer:
    """Retrieve, prompt, generate (greedy), check the citations."""
    from ..inference import generate, load_for_inference

    hits = retriever.search(question, method, top_k, sources)
    conversation = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": rag_prompt(question, hits)}]
    m, tok = load_for_inference(model, adapter, device, dtype=dtype)
    text = generate(m, tok, [conversation], max_new_tokens=max_new_tokens, temperature=0.0)[0]
    return check_answer(text, hits)
