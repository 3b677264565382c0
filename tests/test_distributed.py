"""Training on 2 processes (torchrun, gloo, one thread each, fp32, no dropout) against one process.

The same config (train.batch_size x train.grad_accum is the global batch) must give the same parameters on any
number of processes: 2 ranks with one micro-batch each = 1 process accumulating 2 micro-batches. Each test starts
real torchrun workers on the tiny model of conftest.py (~10 s per launch on 2 cores).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from conftest import base_overrides

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is needed")

GLOBAL = {"train.batch_size": 2, "train.grad_accum": 2, "train.save_every": 2, "train.threads": 1}
LORA = {"method.name": "lora", "method.r": 4, "method.alpha": 8.0, "method.dropout": 0.0}
TOL = 1e-6


def flags(tree: dict) -> list[str]:
    return [f"--{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in tree.items()]


def worker_env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def tunekit_train(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tunekit.cli", "train", *args], capture_output=True, text=True,
                          env=worker_env(), timeout=timeout)


def torchrun(args: list[str], nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                           *args], capture_output=True, text=True, env=worker_env(), timeout=timeout)


def checked(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def last_trainable(run_dir: Path) -> dict[str, torch.Tensor]:
    root = Path(run_dir) / "checkpoints"
    return load_file(str(root / (root / "latest").read_text().strip() / "trainable.safetensors"))


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def single_process(make_config, out: Path, tree: dict):
    from tunekit.engine import train

    return train(make_config(out, tree))


@pytest.fixture
def tree(tiny_model_dir, chat_jsonl, tmp_path):
    """Dotted overrides of conftest's short deterministic run, global batch 4 (2 x 2)."""
    return lambda out, extra: {**base_overrides(tiny_model_dir, chat_jsonl, out), **GLOBAL, **extra}


def test_ddp_lora_two_processes_equal_one_process(tree, make_config, tmp_path):
    extra = {**LORA, "train.max_steps": 4}
    ref = single_process(make_config, tmp_path / "one", {**GLOBAL, **extra})
    out = tmp_path / "two"
    proc = checked(tunekit_train(["--nproc", "2", *flags(tree(out, extra))]))
    assert max_diff(last_trainable(tmp_path / "one"), last_trainable(out)) <= TOL
    # Metrics, run card and result once, from rank 0; tokens count both ranks.
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    ref_lines = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [m["step"] for m in ref_lines]
    assert [m.get("tokens") for m in lines] == [m.get("tokens") for m in ref_lines]
    for m, r in zip(lines, ref_lines):
        assert m.get("loss", 0) == pytest.approx(r.get("loss", 0), rel=1e-6)
    result = json.loads((out / "result.json").read_text())
    assert (result["world_size"], result["parallel"], result["tokens_seen"]) == (2, "ddp", ref.tokens_seen)
    assert (out / "adapter_model.safetensors").exists() and (out / "README.md").exists()
    assert proc.stdout.count("[tunekit] data:") == 1  # rank 1 prints nothing


def test_ddp_full_under_torchrun_module_equals_one_process(tree, make_config, tmp_path):
    extra = {"method.name": "full", "train.max_steps": 3}
    single_process(make_config, tmp_path / "one", {**GLOBAL, **extra})
    out = tmp_path / "two"
    checked(torchrun(["-m", "tunekit.cli", "train", *flags(tree(out, extra))]))
    assert max_diff(last_trainable(tmp_path / "one"), last_trainable(out)) <= TOL
    assert max_diff(load_file(str(tmp_path / "one" / "model.safetensors")),
                    load_file(str(out / "model.safetensors"))) <= TOL


def test_fsdp2_full_equals_one_process_and_resumes_a_one_process_checkpoint(tree, make_config, tmp_path):
    # Gradient clipping off here: the sharded norm sums its squares in another order (8e-6 relative on this model;
    # the clip factor then moves the parameters by ~1e-6 in 3 steps); the gradients themselves match exactly.
    extra = {"method.name": "full", "train.max_steps": 4, "optim.max_grad_norm": None, "optim.schedule": "constant"}
    single_process(make_config, tmp_path / "one", {**GLOBAL, **extra, "train.keep_checkpoints": 3})
    out = tmp_path / "fsdp"
    checked(tunekit_train(["--nproc=2", "--train.parallel=fsdp", *flags(tree(out, extra))]))
    assert max_diff(last_trainable(tmp_path / "one"), last_trainable(out)) <= TOL
    assert max_diff(load_file(str(tmp_path / "one" / "model.safetensors")),
                    load_file(str(out / "model.safetensors"))) <= TOL
    assert json.loads((out / "result.json").read_text())["parallel"] == "fsdp"
    # Resume the one-process run's step-2 checkpoint on 2 FSDP2 ranks: same end point.
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "one", resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-000004")
    (resumed / "checkpoints" / "latest").write_text("step-000002")
    proc = checked(tunekit_train(["--nproc=2", "--train.parallel=fsdp", "--resume", *flags(tree(resumed, extra))]))
    assert "resumed from" in proc.stdout
    assert max_diff(last_trainable(tmp_path / "one"), last_trainable(resumed)) <= TOL


