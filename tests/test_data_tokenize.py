"""Loss masks with the real SmolLM2 tokenizer (ChatML), checked against labels built by hand."""

from __future__ import annotations

import copy
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tunekit.data import IGNORE_INDEX, Example, Skipped, tokenize_example, tokenize_or_skip  # noqa: E402
from tunekit.data.tokenize import DROPPED_TOO_LONG, NO_LABELS_AFTER_TRUNCATION  # noqa: E402

DEFAULT_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


@pytest.fixture(scope="session")
def tok():
    from tunekit.models import load_tokenizer

    return load_tokenizer("smollm2-135m")


def chat_example(*pairs) -> Example:
    return Example("t.jsonl", 1, "chat", messages=[{"role": r, "content": c} for r, c in pairs])


MULTI_TURN = chat_example(
    ("system", "SYS"), ("user", "QUESTION1"), ("assistant", "ANSWER1"), ("user", "QUESTION2"), ("assistant", "ANSWER2")
)


def encode(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def labelled_spans(tok, example) -> list[str]:
    """Decoded runs of consecutive labelled tokens."""
    spans, run = [], []
    for label in example.labels + [IGNORE_INDEX]:
        if label != IGNORE_INDEX:
            run.append(label)
        elif run:
            spans.append(tok.decode(run))
            run = []
    return spans


def test_multi_turn_mask_is_exact(tok):
    # ChatML, written out by hand: (text, learned?) pieces.
    pieces = [
        ("<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\nQUESTION1<|im_end|>\n<|im_start|>assistant\n", False),
        ("ANSWER1<|im_end|>", True),
        ("\n<|im_start|>user\nQUESTION2<|im_end|>\n<|im_start|>assistant\n", False),
        ("ANSWER2<|im_end|>", True),
        ("\n", False),
    ]
    expected_ids, expected_labels = [], []
    for text, learned in pieces:
        ids = encode(tok, text)
        expected_ids += ids
        expected_labels += ids if learned else [IGNORE_INDEX] * len(ids)

    out = tokenize_example(MULTI_TURN, tok, train_on="completion", max_length=512, overflow="truncate")
    assert out.input_ids == expected_ids
    assert out.labels == expected_labels
    assert not out.truncated and (out.file, out.line) == ("t.jsonl", 1)
    # Same ids as tokenizing the whole rendered conversation at once, and as the template renders it.
    rendered = tok.apply_chat_template(MULTI_TURN.messages, tokenize=False)
    assert rendered == "".join(text for text, _ in pieces)
    assert out.input_ids == encode(tok, rendered)
    assert labelled_spans(tok, out) == ["ANSWER1<|im_end|>", "ANSWER2<|im_end|>"]
    assert out.labels.count(tok.eos_token_id) == 2  # the model learns to stop after each answer


def test_train_on_all_labels_everything(tok):
    out = tokenize_example(MULTI_TURN, tok, train_on="all", max_length=512, overflow="truncate")
    assert out.labels == out.input_ids
    masked = tokenize_example(MULTI_TURN, tok, train_on="completion", max_length=512, overflow="truncate")
    assert out.input_ids == masked.input_ids


def test_default_system_message_is_prompt(tok):
    out = tokenize_example(chat_example(("user", "Q"), ("assistant", "A")), tok, max_length=512)
    assert tok.decode(out.input_ids).startswith(DEFAULT_SYSTEM)
    assert labelled_spans(tok, out) == ["A<|im_end|>"]


def test_assistant_first_and_content_that_looks_like_template_text(tok):
    # "assistant" / "end" also occur in the header / marker text: the mask must still hit the content.
    example = chat_example(("assistant", "assistant"), ("user", "Q"), ("assistant", "end"))
    out = tokenize_example(example, tok, max_length=512)
    assert labelled_spans(tok, out) == ["assistant<|im_end|>", "end<|im_end|>"]


def test_trailing_user_turn_is_not_learned(tok):
    example = chat_example(("user", "Q1"), ("assistant", "A1"), ("user", "Q2"))
    out = tokenize_example(example, tok, max_length=512)
    assert labelled_spans(tok, out) == ["A1<|im_end|>"]


def test_truncate_keeps_first_tokens(tok):
    full = tokenize_example(MULTI_TURN, tok, max_length=512)
    cut = len(full.input_ids) - 3  # inside "ANSWER2<|im_end|>\n"
    out = tokenize_example(MULTI_TURN, tok, max_length=cut, overflow="truncate")
    assert out.truncated
    assert out.input_ids == full.input_ids[:cut]
    assert out.labels == full.labels[:cut]


def test_drop_skips_long_examples(tok):
    full = tokenize_example(MULTI_TURN, tok, max_length=512)
    assert tokenize_example(MULTI_TURN, tok, max_length=len(full.input_ids) - 1, overflow="drop") is None
    skipped = tokenize_or_skip(MULTI_TURN, tok, max_length=len(full.input_ids) - 1, overflow="drop")
    assert isinstance(skipped, Skipped)
    assert (skipped.reason, skipped.n_tokens, skipped.line) == (DROPPED_TOO_LONG, len(full.input_ids), 1)
    exact = tokenize_example(MULTI_TURN, tok, max_length=len(full.input_ids), overflow="drop")
    assert exact.input_ids == full.input_ids and not exact.truncated


def test_truncated_inside_user_turn_has_no_labels(tok):
    example = chat_example(("user", "word " * 200), ("assistant", "A"))
    assert tokenize_example(example, tok, max_length=64, overflow="truncate") is None
    skipped = tokenize_or_skip(example, tok, max_length=64, overflow="truncate")
    assert skipped.reason == NO_LABELS_AFTER_TRUNCATION


def test_text_is_tokens_plus_eos(tok):
    example = Example("t.jsonl", 3, "text", text="The quick brown fox.")
    out = tokenize_example(example, tok, max_length=512)
    assert out.input_ids == encode(tok, "The quick brown fox.") + [tok.eos_token_id]
    assert out.labels == out.input_ids
    # train_on applies to conversations only
    assert tokenize_example(example, tok, train_on="completion", max_length=512).labels == out.input_ids


def with_template(tok, template: str):
    other = copy.copy(tok)
    other.chat_template = template
    return other


# Like Qwen3: the last assistant turn gets an (empty) thinking block that earlier turns do not, so the
# template rendered up to an earlier turn is not a prefix of the whole rendering.
THINKING_TEMPLATE = r"""{%- for m in messages -%}
{%- if m.role == 'assistant' and loop.last -%}
{{ '<|im_start|>assistant\n<think>\n\n</think>\n\n' + m.content + '<|im_end|>\n' }}
{%- else -%}
{{ '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"""


def test_template_that_renders_last_turn_differently(tok):
    out = tokenize_example(MULTI_TURN, with_template(tok, THINKING_TEMPLATE), max_length=512)
    assert labelled_spans(tok, out) == ["ANSWER1<|im_end|>", "ANSWER2<|im_end|>"]
    assert "<think>" in tok.decode(out.input_ids)


# A template that ends assistant turns with eos_token and has no other marker: EOS is the target's end.
EOS_TEMPLATE = r"""{%- for m in messages -%}
{%- if m.role == 'assistant' -%}{{ 'Bot: ' + m.content + eos_token + '\n' }}
{%- else -%}{{ m.role + ': ' + m.content + '\n' }}{%- endif -%}
{%- endfor -%}"""


def test_eos_template(tok):
    out = tokenize_example(MULTI_TURN, with_template(tok, EOS_TEMPLATE), max_length=512)
    assert labelled_spans(tok, out) == ["ANSWER1<|im_end|>", "ANSWER2<|im_end|>"]
