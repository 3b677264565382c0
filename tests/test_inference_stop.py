"""generate(stop_after_json=True): a reply ends where its first JSON object closes, and the scorer sees the same."""

import pytest
import torch

from tunekit.demo.scoring import parse_json_output
from tunekit.inference import JsonObjectClosed

# (reply the model writes, where it should stop: the stopped prefix, or None for "runs to max_new_tokens")
CASES = [
    ('{"a": 1}<|im_end|>trailing prose', '{"a": 1}'),
    ('{"a": "}"} more', '{"a": "}"}'),                       # a brace inside a string does not close
    ('{"a": "say \\"}\\" ok"} x', '{"a": "say \\"}\\" ok"}'),  # nor does one after an escaped quote
    ('{"a": {"b": [1, {"c": 2}]}} x', '{"a": {"b": [1, {"c": 2}]}}'),
    ('Sure! Here it is: {"a": 1} Hope it helps', 'Sure! Here it is: {"a": 1}'),
    ('```json\n{"a": 1}\n```\nmore', '```json\n{"a": 1}\n```'),  # a fenced reply runs to its closing fence
    ('```json\n{"a": 1}\nno fence', '```json\n{"a": 1}\nn'),  # stops at the first character that spoils it
    ('{"a": 1', None),
    ('no object at all, "quotes" and } stray', None),
]


def stop_point(text: str) -> str | None:
    state = JsonObjectClosed.start()
    for i, ch in enumerate(text):
        JsonObjectClosed.scan(state, ch)
        if state["done"]:
            return text[: i + 1]
    return None


@pytest.mark.parametrize("reply,expected", CASES)
def test_scan_stops_right_after_the_object(reply, expected):
    assert stop_point(reply) == expected


@pytest.mark.parametrize("reply", ['{"vendor": "A", "total": 1.5}<|im_end|>', '```json\n{"a": [1, 2]}\n```',
                                   '{"a": 1}\n\nsome prose the scorer would reject'])
def test_stopping_never_makes_a_scorable_reply_worse(reply):
    stopped = stop_point(reply)
    full = parse_json_output(reply)
    assert parse_json_output(stopped) == (full if full is not None else parse_json_output(stopped))
    assert parse_json_output(stopped) is not None


def test_criterion_marks_each_row_done_at_its_own_column(tokenizer):
    replies = ['{"a": 1}<|im_end|> and then more words here', 'prose first {"b": "}"} tail tail tail',
               "never any object in this reply at all"]
    prompt = tokenizer("prompt tokens", add_special_tokens=False)["input_ids"]
    rows = [tokenizer(r, add_special_tokens=False)["input_ids"] for r in replies]
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id
    ids = torch.tensor([prompt + r + [pad] * (width - len(r)) for r in rows])  # (3, prompt + width)
    crit = JsonObjectClosed(tokenizer, len(prompt))
    done_at = [None] * len(rows)
    for col in range(len(prompt) + 1, ids.shape[1] + 1):  # generate() calls it once per new column
        flags = crit(ids[:, :col], None)
        for row, flag in enumerate(flags.tolist()):
            if flag and done_at[row] is None:
                done_at[row] = col - len(prompt)
    for row, reply in enumerate(replies[:2]):
        text = tokenizer.decode(rows[row][: done_at[row]])
        assert text == stop_point(reply), (row, text)
    assert done_at[2] is None
