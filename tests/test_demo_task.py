"""The demo invoice-extraction task: seeded generation, a fixed schema, recoverable values, scoring."""

import datetime as dt
import json

import pytest

from tunekit.demo import (INSTRUCTION, format_table, generate_split, make_example, parse_json_output,
                          score_predictions, write_demo_dataset)
from tunekit.demo.invoices import AMOUNT_STYLES, DATE_STYLES, FIELDS, format_amount, format_date

REF = '{"vendor": "Acme Ltd", "invoice_id": "INV-1", "date": "2024-03-14", "due_date": null, "currency": "EUR", "total": 12.5}'


@pytest.fixture(scope="module")
def examples():
    return generate_split(300, seed=7)


def _text(example):
    user = example["messages"][0]["content"]
    assert user.startswith(INSTRUCTION + "\n\n")
    return user[len(INSTRUCTION) + 2:]


def test_same_seed_same_data_and_other_seed_other_data():
    assert generate_split(20, seed=3) == generate_split(20, seed=3)
    assert generate_split(20, seed=3) != generate_split(20, seed=4)


def test_schema_fixed_keys_types_and_formats(examples):
    for ex in examples:
        target = ex["target"]
        assert tuple(target) == FIELDS
        assert json.loads(ex["messages"][1]["content"]) == target
        assert [m["role"] for m in ex["messages"]] == ["user", "assistant"]
        assert isinstance(target["vendor"], str) and isinstance(target["invoice_id"], str)
        assert dt.date.fromisoformat(target["date"]).isoformat() == target["date"]
        if target["due_date"] is not None:
            assert dt.date.fromisoformat(target["due_date"]) > dt.date.fromisoformat(target["date"])
        assert target["currency"] in {"EUR", "USD", "GBP", "CHF"}
        assert isinstance(target["total"], float) and target["total"] > 0
        assert round(target["total"], 2) == target["total"]
    assert any(ex["target"]["due_date"] is None for ex in examples)
    assert any(ex["target"]["due_date"] is not None for ex in examples)


def test_every_value_is_recoverable_from_the_text(examples):
    for ex in examples:
        text, target = _text(ex), ex["target"]
        assert target["vendor"] in text
        assert target["invoice_id"] in text
        for key in ("date", "due_date"):
            if target[key] is not None:
                day = dt.date.fromisoformat(target[key])
                assert any(format_date(day, style) in text for style in DATE_STYLES), (key, text)
        amounts = [format_amount(target["total"], target["currency"], s) for s in AMOUNT_STYLES]
        assert any(a in text for a in amounts), (amounts, text)


def test_texts_vary_and_have_the_target_length(examples):
    words = [len(_text(ex).split()) for ex in examples]
    assert 60 <= sum(words) / len(words) <= 120
    assert len({_text(ex) for ex in examples}) == len(examples)
    assert len({ex["target"]["vendor"] for ex in examples}) > 200  # pools are combined, not a short list


def test_make_example_uses_only_the_given_rng():
    import random
    assert make_example(random.Random(1)) == make_example(random.Random(1))


