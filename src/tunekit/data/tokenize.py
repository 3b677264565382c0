"""Turn a normalised Example into token ids and a loss mask (labels), within max_length.

Labels follow the Hugging Face convention: `labels[i]` is `input_ids[i]` where the loss is taken and -100
where it is not; the model shifts them by one itself. Both lists have the same length (T,).

    chat, train_on="completion"   only assistant targets (content + end-of-turn marker) are labelled
    chat, train_on="all"          every token of the rendered conversation is labelled
    text                          the text's tokens + EOS, all labelled (train_on does not apply)

An example that cannot train is not returned as a TokenizedExample but as `Skipped` with a reason, so the
caller can count each reason (see tokenize_or_skip); tokenize_example is the same with None instead.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import DataError
from .formats import Example
from .template import chat_segments

IGNORE_INDEX = -100  # label of a position without loss (what torch's cross_entropy ignores by default)

# Why an example was not returned.
DROPPED_TOO_LONG = "dropped_too_long"  # over max_length with overflow="drop"
NO_LABELS_AFTER_TRUNCATION = "no_labels_after_truncation"  # truncation cut away every labelled token
NO_LABELS = "no_labels"  # nothing labelled even untruncated (e.g. a chat without assistant turn)


@dataclass
class TokenizedExample:
    input_ids: list[int]  # (T,)
    labels: list[int]  # (T,) token id where the loss is taken, IGNORE_INDEX elsewhere
    file: str
    line: int | None
    truncated: bool = False

    @property
    def n_label_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


@dataclass
class Skipped:
    """An example left out: `reason` is one of DROPPED_TOO_LONG, NO_LABELS_AFTER_TRUNCATION, NO_LABELS."""

    reason: str
    file: str
    line: int | None
    n_tokens: int  # length before truncation


def tokenize_or_skip(
    example: Example, tokenizer, *, train_on: str = "completion", max_length: int = 1024, overflow: str = "truncate"
) -> TokenizedExample | Skipped:
    """`example` as ids + labels, or why it cannot be trained on. overflow: "truncate" keeps the first
    max_length tokens, "drop" skips the example."""
    if example.messages is not None:
        input_ids, labels = chat_ids_and_labels(example, tokenizer, train_on=train_on)
    else:
        input_ids = text_ids(example, tokenizer)
        labels = list(input_ids)
    n_tokens = len(input_ids)
    truncated = n_tokens > max_length
    if truncated:
        if overflow == "drop":
            return Skipped(DROPPED_TOO_LONG, example.file, example.line, n_tokens)
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        reason = NO_LABELS_AFTER_TRUNCATION if truncated else NO_LABELS
        return Skipped(reason, example.file, example.line, n_tokens)
    return TokenizedExample(input_ids, labels, example.file, example.line, truncated)


def tokenize_example(
    example: Example, tokenizer, *, train_on: str = "completion", max_length: int = 1024, overflow: str = "truncate"
) -> TokenizedExample | None:
    """tokenize_or_skip, with None for a skipped example (use tokenize_or_skip to learn why)."""
    result = tokenize_or_skip(example, tokenizer, train_on=train_on, max_length=max_length, overflow=overflow)
    return result if isinstance(result, TokenizedExample) else None


def chat_ids_and_labels(example: Example, tokenizer, *, train_on: str) -> tuple[list[int], list[int]]:
    """Tokenize each segment of the rendered chat on its own (no special tokens added: the template has them)."""
    segments = chat_segments(example, tokenizer)
    encoded = tokenizer([text for text, _ in segments], add_special_tokens=False)["input_ids"]
    input_ids: list[int] = []
    labels: list[int] = []
    for (_, is_target), ids in zip(segments, encoded):
        input_ids += ids
        labels += ids if is_target or train_on == "all" else [IGNORE_INDEX] * len(ids)
    return input_ids, labels


def text_ids(example: Example, tokenizer) -> list[int]:
    """The text with the tokenizer's usual special tokens (e.g. BOS), ending in EOS so the model learns to stop."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError(
            "the tokenizer has no EOS token, which text examples end with; set tokenizer.eos_token",
            file=example.file,
            line=example.line,
        )
    ids = list(tokenizer(example.text, add_special_tokens=True)["input_ids"])
    if not ids or ids[-1] != eos:
        ids.append(eos)
    return ids
