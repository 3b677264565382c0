"""Render a conversation with the tokenizer's chat template and find what the model should learn.

The target of an assistant turn is its content plus the end-of-turn marker the template puts right after it
(ChatML: `ANSWER<|im_end|>`), so the model learns to stop. The header before it (`<|im_start|>assistant\\n`)
is prompt: at inference the template writes it, the model does not.

How a turn is located in the rendered text (character offsets, no tokens yet):
  * content start: the conversation is rendered again with a sentinel string as that turn's content; the
    sentinel's offset is the content's (exact for any template, also for ones that render the last turn
    differently, like Qwen3's thinking block).
  * target end: the first special token after the content that the template emits (or the EOS token),
    within the turn (the template rendered through that turn tells where the turn ends); a template
    without such a marker gets the turn's text up to its trailing whitespace.
The text is then cut into segments at those offsets and each segment tokenized on its own, so a target
never shares a token with its header (as at inference, where the prompt ends at the header).
"""

from __future__ import annotations

import weakref
from typing import Any

from .errors import DataError
from .formats import Example

# tokenizer -> the special-token strings that can close a turn (see turn_end_markers).
# Stands in for an assistant content to find where the template puts it (private-use characters).
SENTINEL = "\ue000tunekit-assistant-content\ue001"
_MARKERS: "weakref.WeakKeyDictionary[Any, tuple[str, ...]]" = weakref.WeakKeyDictionary()


def render_chat(example: Example, tokenizer, messages: list[dict[str, str]], *, add_generation_prompt=False) -> str:
    """The chat template applied to `messages` as text; template errors become DataErrors about `example`."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError(
            "the tokenizer has no chat template, which chat-like data needs; use an instruct model's tokenizer "
            "or data in the text format",
            file=example.file,
            line=example.line,
        )
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja raises TemplateError, templates raise their own exceptions via raise_exception
        raise DataError(
            f"the tokenizer's chat template rejected this conversation: {e}", file=example.file, line=example.line
        ) from None


def turn_end_markers(tokenizer) -> tuple[str, ...]:
    """EOS plus every special token that appears literally in the chat template, longest first."""
    try:
        return _MARKERS[tokenizer]
    except (KeyError, TypeError):
        pass
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else str(tokenizer.chat_template)
    specials = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    markers = {s for s in specials if s and s in template}
    if tokenizer.eos_token:
        markers.add(tokenizer.eos_token)
    result = tuple(sorted(markers, key=len, reverse=True))
    try:
        _MARKERS[tokenizer] = result
    except TypeError:  # not weak-referenceable: just recompute next time
        pass
    return result


def target_end(full: str, content_end: int, turn_end: int | None, markers: tuple[str, ...]) -> int:
    """Offset just past the end-of-turn marker that follows the content. `turn_end`: where the turn's text
    ends, or None when the template does not render turn by turn (then only a marker can extend the target)."""
    region = full[content_end : len(full) if turn_end is None else turn_end]
    hits = [(region.find(m), -len(m)) for m in markers if m in region]
    if hits:
        position, minus_length = min(hits)  # earliest; the longest marker at a tie
        return content_end + position - minus_length
    return content_end if turn_end is None else content_end + len(region.rstrip())


def content_span(example: Example, tokenizer, full: str, k: int) -> tuple[int, int]:
    """[start, end) of assistant message k's content in `full`: rendered once more with a sentinel as that
    content, the sentinel's offset is where the content starts (the text before it cannot depend on it)."""
    messages = example.messages or []
    probe = [dict(m) for m in messages]
    probe[k]["content"] = SENTINEL
    rendered = render_chat(example, tokenizer, probe)
    start = rendered.find(SENTINEL)
    content = messages[k]["content"]
    for candidate in (content, content.strip()):  # some templates trim contents
        if start >= 0 and candidate and full.startswith(candidate, start):
            return start, start + len(candidate)
    raise DataError(
        f"the chat template does not reproduce assistant message {k} verbatim, so its loss mask cannot be "
        "placed; use data.train_on=all or a tokenizer whose template keeps message contents",
        file=example.file,
        line=example.line,
    )


def assistant_spans(example: Example, tokenizer, full: str) -> list[tuple[int, int]]:
    """[(start, end)) character spans of `full` that are assistant targets, in order."""
    messages = example.messages or []
    markers = turn_end_markers(tokenizer)
    spans: list[tuple[int, int]] = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start, content_end = content_span(example, tokenizer, full, k)
        if spans and start < spans[-1][1]:
            raise DataError(
                f"the chat template renders assistant message {k} before the previous one; cannot place the loss "
                "mask (use data.train_on=all)",
                file=example.file,
                line=example.line,
            )
        through = render_chat(example, tokenizer, messages[: k + 1])
        turn_end = len(through) if full.startswith(through) and len(through) >= content_end else None
        spans.append((start, target_end(full, content_end, turn_end, markers)))
    return spans


def chat_segments(example: Example, tokenizer) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, is_target) pieces that concatenate to the full rendering."""
    full = render_chat(example, tokenizer, example.messages or [])
    segments: list[tuple[str, bool]] = []
    position = 0
    for start, end in assistant_spans(example, tokenizer, full):
        if start > position:
            segments.append((full[position:start], False))
        segments.append((full[start:end], True))
        position = end
    if position < len(full):
        segments.append((full[position:], False))
    return segments