def test_write_demo_dataset_splits_are_disjoint(tmp_path):
    paths = write_demo_dataset(tmp_path, n_train=200, n_test=50, seed=0)
    rows = {name: [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
            for name, path in paths.items()}
    assert len(rows["train"]) == 200 and len(rows["test"]) == 50
    assert all(set(r) == {"messages"} and r["messages"][1]["role"] == "assistant"
               for split in rows.values() for r in split)
    texts = {name: {r["messages"][0]["content"] for r in split} for name, split in rows.items()}
    assert not texts["train"] & texts["test"]
    again = write_demo_dataset(tmp_path / "again", n_train=200, n_test=50, seed=0)
    assert again["test"].read_bytes() == paths["test"].read_bytes()


@pytest.mark.parametrize("text", [
    REF, f"  {REF}\n", f"```json\n{REF}\n```", f"```\n{REF}\n```", f"{REF}<|im_end|>",
    f"```json\n{REF}\n```<|im_end|>\n",
])
def test_parse_tolerates_whitespace_fences_and_end_marker(text):
    assert parse_json_output(text) == json.loads(REF)


@pytest.mark.parametrize("text", ["", "not json", "[1, 2]", '"a string"', '{"vendor": "Acme"',
                                  f"Here is the JSON: {REF}", "{'vendor': 'Acme'}"])
def test_parse_is_strict_otherwise(text):
    assert parse_json_output(text) is None


def test_score_predictions_exact_match_and_fields():
    ref = json.loads(REF)
    preds = [
        f"```json\n{REF}\n```",                                 # fenced: right
        json.dumps({**ref, "total": 12.50}),                   # 12.50 == 12.5: right
        json.dumps(dict(reversed(list(ref.items())))),         # key order irrelevant: right
        json.dumps({**ref, "total": "12.5"}),                  # number as string: wrong total
        json.dumps({**{k: v for k, v in ref.items() if k != "vendor"}, "supplier": "Acme Ltd"}),
        '{"vendor": "Acme Ltd", "total": 12.5',                # invalid JSON
    ]
    scores = score_predictions(preds, [REF] * len(preds))
    assert scores["n"] == 6
    assert scores["exact_match"] == pytest.approx(3 / 6)
    assert scores["json_valid"] == pytest.approx(5 / 6)
    acc = scores["field_accuracy"]
    assert list(acc) == list(ref)
    assert acc["total"] == pytest.approx(4 / 6)
    assert acc["vendor"] == pytest.approx(4 / 6)
    assert acc["invoice_id"] == pytest.approx(5 / 6)


def test_score_predictions_number_tolerance_and_bad_input():
    ref = '{"total": 1234.5, "due_date": null}'
    assert score_predictions(['{"total": 1234.5000000001, "due_date": null}'], [ref])["exact_match"] == 1.0
    assert score_predictions(['{"total": 1234.51, "due_date": null}'], [ref])["exact_match"] == 0.0
    assert score_predictions(['{"total": 1234.5, "due_date": "null"}'], [ref])["exact_match"] == 0.0
    assert score_predictions(['{"total": 1, "due_date": null}'], ['{"total": true, "due_date": null}'])[
        "exact_match"] == 0.0
    with pytest.raises(ValueError, match="predictions"):
        score_predictions(["{}"], [])
    with pytest.raises(ValueError, match="reference 0"):
        score_predictions(["{}"], ["oops"])


def test_gold_answers_score_perfectly(examples):
    gold = [ex["messages"][1]["content"] for ex in examples]
    scores = score_predictions(gold, gold)
    assert scores["exact_match"] == 1.0 and scores["json_valid"] == 1.0
    assert set(scores["field_accuracy"]) == set(FIELDS)


def test_format_table_shape():
    rows = [{"model": "base", "exact_match": 0.0, "json_valid": 0.25, "loss": 2.34567, "n": 100},
            {"model": "fine-tuned", "exact_match": 0.93, "json_valid": 1.0, "loss": None, "n": 100}]
    table = format_table(rows, ["model", "exact_match", "json_valid", "loss", "n"])
    lines = table.splitlines()
    assert len(lines) == 4
    assert lines[0].split() == ["model", "exact_match", "json_valid", "loss", "n"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    assert lines[2].split() == ["base", "0.0%", "25.0%", "2.346", "100"]
    assert lines[3].split() == ["fine-tuned", "93.0%", "100.0%", "-", "100"]
    assert len({len(line) for line in lines[:2]}) == 1  # separator spans the header
    assert format_table([{"acc%": 0.5}], ["acc%"]).splitlines()[2].strip() == "50.0%"


def test_paired_exact_test_against_hand_computed_binomial_tails():
    from tunekit.demo.scoring import paired_exact_test

    # 14 discordant examples, 3 won / 11 lost: p = 2 (C(14,0)+C(14,1)+C(14,2)+C(14,3)) / 2^14 = 940/16384.
    ref = [True] * 11 + [False] * 3 + [True] * 50 + [False] * 6
    other = [False] * 11 + [True] * 3 + [True] * 50 + [False] * 6
    assert paired_exact_test(ref, other) == (3, 11, pytest.approx(940 / 16384))
    assert paired_exact_test(other, ref)[2] == pytest.approx(940 / 16384)  # two-sided: symmetric
    assert paired_exact_test([True, False], [False, True]) == (1, 1, 1.0)  # a tie caps at 1
    assert paired_exact_test([True] * 5, [True] * 5) == (0, 0, 1.0)  # nothing discordant: no evidence
    with pytest.raises(ValueError, match="same examples"):
        paired_exact_test([True], [True, False])
