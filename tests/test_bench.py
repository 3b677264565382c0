"""The training benchmark end to end on the tiny model: every runner in its own process, one shared scorer."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from tunekit.bench.train_bench import format_markdown, main, throughput
from tunekit.engine.device import native_bf16


def test_throughput_leaves_out_warmup_steps():
    result = {"step_times": [10.0, 1.0, 2.0], "step_tokens": [100, 100, 300]}
    t = throughput(result, warmup=1)
    assert t["tokens_per_s"] == pytest.approx(400 / 3)
    assert t["median_step_tokens_per_s"] == pytest.approx(125.0)
    assert t["tokens_seen"] == 500 and t["timed_steps"] == 2


def test_bench_runs_the_peers_and_tunekit_and_writes_json_markdown_png(tiny_model_dir, tmp_path):
    peers = ["trainer", "tunekit"] + (["trl"] if importlib.util.find_spec("trl") else [])
    args = ["--model", str(tiny_model_dir), "--steps", "3", "--warmup", "1", "--n-train", "24", "--n-test", "6",
            "--threads", "1", "--only", *peers, "--out", str(tmp_path), "--trainer-bf16"]
    rows = main(args)
    from tunekit.allocator import in_use, wanted

    malloc = wanted()  # tunekit runs under the malloc `tunekit train` would use; so does one more Trainer run
    # --trainer-bf16 adds the Trainer recipe under bf16 autocast (the default on CUDA)
    assert sorted(r["runner"] for r in rows) == sorted(peers + ["trainer"] + (["trainer"] if malloc else []))
    system = in_use()  # this test process was started without preloading one
    assert [r["malloc"] for r in rows if r["runner"] == "tunekit"] == [malloc[0] if malloc else system]
    assert [r["malloc"] for r in rows if r["runner"] == "trainer"] == [system, system] + ([malloc[0]] if malloc else [])
    assert [r["precision"] for r in rows if r["runner"] == "trainer"] == ["fp32", "bf16"] + (["fp32"] if malloc else [])
    saved = json.loads((tmp_path / "bench.json").read_text())
    for row in saved["rows"]:
        assert row["tokens_per_s"] > 0 and row["peak_rss_bytes"] > 2**20
        assert row["eval_loss"] == row["eval_loss"]  # scored (not NaN) by the shared eval
        assert row["speed_ratio"] > 0 and 0 < row[f"mfu_{saved['meta']['mfu_peak']}"] < 1
    trainer = next(r for r in saved["rows"] if r["runner"] == "trainer")
    tunekit = next(r for r in saved["rows"] if r["runner"] == "tunekit")
    assert trainer["speed_ratio"] == 1.0 and trainer["precision"] == "fp32"  # the fp32 recipe is the reference
    assert trainer["peak_memory_bytes"] == trainer["peak_rss_bytes"]  # CPU: the memory column is peak RSS
    assert saved["meta"]["device"] == "cpu"
    assert trainer["tokens_seen"] == tunekit["tokens_seen"]  # same examples per step, same steps
    assert saved["meta"]["base_eval_loss"] > 0
    table = (tmp_path / "bench.md").read_text()
    assert "x Trainer" in table and "F/token" in table
    # bf16 is timed only where the CPU computes it natively (emulated, a 2048^3 product takes minutes)
    native = native_bf16(torch.device("cpu"))
    assert (saved["meta"]["peak"]["bf16"] is not None) == native
    ref = "bf16" if native else "fp32"
    assert saved["meta"]["mfu_peak"] == ref and f"MFU ({ref} peak)" in table
    assert (tmp_path / "bench.png").stat().st_size > 1000
    # An interrupted or repeated call reuses the runs that finished with the same settings.
    again = main(args + ["--reuse"])
    assert all(r["reused"] for r in again)
    assert [r["tokens_per_s"] for r in again] == [r["tokens_per_s"] for r in saved["rows"]]
    assert [r["peak_rss_bytes"] for r in again] == [r["peak_rss_bytes"] for r in saved["rows"]]
    assert "Reused from an earlier call" in (tmp_path / "bench.md").read_text()


def test_markdown_table_has_a_row_per_run():
    meta = {"peak": {"fp32": 1e11, "bf16": 3e11}, "formula": "F", "flops_per_token": 5e8, "mean_len": 100.0,
            "label_fraction": 0.25, "base_eval_loss": 1.0, "warmup": 2}
    rows = [{"name": n, "tokens_per_s": 100.0, "speed_ratio": 1.0, "peak_rss_bytes": 2**30, "memory_ratio": 1.0,
             "eval_loss": 0.5, "mfu_bf16": 0.1, "tokens_seen": 1000} for n in ("a", "b")]
    lines = format_markdown(rows, meta).splitlines()
    assert lines[2].startswith("| a |") and lines[3].startswith("| b |")
    assert "MFU (bf16 peak)" in lines[0] and "| 10.0% |" in lines[2]


def test_markdown_table_gives_mfu_against_the_model_shapes_too_and_names_the_cpu():
    meta = {"peak": {"fp32": 1e11, "bf16": 3e11, "fp32_shapes": 8e10, "bf16_shapes": 2e11}, "formula": "F",
            "flops_per_token": 5e8, "mean_len": 100.0, "label_fraction": 0.25, "base_eval_loss": 1.0, "warmup": 2,
            "cpu": "AMD EPYC 9R14", "isa": "avx512_bf16"}
    rows = [{"name": "a", "tokens_per_s": 100.0, "speed_ratio": 1.0, "peak_rss_bytes": 2**30, "memory_ratio": 1.0,
             "eval_loss": 0.5, "mfu_bf16": 0.1, "mfu_bf16_shapes": 0.15, "tokens_seen": 1000}]
    table = format_markdown(rows, meta)
    assert "MFU (bf16 peak) | MFU (bf16, model shapes)" in table and "| 10.0% | 15.0% |" in table
    assert "AMD EPYC 9R14, avx512_bf16" in table and "bf16 200 GFLOP/s" in table


def test_markdown_table_without_a_bf16_peak_uses_the_fp32_one_and_says_so():
    """Where bf16 is emulated (AVX2-only CPUs) its peak is not measured: MFU against fp32, and the table says why."""
    meta = {"peak": {"fp32": 1e11, "bf16": None}, "formula": "F", "flops_per_token": 5e8, "mean_len": 100.0,
            "label_fraction": 0.25, "base_eval_loss": 1.0, "warmup": 2}
    rows = [{"name": "a", "tokens_per_s": 100.0, "speed_ratio": 1.0, "peak_rss_bytes": 2**30, "memory_ratio": 1.0,
             "eval_loss": 0.5, "mfu_fp32": 0.5, "mfu_bf16": None, "tokens_seen": 1000}]
    table = format_markdown(rows, meta)
    assert "MFU (fp32 peak)" in table and "| 50.0% |" in table
    assert "bf16 not measured" in table and "no native bf16" in table


@pytest.mark.parametrize("ablation, module, name", [("label-only", "objective", "label_only_loss_sum"),
                                                    ("fused-adamw", "loop", "build_optimizer")])
def test_code_ablations_replace_what_the_loop_calls(ablation, module, name, tiny_model_dir, chat_jsonl, tmp_path,
                                                    monkeypatch):
    """The two ablations that swap engine code must patch the name the training step resolves at run time (the
    label-only one once patched a name the loop no longer called, so its row silently measured the full engine)."""
    from tunekit.bench import runners
    from tunekit.bench.train_bench import ABLATIONS
    from tunekit.engine import loop, objective, schedule

    engine = {"objective": objective, "loop": loop}[module]
    original = getattr(engine, name)
    monkeypatch.setattr(engine, name, original)  # restored after the test: the runner patches for its process
    monkeypatch.setattr(schedule, "build_optimizer", schedule.build_optimizer)
    spec = {"model": str(tiny_model_dir), "train": str(chat_jsonl), "max_length": 64, "r": 4, "alpha": 8,
            "dropout": 0.0, "targets": ["q_proj", "v_proj"], "lr": 1e-3, "max_grad_norm": 1.0, "steps": 1,
            "batch_size": 2, "seed": 0, "variant": ABLATIONS[ablation][1]}
    result = runners.run_tunekit(spec, tmp_path)
    assert getattr(engine, name) is not original  # the variant's code is what the loop resolves
    assert result["step_times"] and result["step_tokens"][0] > 0
