"""Shared fixtures: a tiny random Llama with the real SmolLM2 tokenizer, a small chat file, run configs.

Everything runs offline (HF_HUB_OFFLINE=1 is set before transformers is imported) and on one CPU thread
per training run, so runs are fast and bit-for-bit repeatable.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# The tiny model: LlamaConfig values a test may need for closed-form checks.
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512)
N_CHAT_RECORDS = 24


@contextlib.contextmanager
def torch_globals_preserved():
    """Training sets torch's thread count and seeds the global RNGs; put them back afterwards."""
    threads, torch_rng, py_rng = torch.get_num_threads(), torch.get_rng_state(), random.getstate()
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.set_rng_state(torch_rng)
        random.setstate(py_rng)


@pytest.fixture(autouse=True)
def _restore_torch_globals():
    with torch_globals_preserved():
        yield


AVX2_ONLY = "avx2,fma,sse4_2"  # a Zen 2/3-like x86 CPU: no AVX-512, no native bf16, no AMX


@pytest.fixture
def simulated_avx2_cpu(monkeypatch):
    """tunekit decides as on an AVX2-only CPU (TUNEKIT_CPU_FLAGS, engine/device.py): auto precision, packed
    weights, the bf16 peak. torch and oneDNN still run the real CPU's kernels."""
    from tunekit.engine.device import cpu_flags

    monkeypatch.setenv("TUNEKIT_CPU_FLAGS", AVX2_ONLY)
    cpu_flags.cache_clear()
    yield
    monkeypatch.undo()  # the flags come back before the cache is emptied, so the next reader sees them
    cpu_flags.cache_clear()


@pytest.fixture
def single_thread():
    """One intra-op thread: on small shapes it is much faster than two here, and deterministic."""
    torch.set_num_threads(1)
    yield  # _restore_torch_globals puts the old count back


@pytest.fixture(scope="session")
def tokenizer():
    from tunekit.models import load_tokenizer

    return load_tokenizer("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    from transformers import AutoModelForCausalLM, LlamaConfig

    out = tmp_path_factory.mktemp("tiny-llama")
    cfg = LlamaConfig(vocab_size=len(tokenizer), tie_word_embeddings=True, **TINY)
    with torch_globals_preserved():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def short_chat_records(n: int, seed: int = 0) -> list[dict]:
    """Demo invoice chats with the user turn cut to 40, 55, 70, ... characters: short, varied lengths."""
    from tunekit.demo.invoices import generate_split

    records = []
    for i, rec in enumerate(generate_split(n, seed)):
        user, assistant = rec["messages"]
        records.append({"messages": [{"role": "user", "content": user["content"][: 40 + 15 * i]}, assistant]})
    return records


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def chat_jsonl(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", short_chat_records(N_CHAT_RECORDS))


def base_overrides(model_dir: Path, train_file: Path, output_dir: Path) -> dict:
    """Dotted overrides for a short, deterministic CPU run on the tiny model."""
    return {
        "model.name": str(model_dir),
        "data.train": str(train_file),
        "data.val_fraction": 0.2,
        "data.max_length": 512,
        "optim.lr": 1e-2,
        "optim.warmup_steps": 0,
        "train.output_dir": str(output_dir),
        "train.max_steps": 4,
        "train.batch_size": 2,
        "train.precision": "fp32",
        "train.device": "cpu",
        "train.threads": 1,
        "train.eval_every": 0,
        "train.save_every": 0,
        "train.progress": False,
        "train.seed": 0,
        "train.energy": False,  # codecarbon's hardware probe costs ~5 s per run; one test covers it
        "train.compile": "off",  # compiling costs ~1 min per run; test_engine_compile.py covers it
    }


@pytest.fixture(scope="session")
def make_config(tiny_model_dir, chat_jsonl):
    """make_config(output_dir, {"method.r": 4, ...}) -> Config for the tiny model and the chat file."""
    from tunekit.config import load_config

    def build(output_dir, overrides: dict | None = None, train_file: Path | None = None):
        tree = base_overrides(tiny_model_dir, train_file or chat_jsonl, Path(output_dir))
        tree.update(overrides or {})
        return load_config(None, tree)

    return build


# One LoRA run shared by the CLI, method and schedule tests (trained through `tunekit.cli.main`).
LORA_RUN = {"method.name": "lora", "method.r": 4, "method.alpha": 8.0, "method.target_modules": "all-linear",
            "optim.lr": 2e-2, "optim.warmup_steps": 2, "optim.schedule": "cosine", "optim.min_lr_ratio": 0.1,
            "train.max_steps": 5, "train.eval_every": 2, "train.save_every": 2}


@pytest.fixture(scope="session")
def lora_run(tmp_path_factory, tiny_model_dir, chat_jsonl) -> Path:
    from tunekit.cli import main

    out = tmp_path_factory.mktemp("lora-run") / "run"
    tree = {**base_overrides(tiny_model_dir, chat_jsonl, out), **LORA_RUN}
    argv = ["train"] + [f"--{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in tree.items()]
    with torch_globals_preserved():
        assert main(argv) == 0
    return out


@pytest.fixture(scope="session")
def full_run(tmp_path_factory, make_config) -> Path:
    from tunekit.engine import train

    out = tmp_path_factory.mktemp("full-run") / "run"
    with torch_globals_preserved():
        train(make_config(out, {"method.name": "full", "train.max_steps": 6, "train.save_every": 3}))
    return out


@pytest.fixture(scope="session")
def prompt_ids(tokenizer):
    """(2, T): one chat-formatted invoice prompt and its reversal, two different rows for logit comparisons."""
    text = "<|im_start|>user\nInvoice INV-2024-0042 from Northwind Foods, total EUR 1,234.50.<|im_end|>\n"
    row = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    return torch.cat([row, row.flip(1)], 0)
