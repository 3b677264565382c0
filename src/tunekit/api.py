"""Plain Python functions behind every CLI command, for notebooks and scripts.

    import tunekit
    result = tunekit.train("configs/demo-lora.yaml", **{"train.max_steps": 50})
    print(tunekit.generate("Hello!", adapter=result.run_dir))
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import Config, flatten_dotted, load_config


def _config(config: Config | str | Path | dict | None, overrides: dict[str, Any]) -> Config:
    if isinstance(config, Config):
        return config if not overrides else load_config(None, {**flatten_dotted(config.model_dump()), **overrides})
    if isinstance(config, dict):
        return load_config(None, {**flatten_dotted(config), **overrides})
    return load_config(config, overrides)


def train(config: Config | str | Path | dict | None = None, **overrides: Any):
    """Fine-tune. `config` is a Config, a YAML path, or a nested dict; `overrides` use dotted keys
    (pass them as `**{"method.r": 8}`). Returns a TrainResult."""
    from .engine import train as run
    from .privacy.scan import apply_pii_policy

    return run(apply_pii_policy(_config(config, overrides)))


def distill(config: Config | str | Path | dict | None = None, **overrides: Any):
    """Distil cfg.distill.teacher into cfg.model (offline, logit or on-policy; see tunekit.distill). Returns a
    TrainResult."""
    from .distill import distill as run

    return run(_config(config, overrides))


def shrink(model: str, out: str, every: int | None = None, layers: list[int] | None = None,
           adapter: str | None = None, dtype: str = "float32") -> dict:
    """A student model folder with a subset of `model`'s decoder layers (+ `adapter` merged first); returns a
    report with the kept layers and parameter counts."""
    from .distill.shrink import shrink as run

    return run(model, out, every=every, layers=layers, adapter=adapter, dtype=dtype)


def _conversations_from(source: str, system: str | None, from_file: bool) -> list[list[dict]]:
    if not from_file:
        conv = [{"role": "system", "content": system}] if system else []
        return [conv + [{"role": "user", "content": source}]]
    from .evaluate import load_eval_records

    return [prompt for prompt, _ in load_eval_records(source, require_answer=False)]


def generate(prompt: str, model: str = "smollm2-135m", adapter: str | None = None, system: str | None = None,
             max_new_tokens: int = 256, temperature: float = 0.0, device: str = "auto",
             from_file: bool = False, dtype: str = "auto") -> list[str]:
    """Replies from a base model (+ adapter): for one user prompt, or each record of a file (from_file=True)."""
    from .inference import generate as gen, load_for_inference

    m, tok = load_for_inference(model, adapter, device, dtype=dtype)
    return gen(m, tok, _conversations_from(prompt, system, from_file), max_new_tokens=max_new_tokens,
               temperature=temperature)


def chat(model: str = "smollm2-135m", adapter: str | None = None, system: str | None = None, device: str = "auto",
         max_new_tokens: int = 256, temperature: float = 0.7, dtype: str = "auto") -> None:
    """Interactive terminal chat."""
    from .inference import chat_loop, load_for_inference

    m, tok = load_for_inference(model, adapter, device, dtype=dtype)
    chat_loop(m, tok, system=system, max_new_tokens=max_new_tokens, temperature=temperature)


def evaluate(data: str, model: str = "smollm2-135m", adapter: str | None = None, batch_size: int = 16,
             max_new_tokens: int = 256, limit: int | None = None, output: str | None = None, device: str = "auto",
             dtype: str = "auto"):
    """Generate an answer for each record of `data` and score it against the record's last assistant turn."""
    from .evaluate import evaluate_generation

    return evaluate_generation(data, model=model, adapter=adapter, batch_size=batch_size,
                               max_new_tokens=max_new_tokens, limit=limit, output=output, device=device,
                               dtype=dtype)


def merge(adapter: str, out: str, model: str | None = None, dtype: str = "float32", device: str = "cpu"):
    """Fold a run folder's adapter into its base model; write a plain transformers folder to `out`. Returns a
    MergeResult (out_dir, method, base_model, dtype, note)."""
    from .merging import merge as run

    return run(adapter, out, model=model, dtype=dtype, device=device)


def plan(model: str = "smollm2-135m", method: str = "lora", **options):
    """Predicted peak training memory (a MemoryPlan: weights, adapter, gradients, optimizer, activations, overhead).
    Options: seq_len, batch, rank, target, precision, device, label_fraction, virtual_tokens, bottleneck,
    freeze_layers, fraction / max_params / select_rank (select), malloc, optim, dropout, fused_ops, packed_weights
    (see tunekit.planner.plan)."""
    from .planner import plan as run

    return run(model, method=method, **options)


def compare(methods: list[str] | None = None, model: str = "smollm2-135m", steps: int = 40, n_train: int = 1200,
            n_test: int = 50, batch_size: int = 8, device: str = "auto", out: str = "runs/compare", **overrides):
    """Train each method on the demo task with the same budget; returns the table rows (also written to `out`)."""
    from .bench.compare import run_compare

    return run_compare(methods=methods, model=model, steps=steps, n_train=n_train, n_test=n_test,
                       batch_size=batch_size, device=device, out=out, overrides=overrides)


def demo(out: str = "runs/demo", steps: int | None = None, n_test: int = 100):
    """The end-to-end demo; returns its results table as rows."""
    from .demo.pipeline import run_demo

    return run_demo(out=out, steps=steps, n_test=n_test)
