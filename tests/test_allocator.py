"""The training commands' choice of malloc (tunekit/allocator.py): which one, how it is started, and that a real
`tunekit train` process runs under it and records it."""

import json
import os
import subprocess
import sys

import pytest

from tunekit import allocator
from tunekit.allocator import AllocatorError

from conftest import base_overrides


@pytest.fixture
def clean_env(monkeypatch):
    for k in (allocator.ENV, allocator.GUARD, "LD_PRELOAD"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(sys, "platform", "linux")
    return monkeypatch


def installed(monkeypatch, *names):
    monkeypatch.setattr(allocator, "find_library", lambda n: f"/lib/{n}.so" if n in names else None)


def test_auto_prefers_tcmalloc_then_jemalloc_then_the_system(clean_env):
    installed(clean_env, "tcmalloc", "jemalloc")
    assert allocator.wanted() == ("tcmalloc", "/lib/tcmalloc.so")
    installed(clean_env, "jemalloc")
    assert allocator.wanted() == ("jemalloc", "/lib/jemalloc.so")
    installed(clean_env)
    assert allocator.wanted() is None
    clean_env.setenv(allocator.ENV, "system")
    installed(clean_env, "tcmalloc")
    assert allocator.wanted() is None


def test_bad_or_missing_choice_is_a_clear_error(clean_env):
    clean_env.setenv(allocator.ENV, "mimalloc")
    with pytest.raises(AllocatorError, match="TUNEKIT_MALLOC='mimalloc'.*auto, jemalloc, tcmalloc, system"):
        allocator.wanted()
    clean_env.setenv(allocator.ENV, "jemalloc")
    installed(clean_env, "tcmalloc")
    with pytest.raises(AllocatorError, match="libjemalloc.so.2.*apt install libjemalloc2"):
        allocator.wanted()


def test_reexec_sets_ld_preload_once_and_only_for_training_commands(clean_env):
    calls = []
    clean_env.setattr(os, "execve", lambda exe, argv, env: calls.append((exe, argv, env)))
    clean_env.setattr(allocator, "in_use", lambda: "glibc")
    installed(clean_env, "tcmalloc")
    clean_env.setenv("LD_PRELOAD", "/lib/other.so")
    allocator.reexec_under_allocator(["train", "--config", "x.yaml"])
    (exe, argv, env), = calls
    assert exe == sys.executable and argv == [sys.executable, "-m", "tunekit.cli", "train", "--config", "x.yaml"]
    assert env["LD_PRELOAD"] == "/lib/tcmalloc.so:/lib/other.so" and env[allocator.GUARD] == "1"
    for argv in (["eval", "data.jsonl"], ["plan"], []):  # not a training command: left alone
        allocator.reexec_under_allocator(argv)
    clean_env.setenv(allocator.GUARD, "1")  # already re-executed: never twice
    allocator.reexec_under_allocator(["train"])
    clean_env.delenv(allocator.GUARD)
    clean_env.setattr(allocator, "in_use", lambda: "jemalloc")  # the user preloaded one: auto keeps it
    allocator.reexec_under_allocator(["train"])
    assert len(calls) == 1
    clean_env.setenv(allocator.ENV, "tcmalloc")  # ... unless they asked for another by name
    allocator.reexec_under_allocator(["distill"])
    assert len(calls) == 2


def test_in_use_reads_this_process():
    assert allocator.in_use() in ("glibc", "jemalloc", "tcmalloc", "system")


@pytest.mark.parametrize("choice", ["auto", "system"])
def test_a_train_process_runs_under_the_allocator_it_records(tmp_path, tiny_model_dir, chat_jsonl, choice):
    out = tmp_path / "run"
    tree = {**base_overrides(tiny_model_dir, chat_jsonl, out), "train.max_steps": 1, "train.progress": False}
    argv = [sys.executable, "-m", "tunekit.cli", "train", *[f"--{k}={v}" for k, v in tree.items()]]
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", allocator.GUARD)}
    proc = subprocess.run(argv, env={**env, allocator.ENV: choice}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((out / "result.json").read_text())
    if choice == "system" or not sys.platform.startswith("linux"):
        expected = allocator.in_use()  # what this test process (started without preloading) uses
    else:
        expected = next((n for n in allocator.AUTO_ORDER if allocator.find_library(n)), "glibc")
    assert result["allocator"] == expected
    assert f"| malloc | {expected}" in (out / "README.md").read_text()