PROBE = r'''
import json, sys, torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
x, w = torch.randn(4 * world, 8), torch.randn(6, 8)
ref = torch.nn.Linear(8, 6, bias=False)
with torch.no_grad():
    ref.weight.copy_(w)
ref(x).square().mean().backward()  # one process, the whole batch: the gradient to reproduce
out = {}
for name, force_sum in (("default", False), ("tunekit", True)):
    m = torch.nn.Linear(8, 6, bias=False)
    with torch.no_grad():
        m.weight.copy_(w)
    fully_shard(m)
    if force_sum:  # what distributed/wrap.py does: SUM on every backend, the loss carries the 1/world
        m.set_force_sum_reduction_for_comms(True)
        m.set_gradient_divide_factor(1.0)
    loss = m(x[rank * 4:(rank + 1) * 4]).square().mean()  # mean over this rank's quarter...
    (loss / world if force_sum else loss).backward()  # ...DDP-style: the reduction should average
    g = m.weight.grad.full_tensor()
    out[name] = float((g / ref.weight.grad).mean())
if rank == 0:
    json.dump(out, open(sys.argv[1], "w"))
dist.destroy_process_group()
'''


def test_fsdp2_on_gloo_sums_where_it_should_average_and_tunekit_does_not_ask_it_to(tmp_path):
    """pytorch/pytorch#162338: FSDP2 reduce-scatters with ReduceOp.AVG, which gloo computes as a sum."""
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    checked(torchrun([str(script), str(tmp_path / "ratios.json")]))
    ratios = json.loads((tmp_path / "ratios.json").read_text())
    assert ratios["tunekit"] == pytest.approx(1.0, abs=1e-6)  # what the training loop relies on
    # pytorch#162338 reported 2.0 (gloo summing); torch 2.13.0+cpu measures 1.0 here. Either way the loop is exact.
    assert ratios["default"] == pytest.approx(2.0, abs=1e-6) or ratios["default"] == pytest.approx(1.0, abs=1e-6)
    print(f"FSDP2 on gloo, default reduction: {ratios['default']:.3f} x the single-process gradient")


def test_world_size_that_does_not_divide_the_global_batch_is_refused(tree, tmp_path):
    proc = tunekit_train(["--nproc", "3", *flags(tree(tmp_path / "r", LORA))], timeout=120)
    assert proc.returncode == 2
    assert "3 processes cannot split the global batch of 4" in proc.stderr and "[1, 2, 4]" in proc.stderr


def test_fsdp_with_an_adapter_method_is_refused_before_any_worker_starts(tree, tmp_path):
    proc = tunekit_train(["--nproc", "2", "--train.parallel", "fsdp", *flags(tree(tmp_path / "r", LORA))], timeout=120)
    assert proc.returncode == 2 and "method lora trains few parameters: use train.parallel ddp" in proc.stderr


