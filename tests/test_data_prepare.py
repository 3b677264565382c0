"""prepare_data end to end: split, stats, warnings, validation file."""

from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tunekit.config import DataConfig  # noqa: E402
from tunekit.data import DataError, DataWarning, Example, prepare_data, split_examples  # noqa: E402


@pytest.fixture(scope="session")
def tok():
    from tunekit.models import load_tokenizer

    return load_tokenizer("smollm2-135m")


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def qa(i, question_words=1):
    return {"prompt": " ".join([f"question{i}"] * question_words), "completion": f"answer{i}"}


def test_split_is_seeded_and_deterministic():
    examples = [Example("f", i, "text", text=str(i)) for i in range(50)]
    train, val = split_examples(examples, 0.2, seed=3)
    train2, val2 = split_examples(examples, 0.2, seed=3)
    assert [e.line for e in val] == [e.line for e in val2] and len(val) == 10
    assert [e.line for e in train] == [e.line for e in train2]
    assert sorted(e.line for e in train + val) == list(range(50))
    assert [e.line for e in split_examples(examples, 0.2, seed=4)[1]] != [e.line for e in val]


@pytest.mark.parametrize("n, fraction, n_val", [(2, 0.01, 1), (1, 0.5, 0), (10, 0.0, 0), (3, 0.9, 2)])
def test_split_sizes(n, fraction, n_val):
    examples = [Example("f", i, "text", text=str(i)) for i in range(n)]
    train, val = split_examples(examples, fraction, seed=0)
    assert (len(train), len(val)) == (n - n_val, n_val)


def test_prepare_with_random_split(tmp_path, tok):
    cfg = DataConfig(train=write_jsonl(tmp_path / "t.jsonl", [qa(i) for i in range(20)]), val_fraction=0.1, seed=1)
    data = prepare_data(cfg, tok)
    s = data.stats
    assert (s.n_records, s.n_train, s.n_val, s.format) == (20, 18, 2, "prompt_completion")
    assert s.truncated == s.dropped_too_long == s.dropped_no_labels == 0
    assert s.total_tokens == sum(len(e.input_ids) for e in data.train + data.validation)
    assert s.label_tokens == sum(e.n_label_tokens for e in data.train + data.validation) > 0
    assert "20 records (prompt_completion) -> 18 train / 2 val" in s.summary()
    again = prepare_data(cfg, tok)
    assert [e.line for e in again.validation] == [e.line for e in data.validation]


def test_prepare_with_validation_file(tmp_path, tok):
    cfg = DataConfig(
        train=write_jsonl(tmp_path / "t.jsonl", [qa(i) for i in range(4)]),
        validation=write_jsonl(tmp_path / "v.jsonl", [{"text": "held out"}]),
    )
    data = prepare_data(cfg, tok)
    assert (data.stats.n_records, data.stats.n_train, data.stats.n_val) == (5, 4, 1)
    assert data.validation[0].file.endswith("v.jsonl")
    assert data.stats.format == "prompt_completion+text"


def test_truncated_prompt_counts_as_dropped_no_labels(tmp_path, tok):
    records = [qa(0), qa(1, question_words=300), qa(2)]
    cfg = DataConfig(train=write_jsonl(tmp_path / "t.jsonl", records), val_fraction=0.0, max_length=64)
    with pytest.warns(DataWarning, match=r"1 example\(s\) dropped: truncation.*t.jsonl:2"):
        data = prepare_data(cfg, tok)
    s = data.stats
    assert (s.n_train, s.dropped_no_labels, s.dropped_too_long, s.truncated) == (2, 1, 0, 0)
    assert [e.line for e in data.train] == [1, 3]
    assert [k.reason for k in data.skipped] == ["no_labels_after_truncation"]


def test_truncated_and_dropped_are_counted_and_warned(tmp_path, tok):
    long_answer = {"prompt": "q", "completion": "word " * 300}
    path = write_jsonl(tmp_path / "t.jsonl", [qa(0), long_answer])
    with pytest.warns(DataWarning, match="1 example.*truncated"):
        kept = prepare_data(DataConfig(train=path, val_fraction=0.0, max_length=64), tok)
    assert (kept.stats.truncated, kept.stats.n_train) == (1, 2)
    assert len(kept.train[1].input_ids) == 64 and kept.train[1].truncated
    with pytest.warns(DataWarning, match="1 example.*dropped.*t.jsonl:2"):
        dropped = prepare_data(DataConfig(train=path, val_fraction=0.0, max_length=64, overflow="drop"), tok)
    assert (dropped.stats.dropped_too_long, dropped.stats.n_train) == (1, 1)


def test_nothing_left_to_train_is_an_error(tmp_path, tok):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "word " * 100}])
    with pytest.warns(DataWarning), pytest.raises(DataError, match="no trainable examples"):
        prepare_data(DataConfig(train=path, val_fraction=0.0, max_length=16, overflow="drop"), tok)


def test_system_prompt_from_config(tmp_path, tok):
    cfg = DataConfig(train=write_jsonl(tmp_path / "t.jsonl", [qa(0)]), system_prompt="Be brief.", val_fraction=0.0)
    data = prepare_data(cfg, tok)
    assert tok.decode(data.train[0].input_ids).startswith("<|im_start|>system\nBe brief.<|im_end|>")
