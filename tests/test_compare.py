"""`tunekit compare` on the tiny model: two methods, two steps, the table files."""

from __future__ import annotations

import json

import pytest

from tunekit.bench.compare import COLUMNS, method_overrides, run_compare


def test_compare_two_methods_two_steps(tmp_path, tiny_model_dir):
    pytest.importorskip("matplotlib")
    out = tmp_path / "compare"
    rows = run_compare(methods=["lora", "ia3"], model=str(tiny_model_dir), steps=2, n_train=12, n_test=2,
                       batch_size=2, device="cpu", out=str(out), isolate=False, max_new_tokens=4,
                       overrides={"train.threads": 1, "train.precision": "fp32", "data.val_fraction": 0.25})
    assert [r["method"] for r in rows] == ["lora", "ia3"]
    for r in rows:
        assert set(COLUMNS) <= set(r)
        assert 0 < r["trainable %"] < 1 and r["peak GiB"] > 0 and r["tokens/s"] > 0
        assert r["eval_loss"] is not None and 0 <= r["exact_match"] <= 1
    md = (out / "compare.md").read_text()
    assert "| lora |" in md and "| ia3 |" in md and "2 steps" in md
    assert json.loads((out / "compare.json").read_text())["rows"][1]["method"] == "ia3"
    assert (out / "compare.png").stat().st_size > 1000


def test_compare_reuses_finished_methods_and_reruns_changed_ones(tmp_path, tiny_model_dir, monkeypatch):
    pytest.importorskip("matplotlib")
    import tunekit.bench.compare as compare

    args = dict(methods=["lora", "bitfit"], model=str(tiny_model_dir), steps=1, n_train=12, n_test=2, batch_size=2,
                device="cpu", out=str(tmp_path / "c"), isolate=False, max_new_tokens=4,
                overrides={"train.threads": 1, "train.precision": "fp32", "data.val_fraction": 0.25})
    first = run_compare(**args)
    assert "(so far: 1 of 2 methods)" not in (tmp_path / "c" / "compare.md").read_text()  # the final table
    trained = []
    real = compare.train_one
    monkeypatch.setattr(compare, "train_one", lambda tree, *a: trained.append(tree["method.name"]) or real(tree, *a))
    assert run_compare(**args) == first and trained == []  # an interrupted comparison continues, nothing redone
    args["overrides"]["optim.lr"] = 1e-3  # a different setting is a different run
    run_compare(**args)
    assert trained == ["lora", "bitfit"]


def test_compare_rejects_unknown_methods():
    with pytest.raises(ValueError, match="unknown method 'lorax' for compare; choose from: lora"):
        method_overrides("lorax")


def test_compare_parameter_selection_against_its_baselines(tmp_path, tiny_model_dir):
    pytest.importorskip("matplotlib")
    out = tmp_path / "compare"
    rows = run_compare(methods=["select", "select-random", "select-last"], model=str(tiny_model_dir), steps=2,
                       n_train=12, n_test=2, batch_size=2, device="cpu", out=str(out), isolate=False, max_new_tokens=4,
                       overrides={"train.threads": 1, "train.precision": "fp32", "data.val_fraction": 0.25,
                                  "method.fraction": 0.3})
    # The same budget: 30% of the 2 x 7 groups' weights, filled to within one group.
    assert len({r["trainable"] for r in rows}) <= 3 and all(r["groups"].endswith(" of 14") for r in rows)
    infos = {r["method"]: json.loads((out / r["method"] / "selection.json").read_text()) for r in rows}
    assert len({i["budget"] for i in infos.values()}) == 1
    assert [i["method"]["strategy"] for i in infos.values()] == ["importance", "random", "last"]
    assert infos["select"]["scoring"] and not infos["select-last"]["scoring"]
    assert "| groups |" in (out / "compare.md").read_text().splitlines()[2]


def test_compare_cli_set_parses_overrides():
    from tunekit.cli import key_values
    from tunekit.config import ConfigError

    assert key_values(["method.fraction=0.05", "method.lora_r=null"], "x") == {"method.fraction": 0.05,
                                                                              "method.lora_r": None}
    with pytest.raises(ConfigError, match="SECTION.KEY=VALUE"):
        key_values(["fraction"], "tunekit compare --set")
