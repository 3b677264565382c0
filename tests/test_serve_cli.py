"""`tunekit serve` as a user starts it: a subprocess on a loopback port, keys printed, Ctrl-C stops it cleanly;
`--print-vllm`; and (slow) the real packaged model served token for token like `tunekit generate`."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from serve_fixtures import free_port, lora_dir  # noqa: F401


def test_print_vllm_names_rank_modules_and_what_vllm_cannot_load(tiny_model_dir, lora_dir, capsys):
    from tunekit.cli import main

    assert main(["serve", "--model", str(tiny_model_dir), "--adapters", str(lora_dir), "--print-vllm"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("vllm serve ") and "--enable-lora" in out and "--max-loras 4" in out
    assert "--max-lora-rank 16" in out and f"ad-r4={lora_dir / 'ad-r4'}" in out


def test_serve_subprocess_prints_keys_answers_and_stops_on_ctrl_c(tiny_model_dir, lora_dir):
    import httpx

    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("TUNEKIT_API_KEYS", None)
    env.pop("TUNEKIT_ADMIN_KEYS", None)
    proc = subprocess.Popen([sys.executable, "-m", "tunekit.cli", "serve", "--model", str(tiny_model_dir),
                             "--adapters", str(lora_dir), "--port", str(port), "--dtype", "float32",
                             "--threads", "1"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        deadline = time.monotonic() + 120
        while not any("admin key:" in line for line in lines):
            assert time.monotonic() < deadline and proc.poll() is None, "".join(lines)
            lines.append(proc.stdout.readline())
        text = "".join(lines)
        user_key = re.search(r"user key:\s+(\S+)", text).group(1)
        assert f"http://127.0.0.1:{port}" in text and "4 adapter(s)" in text
        url = f"http://127.0.0.1:{port}"
        for _ in range(200):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        r = httpx.post(url + "/v1/chat/completions", timeout=60, headers={"Authorization": f"Bearer {user_key}"},
                       json={"model": "ad-r4", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        assert httpx.get(url + "/v1/models", timeout=5).status_code == 401
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0


@pytest.mark.slow
def test_real_model_served_like_tunekit_generate():
    """SmolLM2-135M in fp32: the server's greedy replies equal `tunekit generate`'s, for several prompts at once."""
    from tunekit.demo.invoices import generate_split
    from tunekit.serve.engine import Engine, ServeOptions
    from tunekit.serve.sampling import SamplingParams
    from tunekit.inference import generate, load_for_inference
    from test_serve_engine import run_all

    engine = Engine(ServeOptions(model="smollm2-135m", dtype="float32", max_num_seqs=4))
    engine.start()
    try:
        convs = [rec["messages"][:1] for rec in generate_split(4, seed=3)]
        got = run_all(engine, [(engine.encode_chat(c), SamplingParams(max_tokens=40), None, None) for c in convs])
    finally:
        engine.stop()
    model, tok = load_for_inference("smollm2-135m", device="cpu", dtype="float32")  # what `tunekit generate` runs
    expected = generate(model, tok, convs, max_new_tokens=40, batch_size=1)
    for (tokens, _, _), want in zip(got, expected):
        assert engine.tokenizer.decode(tokens, skip_special_tokens=True).strip() == want