def test_uneven_token_counts_per_rank_mean_would_be_wrong(make_config, tmp_path, single_thread):
    """Negative control: the 2 ranks of a step hold different numbers of label tokens; averaging per-rank means
    (what a plain DDP loss.mean() does) is far from the one-process gradient, tunekit's scaling is not."""
    from tunekit.data import prepare_data
    from tunekit.distributed.context import DistContext
    from tunekit.distributed.sharding import rank_micro_batches
    from tunekit.distributed.wrap import scaled_for_backward
    from tunekit.engine.batching import BatchStream
    from tunekit.engine.objective import gold_loss_sum
    from tunekit.methods import build_method, trainable_named_parameters
    from tunekit.models import load_model, load_tokenizer

    cfg = make_config(tmp_path, {**LORA, **GLOBAL})
    torch.manual_seed(0)
    tok = load_tokenizer(cfg.model.name)
    data = prepare_data(cfg.data, tok)
    method = build_method(cfg.method)
    model = method.apply(load_model(cfg.model.name, "float32"))
    with torch.no_grad():  # LoRA B starts at zero; give it values so every LoRA tensor has a gradient
        for n, p in trainable_named_parameters(model).items():
            p.add_(0.05 * torch.randn_like(p))
    params = trainable_named_parameters(model)

    def grads_of(batches, weights):
        model.zero_grad()
        for b, w in zip(batches, weights):
            (gold_loss_sum(model, method, method.lm_head(model), b)[0] * w).backward()
        return torch.cat([p.grad.flatten() for p in params.values()])

    def stream():
        return BatchStream(data.train, 2, cfg.train.seed, True, tok.pad_id if hasattr(tok, "pad_id") else tok.pad_token_id)

    one = rank_micro_batches(stream(), 2, 2, 0, 1)  # one process: 2 micro-batches
    ranks = [rank_micro_batches(stream(), 2, 2, r, 2) for r in (0, 1)]  # 2 ranks: 1 micro-batch each
    n = [sum(b.n_targets for b in r) for r in ranks]
    assert n[0] != n[1] and [b.n_targets for b in one] == n  # uneven: the case that matters
    total = sum(n)
    reference = grads_of(one, [1 / total, 1 / total])  # the loop on one process
    ctx = DistContext(world_size=2, grad_reduce_divides_by=2)  # DDP: the all-reduce averages
    loss_sums = lambda r: [gold_loss_sum(model, method, method.lm_head(model), b)[0] for b in ranks[r]]  # noqa: E731
    tunekit = []
    for r in (0, 1):
        model.zero_grad()
        for ls in loss_sums(r):
            scaled_for_backward(ctx, ls, total).backward()
        tunekit.append(torch.cat([p.grad.flatten() for p in params.values()]))
    ddp_tunekit = (tunekit[0] + tunekit[1]) / 2  # what DDP's averaging all-reduce makes of them
    per_rank_mean = (grads_of(ranks[0], [1 / n[0]]) + grads_of(ranks[1], [1 / n[1]])) / 2
    rel = lambda g: float((g - reference).norm() / reference.norm())  # noqa: E731
    assert rel(ddp_tunekit) < 1e-6
    assert rel(per_rank_mean) > 1e-3, f"per-rank mean off by only {rel(per_rank_mean):.2e}"
    print(f"targets per rank {n}: per-rank mean off by {rel(per_rank_mean):.3%}, tunekit {rel(ddp_tunekit):.1e}")


def _descendants(pid: int) -> list[int]:
    children = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _local_rank(pid: int) -> str | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    return next((e.split(b"=", 1)[1].decode() for e in env if e.startswith(b"LOCAL_RANK=")), None)


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the worker through /proc (Linux)")
def test_killed_rank_ends_the_run_cleanly_and_the_run_resumes(tree, make_config, tmp_path):
    # A constant LR, so the run's length does not change the schedule of the steps before the kill.
    extra = {**LORA, "optim.schedule": "constant", "train.max_steps": 100000, "train.keep_checkpoints": 2}
    out = tmp_path / "killed"
    launcher = subprocess.Popen([sys.executable, "-m", "tunekit.cli", "train", "--nproc", "2",
                                 *flags(tree(out, extra))], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=worker_env())
    try:
        deadline = time.time() + 240
        while time.time() < deadline and launcher.poll() is None:
            done = sorted((out / "checkpoints").glob("step-*/COMPLETE")) if (out / "checkpoints").exists() else []
            if done and int(done[-1].parent.name.split("-")[1]) >= 4:
                break
            time.sleep(0.05)
        rank1 = [p for p in _descendants(launcher.pid) if _local_rank(p) == "1"]
        assert rank1, "no rank-1 worker found"
        os.kill(rank1[0], signal.SIGKILL)
        stdout, stderr = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 2, stderr[-3000:]
    assert "a training process failed" in stderr and "is intact" in stderr and "--resume" in stderr
    from tunekit.engine.checkpoint import latest_checkpoint, read_training_state

    last = latest_checkpoint(out)
    assert last is not None and (last / "COMPLETE").exists()
    step = read_training_state(last).step
    assert step >= 4 and str(last) in stderr
    # Resume the 2-process checkpoint on 1 process for 2 more steps: equal to an uninterrupted 1-process run.
    resumed = single_process(make_config, out, {**GLOBAL, **extra, "train.max_steps": step + 2, "train.resume": True})
    assert resumed.steps == step + 2
    single_process(make_config, tmp_path / "straight", {**GLOBAL, **extra, "train.max_steps": step + 2})
    assert max_diff(last_trainable(tmp_path / "straight"), last_trainable(out)) <= TOL
