"""Checkpoints and resume: a run that is killed (SIGKILL), interrupted (Ctrl-C) or left with a half-written
checkpoint continues to exactly the loss sequence and weights of an uninterrupted run.

The runs that get killed or interrupted are real `python -m tunekit.cli train` processes; the reference and
the resumes go through the same `tunekit.cli.main` in this process (the interpreter start-up dominates a tiny
run). One CPU thread each, LoRA dropout on so that the restored RNG state matters too.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import torch_globals_preserved
from tunekit.cli import main
from tunekit.engine.checkpoint import (
    MARKER,
    TrainingState,
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from tunekit.engine.metrics import MetricsLog, read_metrics

STEPS = 16
RUN_CONFIG = {
    "data": {"val_fraction": 0.2, "max_length": 512},
    "method": {"name": "lora", "r": 4, "alpha": 8.0, "dropout": 0.1},
    "optim": {"lr": 1e-2, "warmup_steps": 3, "schedule": "cosine"},
    "train": {"max_steps": STEPS, "batch_size": 2, "save_every": 2, "eval_every": 4, "keep_checkpoints": 2,
              "precision": "fp32", "device": "cpu", "threads": 1, "progress": False, "seed": 0},
}


class Run:
    """One `tunekit train` subprocess writing into `out`, its output captured in files."""

    def __init__(self, config: Path, out: Path, *extra: str):
        self.out = out
        self.log = out.parent / f"{out.name}.{len(list(out.parent.glob(out.name + '.*.log')))}.log"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        cmd = [sys.executable, "-m", "tunekit.cli", "train", "--config", str(config), "--train.output_dir", str(out),
               "--train.threads", "1", *extra]
        self._fh = open(self.log, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._fh, stderr=subprocess.STDOUT, env=env, cwd=out.parent)

    def wait(self, timeout: float = 240) -> int:
        rc = self.proc.wait(timeout)
        self._fh.close()
        return rc

    def output(self) -> str:
        return self.log.read_text()


def latest_step(out: Path) -> int:
    try:
        return int((out / "checkpoints" / "latest").read_text().strip().split("-")[1])
    except (OSError, IndexError, ValueError):
        return -1


def last_logged_step(out: Path) -> int:
    steps = [-1]
    try:
        for line in (out / "metrics.jsonl").read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line being written
                continue
            if "loss" in rec:
                steps.append(rec["step"])
    except OSError:
        pass
    return max(steps)


def wait_until(condition, run: Run, what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if run.proc.poll() is not None:
            pytest.fail(f"run ended (rc {run.proc.returncode}) before {what}:\n{run.output()[-3000:]}")
        if time.monotonic() > deadline:
            run.proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


def step_records(out: Path) -> list[tuple]:
    return [(r["step"], r["loss"], r["lr"], r["tokens"], r["tokens_seen"], r["grad_norm"])
            for r in read_metrics(out / "metrics.jsonl") if "loss" in r]


def eval_records(out: Path) -> list[tuple]:
    return [(r["step"], r["eval_loss"]) for r in read_metrics(out / "metrics.jsonl") if "eval_loss" in r]


def assert_same_run(got: Path, expected: Path) -> None:
    exp_steps, got_steps = step_records(expected), step_records(got)
    assert [s[0] for s in exp_steps] == list(range(1, STEPS + 1))
    assert [s[0] for s in got_steps] == list(range(1, STEPS + 1)), "every step logged exactly once"
    for e, g in zip(exp_steps, got_steps):
        assert g == pytest.approx(e, rel=1e-6, abs=1e-7), f"step {e[0]}"
    (exp_eval_steps, exp_eval), (got_eval_steps, got_eval) = zip(*eval_records(expected)), zip(*eval_records(got))
    assert got_eval_steps == exp_eval_steps == (0, 4, 8, 12, STEPS)
    assert got_eval == pytest.approx(exp_eval, rel=1e-6)
    want, have = load_file(str(expected / "adapter_model.safetensors")), load_file(str(got / "adapter_model.safetensors"))
    assert want.keys() == have.keys()
    for k in want:
        torch.testing.assert_close(have[k], want[k], rtol=1e-6, atol=1e-7, msg=k)
    assert json.loads((got / "result.json").read_text())["steps"] == STEPS


def corrupt_copy(src: Path, dst: Path) -> int:
    """Copy a run folder, then add a half-written checkpoint: a leftover .tmp folder and a newer step folder
    without the COMPLETE marker that `latest` points to. Returns the step of the last complete checkpoint."""
    shutil.copytree(src, dst)
    good = latest_step(dst)
    root = dst / "checkpoints"
    bad = f"step-{good + 2:06d}"
    (root / f".tmp-step-{good + 4:06d}").mkdir()
    (root / f".tmp-step-{good + 4:06d}" / "trainable.safetensors").write_bytes(b"\0" * 10)
    (root / bad).mkdir()
    (root / bad / "trainable.safetensors").write_bytes(b"garbage")
    (root / "latest").write_text(bad)
    return good


def in_process(config: Path, out: Path, *extra: str) -> tuple[int, str]:
    """`tunekit train` through tunekit.cli.main in this process (no interpreter start-up): (rc, stdout)."""
    buf = io.StringIO()
    with torch_globals_preserved(), contextlib.redirect_stdout(buf):
        rc = main(["train", "--config", str(config), "--train.output_dir", str(out), "--train.threads", "1", *extra])
    return rc, buf.getvalue()


def watch(run: Run, condition, sig: int, what: str, errors: list) -> threading.Thread:
    """Send `sig` to `run` once `condition()` holds (from a thread, so this process can train meanwhile)."""
    def target():
        try:
            wait_until(condition, run, what)
            run.proc.send_signal(sig)
        except BaseException as e:  # pytest.fail raises an exception outside the Exception tree
            errors.append(f"{what}: {e}")
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, chat_jsonl):
    """Two subprocesses (one SIGKILLed, one sent SIGINT) while the reference trains in this process; then
    resumes (the killed run, the interrupted run, a copy of the killed run with a half-written checkpoint)."""
    root = tmp_path_factory.mktemp("resume")
    cfg = {**RUN_CONFIG, "model": {"name": str(tiny_model_dir)}}
    cfg["data"] = {**cfg["data"], "train": str(chat_jsonl)}
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    out = {name: root / name for name in ("reference", "killed", "interrupted", "corrupt")}

    errors: list[str] = []
    killed, interrupted = Run(config, out["killed"]), Run(config, out["interrupted"])
    try:
        watchers = [
            watch(killed, lambda: latest_step(out["killed"]) >= 4, signal.SIGKILL, "checkpoint 4", errors),
            watch(interrupted, lambda: last_logged_step(out["interrupted"]) >= 2, signal.SIGINT, "step 2", errors),
        ]
        info = {}
        info["reference_rc"], info["reference_output"] = in_process(config, out["reference"])
        for w in watchers:
            w.join(240)
        info["killed_rc"], info["interrupted_rc"] = killed.wait(), interrupted.wait()
    finally:
        for r in (killed, interrupted):
            if r.proc.poll() is None:
                r.proc.kill()
                r.wait()
    info["errors"] = errors
    info.update(killed_at=latest_step(out["killed"]), killed_logged=last_logged_step(out["killed"]),
                killed_finished=(out["killed"] / "result.json").exists(),
                interrupted_output=interrupted.output(), interrupted_logged=last_logged_step(out["interrupted"]),
                interrupted_ckpt=latest_step(out["interrupted"]),
                interrupted_files=sorted(p.name for p in out["interrupted"].iterdir()))
    info["corrupt_good"] = corrupt_copy(out["killed"], out["corrupt"])
    ckpt = out["interrupted"] / "checkpoints" / f"step-{info['interrupted_ckpt']:06d}" / "state.pt"
    info["interrupted_elapsed"] = torch.load(ckpt, weights_only=True)["elapsed_s"] if ckpt.exists() else None

    info["killed_resume_rc"], info["resume_output"] = in_process(config, out["killed"], "--train.resume", "true")
    info["interrupted_resume_rc"], _ = in_process(config, out["interrupted"], "--train.resume", "true")
    info["corrupt_resume_rc"], info["corrupt_output"] = in_process(config, out["corrupt"], "--resume")
    return out, info


def test_killed_run_resumes_to_the_same_losses_and_weights(runs):
    out, info = runs
    assert not info["errors"]
    assert info["reference_rc"] == 0
    assert info["killed_rc"] == -signal.SIGKILL
    assert not info["killed_finished"] and info["killed_logged"] < STEPS, "the kill must land mid-run"
    assert 4 <= info["killed_at"] < STEPS
    assert info["killed_resume_rc"] == 0, info["resume_output"][-3000:]
    ckpt = out["killed"] / "checkpoints" / f"step-{info['killed_at']:06d}"
    assert f"resumed from {ckpt} at step {info['killed_at']}" in info["resume_output"]
    assert_same_run(out["killed"], out["reference"])


def test_ctrl_c_finishes_the_step_checkpoints_and_exits_130(runs):
    out, info = runs
    assert not info["errors"]
    assert info["interrupted_rc"] == 130, info["interrupted_output"][-3000:]
    assert "interrupt" in info["interrupted_output"]
    assert 2 <= info["interrupted_logged"] < STEPS
    assert info["interrupted_ckpt"] == info["interrupted_logged"], "checkpoint of the step that was running"
    assert "adapter_model.safetensors" not in info["interrupted_files"]  # not a finished run
    assert info["interrupted_resume_rc"] == 0
    assert_same_run(out["interrupted"], out["reference"])
    # The resumed run's wall time counts the interrupted process's too (it is in the checkpoint).
    wall = json.loads((out["interrupted"] / "result.json").read_text())["wall_time_s"]
    assert 0 < info["interrupted_elapsed"] < wall


def test_half_written_checkpoint_is_ignored_on_resume(runs):
    out, info = runs
    good = info["corrupt_good"]
    assert info["corrupt_resume_rc"] == 0, info["corrupt_output"][-3000:]
    ckpt = out["corrupt"] / "checkpoints" / f"step-{good:06d}"
    assert f"resumed from {ckpt} at step {good}" in info["corrupt_output"]
    assert_same_run(out["corrupt"], out["reference"])
    assert not list((out["corrupt"] / "checkpoints").glob(".tmp-*"))  # leftovers are cleaned up


def test_reference_run_keeps_the_last_checkpoints(runs):
    out, _ = runs
    root = out["reference"] / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000014", "step-000016"]
    assert (root / "latest").read_text() == "step-000016"
    assert all((p / MARKER).exists() for p in root.glob("step-*"))


# --- the checkpoint functions on their own ----------------------------------------------------------


def fake_checkpoint(root: Path, step: int, complete: bool) -> Path:
    d = root / "checkpoints" / f"step-{step:06d}"
    d.mkdir(parents=True)
    if complete:
        (d / MARKER).write_text(d.name)
    return d


def test_latest_checkpoint_prefers_pointer_and_skips_incomplete(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    two = fake_checkpoint(tmp_path, 2, complete=True)
    four = fake_checkpoint(tmp_path, 4, complete=True)
    fake_checkpoint(tmp_path, 6, complete=False)
    (tmp_path / "checkpoints" / ".tmp-step-000008").mkdir()
    pointer = tmp_path / "checkpoints" / "latest"
    assert latest_checkpoint(tmp_path) == four  # no pointer: newest complete
    pointer.write_text("step-000006")
    assert latest_checkpoint(tmp_path) == four  # pointer to an incomplete folder
    pointer.write_text("step-000099")
    assert latest_checkpoint(tmp_path) == four  # pointer to a missing folder
    pointer.write_text("step-000002\n")
    assert latest_checkpoint(tmp_path) == two  # a valid pointer wins


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(3, 2)
        self.frozen = torch.nn.Parameter(torch.ones(2), requires_grad=False)


def train_steps(model, opt, k):
    for _ in range(k):
        loss = model.a(torch.randn(4, 3)).pow(2).sum()
        loss.backward()
        opt.step()
        opt.zero_grad()


def test_save_and_load_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = Tiny()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for step in (1, 2, 3):
        train_steps(model, opt, 1)
        state = TrainingState(step, {"epoch": 0, "pos": step}, {"last_epoch": step}, 10 * step, rng_state(),
                              elapsed_s=1.5 * step, rate_tokens=7 * step, rate_time=0.5 * step)
        path = save_checkpoint(tmp_path, model, opt, state, keep=2)
    assert path == tmp_path / "checkpoints" / "step-000003"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-000002", "step-000003"]
    saved = load_file(str(path / "trainable.safetensors"))
    assert sorted(saved) == ["a.bias", "a.weight"]  # only trainable parameters

    # What the original does next, and what a restored copy does next, are the same (weights, Adam moments
    # and the RNG that draws the inputs all come back).
    rng_at_save = torch.get_rng_state().clone()
    train_steps(model, opt, 2)
    other = Tiny()
    other_opt = torch.optim.AdamW([p for p in other.parameters() if p.requires_grad], lr=0.1)
    restored = load_checkpoint(latest_checkpoint(tmp_path), other, other_opt)
    assert (restored.step, restored.stream, restored.scheduler, restored.tokens_seen) == \
        (3, {"epoch": 0, "pos": 3}, {"last_epoch": 3}, 30)
    assert (restored.elapsed_s, restored.rate_tokens, restored.rate_time) == (4.5, 21, 1.5)
    set_rng_state(restored.rng)
    assert torch.equal(torch.get_rng_state(), rng_at_save)
    train_steps(other, other_opt, 2)
    for (n, p), q in zip(model.named_parameters(), other.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=0, msg=n)


def test_load_checkpoint_into_a_different_model_names_the_mismatch(tmp_path):
    model = Tiny()
    opt = torch.optim.AdamW([model.a.weight, model.a.bias])
    path = save_checkpoint(tmp_path, model, opt, TrainingState(1, {}, {}, 0, rng_state()))
    other = torch.nn.Sequential(torch.nn.Linear(3, 2))
    with pytest.raises(RuntimeError, match=r"does not match.*0\.weight"):
        load_checkpoint(path, other, torch.optim.AdamW(other.parameters()))


def test_metrics_log_on_resume_drops_steps_after_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path)
    for step in range(0, 7):
        log.write({"step": step, "loss": float(step)})
    log.close()
    log = MetricsLog(path, resume_step=4)
    log.write({"step": 5, "loss": 50.0})
    log.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(path)] == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 3.0),
                                                                     (4, 4.0), (5, 50.0)]
