"""Fixtures for the serving tests: four PEFT LoRA adapters on the tiny model, an engine, a live server."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import torch_globals_preserved

# (rank, alpha, rslora, rank_pattern): the LoRA family's variants the batched path must reproduce exactly
ADAPTER_SPECS = {"ad-r4": (4, 8, False, {}), "ad-r8-rslora": (8, 16, True, {}),
                 "ad-ranks": (4, 8, False, {"q_proj": 2, "down_proj": 6}), "ad-r16": (16, 4, False, {})}


def make_lora(base_dir: Path, out: Path, r: int, alpha: float, rslora: bool, rank_pattern: dict, seed: int):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    with torch_globals_preserved():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(base_dir)
        cfg = LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, rank_pattern=rank_pattern,
                         target_modules="all-linear", init_lora_weights=False)
        peft_model = get_peft_model(model, cfg)
        with torch.no_grad():  # peft's random init gives B = 0 unless told; make every delta visible
            for name, p in peft_model.named_parameters():
                if "lora_" in name:
                    p.normal_(0, 0.3)
        peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def lora_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """A folder with the four adapters as subfolders (what `--adapters DIR` reads)."""
    root = tmp_path_factory.mktemp("adapters")
    for seed, (name, spec) in enumerate(ADAPTER_SPECS.items()):
        make_lora(tiny_model_dir, root / name, *spec, seed=seed + 1)
    return root


def engine_for(model_dir, **options):
    from tunekit.serve.engine import Engine, ServeOptions

    return Engine(ServeOptions(model=str(model_dir), dtype="float32", threads=1, **options))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """A real uvicorn server on a loopback port, in a thread of the test process."""

    def __init__(self, app, port: int):
        import uvicorn

        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)


@contextlib.contextmanager
def live_server(engine, app):
    """Start `engine`, serve `app` on a loopback uvicorn, yield the LiveServer (with .engine); stop both after."""
    engine.start()
    try:
        with LiveServer(app, free_port()) as live:
            live.engine = engine
            yield live
    finally:
        engine.stop()
