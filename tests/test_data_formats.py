"""Readers (round trips per file type) and normalisation of every record format."""

from __future__ import annotations

import csv
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tunekit.data import DataError, Record, detect_format, normalise_record, read_records  # noqa: E402
from tunekit.data.readers import read_hf_dataset  # noqa: E402

ROWS = [
    {"prompt": "What is 2+2?", "completion": "4"},
    {"prompt": 'Say "hi", twice', "completion": "hi\nhi"},
]


def user_assistant(user, assistant):
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def rec(**data) -> Record:
    return Record(data, "f.jsonl", 7)


def test_jsonl_skips_blank_lines_and_keeps_line_numbers(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join([json.dumps(ROWS[0]), "", "  ", json.dumps(ROWS[1])]) + "\n")
    records = read_records(str(path))
    assert [r.data for r in records] == ROWS
    assert [(r.file, r.line) for r in records] == [(str(path), 1), (str(path), 4)]


def test_utf8_bom_is_accepted(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": "h\u00e9"}).encode() + b"\n")
    assert read_records(str(path))[0].data == {"text": "h\u00e9"}


def test_csv_round_trip(tmp_path):
    path = tmp_path / "d.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["prompt", "completion"])
        writer.writeheader()
        writer.writerows(ROWS)
    records = read_records(str(path))
    assert [r.data for r in records] == ROWS
    assert [r.line for r in records] == [1, 2]


@pytest.mark.parametrize("wrap", [False, True])
def test_json_round_trip(tmp_path, wrap):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"version": 1, "data": ROWS} if wrap else ROWS))
    records = read_records(str(path))
    assert [r.data for r in records] == ROWS
    assert [r.line for r in records] == [1, 2]


def test_parquet_round_trip_with_nested_messages(tmp_path):
    path = tmp_path / "d.parquet"
    rows = [{"messages": user_assistant("q1", "a1")}, {"messages": user_assistant("q2", "a2")}]
    pq.write_table(pa.Table.from_pylist(rows), path)
    records = read_records(str(path))
    assert [r.data for r in records] == rows
    assert normalise_record(records[1]).messages == user_assistant("q2", "a2")


def test_hub_name_offline_gives_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pytest.importorskip("datasets")
    with pytest.raises(DataError, match="Hugging Face dataset"):
        read_hf_dataset("nobody-xyz/no-such-dataset-xyz", split="train")


def test_chat_is_kept():
    example = normalise_record(rec(messages=user_assistant("q", "a")))
    assert (example.format, example.messages, example.text) == ("chat", user_assistant("q", "a"), None)
    assert (example.file, example.line) == ("f.jsonl", 7)


def test_chat_drops_extra_message_keys():
    messages = [{"role": "user", "content": "q", "name": "x"}, {"role": "assistant", "content": "a", "weight": 1}]
    assert normalise_record(rec(messages=messages)).messages == user_assistant("q", "a")


def test_sharegpt_conversations():
    convo = [{"from": "system", "value": "S"}, {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]
    example = normalise_record(rec(conversations=convo))
    assert example.format == "chat"
    assert example.messages == [{"role": "system", "content": "S"}] + user_assistant("q", "a")


def test_prompt_completion():
    assert normalise_record(rec(prompt="p", completion="c")).messages == user_assistant("p", "c")
    with_system = normalise_record(rec(prompt="p", completion="c", system="S"))
    assert with_system.messages == [{"role": "system", "content": "S"}] + user_assistant("p", "c")
    assert with_system.format == "prompt_completion"


@pytest.mark.parametrize(
    "extra, user",
    [({}, "Do it."), ({"input": ""}, "Do it."), ({"input": " \n"}, "Do it."), ({"input": None}, "Do it."),
     ({"input": "the thing"}, "Do it.\n\nthe thing")],
)
def test_alpaca(extra, user):
    example = normalise_record(rec(instruction="Do it.", output="Done.", **extra))
    assert (example.format, example.messages) == ("alpaca", user_assistant(user, "Done."))


def test_text():
    example = normalise_record(rec(text="raw text"))
    assert (example.format, example.text, example.messages) == ("text", "raw text", None)


@pytest.mark.parametrize(
    "data, expected",
    [
        ({"messages": []}, "chat"),
        ({"conversations": []}, "chat"),
        ({"prompt": "p", "completion": "c"}, "prompt_completion"),
        ({"instruction": "i", "input": "", "output": "o"}, "alpaca"),
        ({"text": "t"}, "text"),
        ({"text": "t", "messages": None}, "text"),  # Parquet fills absent columns with null
        ({"messages": [], "text": "t"}, "chat"),  # chat wins
    ],
)
def test_detect_format(data, expected):
    assert detect_format(rec(**data)) == expected


def test_system_prompt_is_added_only_when_missing():
    plain = normalise_record(rec(prompt="p", completion="c"), system_prompt="Be brief.")
    assert plain.messages[0] == {"role": "system", "content": "Be brief."}
    own = normalise_record(rec(prompt="p", completion="c", system="Mine."), system_prompt="Be brief.")
    assert [m["content"] for m in own.messages] == ["Mine.", "p", "c"]


def test_explicit_format_overrides_detection():
    # A record with both keys is a text record when the config says so.
    example = normalise_record(rec(text="t", prompt="p", completion="c"), format="text")
    assert example.text == "t"
