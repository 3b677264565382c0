"""The run card: a short README.md in the run folder that says what was trained, on what, and how it went."""

from __future__ import annotations

from pathlib import Path

from .config import Config


def _fmt_bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def _fmt_loss(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _fmt_value(v) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    return f"{v:,}" if isinstance(v, int) else f"{v:.4g}"


def load_instructions(run_dir: Path, model_name: str) -> str:
    """How to load what the run folder holds: a PEFT adapter, a tunekit-format result, or a full model."""
    from .methods.base import METHOD_FILE

    if (Path(run_dir) / "adapter_config.json").exists():
        return (f"```python\nfrom peft import PeftModel\nfrom tunekit.models import load_model\n"
                f"model = PeftModel.from_pretrained(load_model({model_name!r}), {str(run_dir)!r})\n```\n"
                f"or `tunekit generate --model {model_name} --adapter {run_dir} --prompt '...'`")
    if (Path(run_dir) / METHOD_FILE).exists():
        return (f"```python\nfrom tunekit.methods import load_saved_method\nfrom tunekit.models import load_model\n"
                f"model = load_saved_method(load_model({model_name!r}), {str(run_dir)!r})\n```\n"
                f"or `tunekit generate --model {model_name} --adapter {run_dir} --prompt '...'`")
    return f"`tunekit generate --model {run_dir} --prompt '...'` (a complete transformers model folder)"


def _energy(result) -> str:
    if not result.energy:
        return result.energy_note or "not measured"
    e = result.energy
    return (f"{e['kwh'] * 1000:.2f} Wh, {e['co2e_kg'] * 1000:.2f} g CO2e ({e['country']} grid mix); "
            f"{e['source']} (codecarbon, offline)")


def write_run_card(run_dir: Path, cfg: Config, result, stats, method=None, extra_rows: dict | None = None) -> Path:
    """`method` (the Method object, optional) adds its report() rows and its effective packing; `extra_rows`
    (e.g. the distillation objective's report) are listed after them."""
    pct = 100 * result.trainable_params / max(result.total_params, 1)
    method_desc = ", ".join(f"{k}={v}" for k, v in cfg.method.model_dump().items() if k != "name")
    load = load_instructions(run_dir, cfg.model.name)
    packing = cfg.data.packing and (method is None or method.supports_packing)
    method_rows = [(k, _fmt_value(v)) for k, v in (method.report() if method is not None else {}).items()]
    rows = [
        ("Base model", f"`{cfg.model.name}`"),
        ("Method", f"{cfg.method.name} ({method_desc})"),
        ("Data", f"`{cfg.data.train}`" + (f", validation `{cfg.data.validation}`" if cfg.data.validation else "")),
        ("Examples", f"{stats.n_train} train, {stats.n_val} validation"),
        *method_rows,
        *[(k, _fmt_value(v)) for k, v in (extra_rows or {}).items()],
        ("Trainable parameters", f"{result.trainable_params:,} of {result.total_params:,} ({pct:.3f}%)"),
        ("Steps", f"{result.steps} (batch {cfg.train.batch_size} x accumulation {cfg.train.grad_accum}, "
                  f"packing {'on' if packing else 'off'})"),
        ("Tokens seen", f"{result.tokens_seen:,}"),
        ("Throughput", f"{result.tokens_per_s:,.0f} tokens/s (after the first step)"),
        ("MFU", "n/a" if result.mfu is None else
         f"{100 * result.mfu:.1f}% of the measured {result.matmul_peak_flops / 1e9:,.0f} GFLOP/s n^3 matmul peak"
         + ("" if not getattr(result, "mfu_model_shapes", None) else
            f", {100 * result.mfu_model_shapes:.1f}% of the {result.shape_peak_flops / 1e9:,.0f} GFLOP/s the "
            f"model's own linear shapes reach here")
         + f" ({result.flops_per_token / 1e6:,.0f} MFLOP per token; formula in tunekit/engine/flops.py)"),
        ("Energy", _energy(result)),
        ("Peak memory", f"{_fmt_bytes(result.peak_memory_bytes)} "
                        f"({'peak allocated on GPU' if result.device.startswith('cuda') else 'peak RSS'})"
                        + ("" if not result.planned_peak_bytes else
                           f"; planned {_fmt_bytes(result.planned_peak_bytes)} (tunekit plan)")),
        ("malloc", f"{result.allocator or 'n/a'} (TUNEKIT_MALLOC picks it for the tunekit commands; "
                   f"see tunekit/allocator.py)"),
        ("Eval loss", f"{_fmt_loss(result.eval_loss_before)} before -> {_fmt_loss(result.eval_loss_after)} after"),
        ("Precision / device", f"{result.precision} on {result.device}"
         + (f" ({result.precision_note})" if getattr(result, "precision_note", "") else "")),
        ("Wall time", f"{result.wall_time_s:,.0f} s"),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    extra = method.card_section().strip() if method is not None else ""  # e.g. select's per-group table
    text = (f"# tunekit run: {Path(run_dir).name}\n\n| | |\n|---|---|\n{table}\n\n"
            + (f"{extra}\n\n" if extra else "") +
            f"## Data\n\n{stats.summary()}\n\n## Load it\n\n{load}\n\n"
            f"Files: `config.yaml` (the full resolved config; rerun with `tunekit train --config config.yaml`), "
            f"`metrics.jsonl` (one line per step), `checkpoints/` (resumable).\n")
    path = Path(run_dir) / "README.md"
    path.write_text(text)
    return path
