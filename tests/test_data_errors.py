"""Bad training data: every error names the file, and the line and field when known."""

from __future__ import annotations

import json
import os
import pickle

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tunekit.config import DataConfig  # noqa: E402
from tunekit.data import DataError, normalise_records, prepare_data, read_records  # noqa: E402


def load(path, **kw):
    """Read + normalise, the part of prepare_data that checks the data."""
    return normalise_records(read_records(str(path)), **kw)


def jsonl(tmp_path, *records, name="train.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


def chat(*pairs):
    return {"messages": [{"role": r, "content": c} for r, c in pairs]}


GOOD = chat(("user", "hi"), ("assistant", "hello"))


def expect_error(path, *parts, **kw) -> DataError:
    with pytest.raises(DataError) as info:
        load(path, **kw)
    message = str(info.value)
    assert path.name in message
    for part in parts:
        assert part in message, f"{part!r} not in {message!r}"
    return info.value


def test_malformed_json_line(tmp_path):
    path = jsonl(tmp_path, GOOD, GOOD, '{"messages": [', GOOD)
    err = expect_error(path, "train.jsonl:3:", "not valid JSON")
    assert err.line == 3


def test_jsonl_line_is_a_list(tmp_path):
    expect_error(jsonl(tmp_path, GOOD, "[1, 2]"), "train.jsonl:2:", "expected a JSON object per line, got an array")


def test_missing_messages_with_chat_format(tmp_path):
    err = expect_error(jsonl(tmp_path, {"text": "x"}), "train.jsonl:1:", "field 'messages'", "missing", format="chat")
    assert err.field == "messages"


def test_missing_prompt(tmp_path):
    path = jsonl(tmp_path, {"completion": "c"})
    expect_error(path, "train.jsonl:1:", "field 'prompt'", "missing", format="prompt_completion")


def test_missing_completion_auto(tmp_path):
    path = jsonl(tmp_path, GOOD, {"prompt": "p", "answer": "a"})
    expect_error(path, "train.jsonl:2:", "field 'completion'", "prompt, completion", "keys: prompt, answer")


def test_missing_output_alpaca(tmp_path):
    expect_error(jsonl(tmp_path, {"instruction": "do", "input": ""}), "train.jsonl:1:", "field 'output'", "missing")


def test_unknown_role_message_reads_well(tmp_path):
    record = chat(("user", "a"), ("assistant", "b"), ("bot", "c"))
    path = jsonl(tmp_path, GOOD, record)
    err = expect_error(path)
    assert str(err) == (
        f"{path}:2: field 'messages[2].role': unknown role 'bot' (allowed: system, user, assistant)"
    )
    assert (err.file, err.line, err.field) == (str(path), 2, "messages[2].role")


def test_error_survives_pickle():
    err = DataError("bad", file="f.jsonl", line=3, field="text")
    again = pickle.loads(pickle.dumps(err))
    assert (str(again), again.line, again.field) == ("f.jsonl:3: field 'text': bad", 3, "text")


def test_empty_assistant_turn(tmp_path):
    path = jsonl(tmp_path, chat(("user", "q"), ("assistant", "  \n")))
    expect_error(path, "train.jsonl:1:", "field 'messages[1].content'", "empty assistant turn")


def test_content_not_a_string(tmp_path):
    path = jsonl(tmp_path, {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]})
    expect_error(path, "train.jsonl:1:", "field 'messages[0].content'", "must be a string", "a number")


def test_messages_not_a_list(tmp_path):
    expect_error(jsonl(tmp_path, {"messages": "hello"}), "train.jsonl:1:", "field 'messages'", "must be a list")


def test_message_not_an_object(tmp_path):
    path = jsonl(tmp_path, {"messages": [{"role": "user", "content": "q"}, "answer"]})
    expect_error(path, "train.jsonl:1:", "field 'messages[1]'", "must be an object")


def test_no_assistant_turn(tmp_path):
    path = jsonl(tmp_path, GOOD, chat(("system", "s"), ("user", "q")))
    expect_error(path, "train.jsonl:2:", "no assistant turn", "train_on=all")


def test_no_assistant_turn_is_fine_when_training_on_all(tmp_path):
    [example] = load(jsonl(tmp_path, chat(("user", "q"))), train_on="all")
    assert example.messages == [{"role": "user", "content": "q"}]


def test_system_not_first(tmp_path):
    path = jsonl(tmp_path, chat(("user", "q"), ("assistant", "a"), ("system", "s")))
    expect_error(path, "train.jsonl:1:", "field 'messages[2].role'", "system message must be the first")


def test_undecodable_bytes(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b'\n{"text": "\xff\xfe bad"}\n')
    err = expect_error(path, "train.jsonl:2:", "not valid UTF-8")
    assert err.line == 2


def test_empty_file(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("")
    expect_error(path, "no records")


def test_only_blank_lines(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("\n   \n\n")
    expect_error(path, "no records")


def test_missing_file(tmp_path):
    expect_error(tmp_path / "nope.jsonl", "file not found", ".jsonl, .json, .csv or .parquet")


def test_unsupported_extension(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("hello\n")
    expect_error(path, "unsupported file type '.txt'", "supported: .jsonl, .json, .csv, .parquet")


def test_csv_without_required_column(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("prompt,answer\nhi,there\n")
    err = expect_error(path, "train.csv: row 1:", "field 'completion'", "missing")
    assert err.unit == "row"


def test_csv_row_with_too_many_values(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("prompt,completion\na,b\nc,d,e\n")
    expect_error(path, "train.csv: row 2:", "more values than the header")


def test_json_not_an_array(tmp_path):
    path = tmp_path / "train.json"
    path.write_text('"just a string"')
    expect_error(path, "expected a JSON array of objects, got a string")


def test_json_object_with_several_lists(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps({"a": [GOOD], "b": [GOOD]}))
    expect_error(path, "one list-valued key", "keys: a, b")


def test_json_syntax_error_names_line(tmp_path):
    path = tmp_path / "train.json"
    path.write_text('[\n  {"text": "a"},\n  {"text": "b",}\n]\n')
    err = expect_error(path, "train.json:3:", "not valid JSON")
    assert err.unit == "line"


def test_json_item_not_an_object(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps([{"text": "a"}, 7]))
    expect_error(path, "train.json: record 2:", "expected an object, got a number")


def test_record_matching_no_format(tmp_path):
    path = jsonl(tmp_path, {"question": "q", "answer": "a"})
    expect_error(path, "train.jsonl:1:", "matches no known format", "keys: question, answer", "prompt_completion")


def test_empty_text(tmp_path):
    expect_error(jsonl(tmp_path, {"text": "hi"}, {"text": "  "}), "train.jsonl:2:", "field 'text'", "empty text")


def test_sharegpt_unknown_speaker(tmp_path):
    path = jsonl(tmp_path, {"conversations": [{"from": "robot", "value": "x"}]})
    expect_error(path, "field 'conversations[0].from'", "unknown role 'robot'", "human, gpt")


def test_parquet_missing_column(tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"instruction": ["a", "b"], "response": ["x", "y"]}), path)
    expect_error(path, "train.parquet: row 1:", "field 'output'", "missing")


def test_train_not_set():
    with pytest.raises(DataError, match="data.train is not set"):
        prepare_data(DataConfig(), tokenizer=None)
