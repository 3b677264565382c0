"""Model FLOPs per token against a count by hand, and MFU / energy reported by a real (tiny) run."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import TINY
from tunekit.config import FullMethod, LoraMethod
from tunekit.engine import train
from tunekit.engine.flops import (ModelShape, base_linear_weights, flops_per_token, linear_shapes, measure_matmul_peak,
                                  measure_shape_peak)
from tunekit.methods import build_method
from tunekit.models import load_model

pytestmark = pytest.mark.usefixtures("single_thread")


def by_hand() -> dict:
    h, inter, layers = TINY["hidden_size"], TINY["intermediate_size"], TINY["num_hidden_layers"]
    kv = TINY["num_key_value_heads"] * h // TINY["num_attention_heads"]
    per_layer = h * h + 2 * h * kv + h * h + 3 * h * inter  # q, k, v, o, gate, up, down
    return {"linear": layers * per_layer, "layers": layers, "d_attn": h}


def test_model_shape_counts_the_decoder_linears(tiny_model_dir, tokenizer):
    shape = ModelShape.from_model(load_model(str(tiny_model_dir)))
    ref = by_hand()
    assert shape.linear_params == ref["linear"]
    assert shape.head_params == load_model(str(tiny_model_dir)).lm_head.weight.numel()
    assert (shape.n_layers, shape.d_attn) == (ref["layers"], ref["d_attn"])


def test_flops_per_token_frozen_base_and_full(tiny_model_dir):
    ref = by_hand()
    base = load_model(str(tiny_model_dir))
    weights = base_linear_weights(base)
    lora = build_method(LoraMethod(r=4)).apply(base)
    shape = ModelShape.from_model(lora, weights)  # LoRA's own A/B linears are not counted
    head = shape.head_params
    attention = 12 * ref["layers"] * (100 / 2) * ref["d_attn"]
    assert shape.trainable_linear_params == 0 and not shape.head_trains
    assert flops_per_token(shape, 0.25, 100) == pytest.approx(4 * ref["linear"] + 4 * head * 0.25 + attention)
    full = ModelShape.from_model(build_method(FullMethod()).apply(load_model(str(tiny_model_dir))))
    assert ModelShape.from_model(lora).linear_params > ref["linear"]  # why base weights are taken first
    assert full.trainable_linear_params == ref["linear"] and full.head_trains
    assert flops_per_token(full, 0.25, 100) == pytest.approx(6 * ref["linear"] + 6 * head * 0.25 + attention)


def test_matmul_peak_is_a_plausible_rate():
    peak = measure_matmul_peak(torch.float32, n=256, seconds=0.2)
    assert 1e8 < peak < 1e15
    assert 1e7 < measure_shape_peak({(64, 32): 2, (32, 64): 1}, torch.float32, tokens=64, seconds=0.2) < 1e15


def test_linear_shapes_count_each_decoder_shape(tiny_model_dir):
    h, inter, layers = TINY["hidden_size"], TINY["intermediate_size"], TINY["num_hidden_layers"]
    kv = TINY["num_key_value_heads"] * h // TINY["num_attention_heads"]
    shapes = linear_shapes(base_linear_weights(load_model(str(tiny_model_dir))))
    want: dict = {}
    for key in [(h, h), (kv, h), (kv, h), (h, h), (inter, h), (inter, h), (h, inter)]:  # q k v o gate up down
        want[key] = want.get(key, 0) + layers
    assert shapes == want


def test_shape_peak_is_the_flop_weighted_rate_of_the_shapes(monkeypatch):
    """Total FLOPs over total time: a shape the model has 3 times weighs 3 times (fake clock: 1 s per product)."""
    import tunekit.engine.flops as flops

    from types import SimpleNamespace

    ticks = iter(range(10**6))  # flops' own clock only: patching time.perf_counter itself would tick for every thread
    monkeypatch.setattr(flops, "time", SimpleNamespace(perf_counter=lambda: float(next(ticks))))
    rate = measure_shape_peak({(8, 4): 3, (16, 4): 1}, torch.float32, tokens=2, seconds=4)
    assert rate == pytest.approx((3 * 2 * 2 * 4 * 8 + 2 * 2 * 4 * 16) / 4)  # 4 products of 1 s each


def test_run_reports_mfu_and_energy_in_result_and_run_card(make_config, tmp_path):
    cfg = make_config(tmp_path / "run", {"train.energy": True, "train.max_steps": 3})
    result = train(cfg)
    assert result.flops_per_token > 0 and result.matmul_peak_flops > 0 and result.shape_peak_flops > 0
    assert result.mfu == pytest.approx(result.tokens_per_s * result.flops_per_token / result.matmul_peak_flops)
    assert result.mfu_model_shapes == pytest.approx(result.tokens_per_s * result.flops_per_token
                                                    / result.shape_peak_flops)
    card = (tmp_path / "run" / "README.md").read_text()
    assert "| MFU |" in card and "GFLOP/s n^3 matmul peak" in card and "model's own linear shapes" in card
    assert result.precision_note and result.precision_note in card
    saved = json.loads((tmp_path / "run" / "result.json").read_text())
    if saved["energy"] is None:  # codecarbon could not probe this machine: the card must say why
        assert saved["energy_note"] and saved["energy_note"] in card
    else:
        assert saved["energy"]["kwh"] > 0
        assert saved["energy"]["source"].split(" ")[0] in ("measured", "estimated")
        assert "Wh" in card and "CO2e" in card


def test_cached_peak_keeps_the_best_measurement(tmp_path, monkeypatch):
    import tunekit.engine.flops as flops

    readings = iter([2e11, 1e11, 3e11])  # a busy CPU can only measure low
    monkeypatch.setattr(flops, "measure_matmul_peak", lambda *a, **k: next(readings))
    cpu = torch.device("cpu")
    assert flops.cached_matmul_peak(torch.bfloat16, cpu, tmp_path) == 2e11
    assert flops.cached_matmul_peak(torch.bfloat16, cpu, tmp_path) == 2e11
    assert flops.cached_matmul_peak(torch.bfloat16, cpu, tmp_path) == 3e11


def test_metrics_and_progress_show_the_peak_memory_so_far(make_config, tmp_path, capsys):
    cfg = make_config(tmp_path / "run", {"train.max_steps": 3, "train.progress": True})
    result = train(cfg)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    peaks = [r["peak_memory_gib"] for r in rows if "loss" in r]
    assert len(peaks) == 3 and all(p > 0 for p in peaks)
    assert peaks == sorted(peaks)  # a running peak never falls
    assert peaks[-1] <= result.peak_memory_bytes / 2**30  # the result's peak also covers the final eval
    assert "peak " in capsys.readouterr().err  # the progress line (plain lines when stderr is not a terminal)


def test_the_loop_says_its_speed_and_how_long_the_rest_takes(make_config, tmp_path, capsys, monkeypatch):
    """After the warm-up step and three more, one line gives the measured tokens/s and the minutes left."""
    monkeypatch.setenv("TUNEKIT_CPU_FLAGS", "avx2,fma,sse4_2")  # an AVX2-only CPU: fp32, and the log says why
    from tunekit.engine.device import cpu_flags

    cpu_flags.cache_clear()
    try:
        result = train(make_config(tmp_path / "run", {"train.max_steps": 6, "train.progress": True,
                                                      "train.precision": "auto"}))
    finally:
        cpu_flags.cache_clear()
    captured = capsys.readouterr()
    err = captured.err + captured.out
    line = next(x for x in err.splitlines() if "this machine trains at" in x)
    assert "(fp32): the remaining 2 steps take ~" in line and line.endswith(" min")
    assert "precision fp32: this CPU (TUNEKIT_CPU_FLAGS) has no native bf16" in err
    assert result.precision == "fp32" and "no native bf16" in result.precision_note
