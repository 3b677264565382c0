"""`tunekit federate` on a real Flower SuperLink and SuperNodes on loopback (Deployment Engine), tiny model.

Each federation here starts flower-superlink, one flower-supernode per owner and `flwr run` from Flower's own venv
(benchmarks/scale_out/install_flower.sh; `make test` creates it). The rounds are checked against the same rounds
run in this process: the owners' training through the same engine call, then aggregate.py.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import short_chat_records, torch_globals_preserved, write_jsonl
from tunekit.config import ConfigError
from tunekit.federated.aggregate import ClientUpdate, FederatedError, aggregate
from tunekit.federated.config import load_fed_config
from tunekit.federated.local import copy_into_, initial_tensors, local_config, train_round

try:
    from tunekit.federated.runtime import descendants, federate, find_flower_venv

    FLOWER = find_flower_venv()
except FederatedError as e:  # pragma: no cover - CI creates the venv
    FLOWER, WHY = None, str(e)

needs_flower = pytest.mark.skipif(FLOWER is None, reason=f"Flower's venv is missing: {globals().get('WHY')}")
OWNERS = ("north", "south", "west")


@pytest.fixture(scope="module")
def owner_files(tmp_path_factory):
    """Three owners' disjoint slices of the chat file (12 records each)."""
    root = tmp_path_factory.mktemp("owners")
    records = short_chat_records(36)
    return {name: write_jsonl(root / f"{name}.jsonl", records[k::3]) for k, name in enumerate(OWNERS)}


def fed_tree(tiny_model_dir, files, out, **over) -> dict:
    tree = {
        "output_dir": str(out), "rounds": 2, "local_steps": 2, "aggregation": "svd", "min_owners": 2,
        "round_timeout_s": 900,
        "owners": [{"name": n, "data": str(f)} for n, f in files.items()],
        "training": {
            "model": {"name": str(tiny_model_dir)},
            "data": {"val_fraction": 0.0, "max_length": 256},
            "method": {"name": "lora", "r": 4, "alpha": 8.0},
            "optim": {"lr": 1e-2, "warmup_steps": 0},
            "train": {"batch_size": 2, "precision": "fp32", "device": "cpu", "threads": 1, "eval_every": 0,
                      "energy": False, "compile": "off", "pii": "off", "plan_check": False, "seed": 0},
        },
    }
    tree.update(over)
    return tree


def write_fed(path: Path, tree: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(tree))
    return path


def in_process_round(fed, files, start, number, work):
    """The round as aggregate.py computes it from the owners' trainings run here (same engine, same seeds)."""
    updates = []
    with torch_globals_preserved():
        for name in sorted(files):
            cfg = local_config(fed.training, files[name], work / name, number, fed.local_steps)
            result = train_round(cfg, start, fed.aggregation)
            tensors = {**start, **result.trained}
            updates.append(ClientUpdate(name, tensors, result.n_examples))
    return aggregate(updates, fed.aggregation, expected={n: t.shape for n, t in start.items()},
                     global_tensors=start)


def max_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max(float((a[n].double() - b[n].double()).abs().max()) for n in a)


@pytest.fixture(scope="module")
def federation(tmp_path_factory, tiny_model_dir, owner_files):
    """Two svd rounds of three owners on a real SuperLink + 3 SuperNodes."""
    out = tmp_path_factory.mktemp("fed") / "run"
    held_out = write_jsonl(out.parent / "held-out.jsonl", short_chat_records(6, seed=1))
    fed = load_fed_config(write_fed(out.parent / "fed.yaml", fed_tree(tiny_model_dir, owner_files, out,
                                                                      eval_file=str(held_out))))
    t0 = time.perf_counter()
    result = federate(fed)
    print(f"2 rounds x 3 owners on Flower: {time.perf_counter() - t0:.1f} s")
    return fed, out, result


@needs_flower
def test_two_rounds_equal_the_in_process_aggregation(federation, owner_files, tmp_path):
    fed, out, result = federation
    assert [r["round"] for r in result["rounds"]] == [1, 2]
    for r in result["rounds"]:
        assert sorted(r["owners"]) == sorted(OWNERS) and r["left_out"] == []
        assert all(o["n_examples"] == 12 for o in r["owners"].values())
        assert r["bytes_up"] > 3 * 4 * 8192  # 3 owners x 8,192 fp32 LoRA values, plus Flower's framing
        assert 0 < r["eval_loss"] < 20  # the server's held-out file, after the round
    with torch_globals_preserved():
        start, _, _ = initial_tensors(fed.training_config())
    for number in (1, 2):
        expected = in_process_round(fed, owner_files, start, number, tmp_path / f"r{number}")
        got = load_file(str(out / "rounds" / f"round-{number:04d}" / "global.safetensors"))
        diff = max_diff(got, expected)
        print(f"round {number}: max |Flower - in-process| = {diff:.2e}")
        assert diff < 1e-6
        start = got
    # Every round's adapter is a plain PEFT adapter (loadable by eval / serve).
    adapter = out / "rounds" / "round-0002" / "adapter"
    assert (adapter / "adapter_config.json").exists() and (adapter / "adapter_model.safetensors").exists()
    # The owners' files stayed where they were: the server's run folder holds no training data.
    assert not any(p.suffix == ".jsonl" for p in (out / "rounds").rglob("*"))


@needs_flower
def test_resume_continues_after_the_last_round(federation, owner_files, tmp_path):
    fed, out, _ = federation
    before = {n: (out / "rounds" / f"round-{n:04d}" / "round.json").stat().st_mtime for n in (1, 2)}
    resumed = load_fed_config(None, {**json.loads(fed.model_dump_json()), "rounds": 3, "resume": True})
    result = federate(resumed)
    assert [r["round"] for r in result["rounds"]] == [1, 2, 3]
    assert result["rounds"][2]["left_out"] == []  # no SuperNode of the first launch counted as online
    assert before == {n: (out / "rounds" / f"round-{n:04d}" / "round.json").stat().st_mtime for n in (1, 2)}
    start = load_file(str(out / "rounds" / "round-0002" / "global.safetensors"))
    expected = in_process_round(resumed, owner_files, start, 3, tmp_path)
    got = load_file(str(out / "rounds" / "round-0003" / "global.safetensors"))
    assert max_diff(got, expected) < 1e-6


def kill_owner_when_training(out: Path, owner: str, done: threading.Event, killed: list) -> None:
    """SIGKILL the owner's SuperNode and everything under it once its round-1 training has started."""
    while not done.is_set():
        pids = out / "logs" / "pids.json"
        if (out / "owners" / owner / "round-0001").exists() and pids.exists():
            pid = json.loads(pids.read_text())[f"supernode-{owner}"]
            family = descendants(pid)
            os.killpg(pid, signal.SIGKILL)
            for child in family:
                try:
                    os.kill(child, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            killed.append(pid)
            return
        time.sleep(0.2)


@needs_flower
def test_an_owner_killed_mid_round_does_not_stop_the_round(tmp_path, tiny_model_dir, owner_files):
    out = tmp_path / "run"
    fed = load_fed_config(None, fed_tree(tiny_model_dir, owner_files, out, aggregation="fedavg"))
    done, killed = threading.Event(), []
    killer = threading.Thread(target=kill_owner_when_training, args=(out, "west", done, killed))
    killer.start()
    try:
        result = federate(fed)
    finally:
        done.set()
        killer.join()
    assert killed, "the owner was not killed"
    first = result["rounds"][0]
    assert sorted(first["owners"]) == ["north", "south"] and len(first["left_out"]) == 1
    assert [r["round"] for r in result["rounds"]] == [1, 2]
    print(f"round 1 without the killed owner: left out {first['left_out']}")


@needs_flower
def test_an_owner_whose_file_vanished_is_named(tmp_path, tiny_model_dir, owner_files):
    files = {n: write_jsonl(tmp_path / f"{n}.jsonl", short_chat_records(12)) for n in ("north", "south")}
    out = tmp_path / "run"
    fed = load_fed_config(None, fed_tree(tiny_model_dir, files, out, rounds=1))

    def remove_when_started():
        pids = out / "logs" / "pids.json"
        while not pids.exists() or "supernode-south" not in pids.read_text():
            time.sleep(0.1)
        files["south"].unlink()

    remover = threading.Thread(target=remove_when_started)
    remover.start()
    with pytest.raises(FederatedError, match=r"round 1: 1 owner\(s\) replied, min_owners is 2.*owner 'south': data "
                                             r"file .*south.jsonl does not exist on this SuperNode"):
        federate(fed)
    remover.join()


@needs_flower
def test_local_dp_clips_and_noises_each_owner_and_reports_epsilon(tmp_path, tiny_model_dir, owner_files):
    """Flower's LocalDpMod on every SuperNode: the noise it logs is the Gaussian mechanism's for (epsilon, delta)
    and the clip; the round is no longer the noiseless in-process aggregation; round.json reports the budget."""
    import math

    files = {n: owner_files[n] for n in ("north", "south")}
    dp = {"epsilon": 0.5, "delta": 1e-5, "clip": 0.01}
    fed = load_fed_config(None, fed_tree(tiny_model_dir, files, tmp_path / "run", rounds=1, dp=dp))
    result = federate(fed)
    record = result["rounds"][0]["dp"]
    sigma = 0.01 * math.sqrt(2 * math.log(1.25 / 1e-5)) / 0.5
    assert record["epsilon_total"] == 0.5 and record["delta_total"] == 1e-5
    assert record["noise_std"] == pytest.approx(sigma)
    for owner in files:
        log = (tmp_path / "run" / "logs" / f"supernode-{owner}.log").read_text()
        assert "LocalDpMod: parameters are clipped by value: 0.0100" in log
        assert f"LocalDpMod: local DP noise with {sigma:.4f} stddev added" in log
    with torch_globals_preserved():
        start, _, _ = initial_tensors(fed.training_config())
    noiseless = in_process_round(fed, files, start, 1, tmp_path / "plain")
    got = load_file(str(tmp_path / "run" / "rounds" / "round-0001" / "global.safetensors"))
    assert max_diff(got, noiseless) > sigma / 10  # noise of std sigma on every value, averaged over 2 owners


def test_the_cli_names_a_missing_config(capsys):
    from tunekit.cli import main

    assert main(["federate", "--config", "/nonexistent/fed.yaml"]) == 2
    assert "tunekit federate: federation config not found: /nonexistent/fed.yaml" in capsys.readouterr().err


def test_a_missing_data_file_fails_before_flower_starts(tmp_path, tiny_model_dir, owner_files):
    files = {**owner_files, "east": tmp_path / "nowhere.jsonl"}
    fed = load_fed_config(None, fed_tree(tiny_model_dir, files, tmp_path / "run"))
    with pytest.raises(FederatedError, match=r"owner 'east': data file .*nowhere.jsonl does not exist"):
        federate(fed)


@needs_flower
def test_a_run_submitted_to_a_running_superlink(tmp_path, tiny_model_dir, owner_files):
    """A real deployment's shape: the SuperLink and the owners' SuperNodes are already running (started here the way
    an operator would), `tunekit federate` only submits the run to `superlink: host:port`."""
    from tunekit.federated.runtime import FLOWER_ENV, Processes, start_loopback

    files = {n: owner_files[n] for n in ("north", "south")}
    infra = tmp_path / "infra"
    (infra / "logs").mkdir(parents=True)
    (infra / "flower").mkdir()
    env = {**os.environ, **FLOWER_ENV, "FLWR_HOME": str(infra / "flower"),
           "PATH": f"{FLOWER / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    procs = Processes(infra / "logs", env)
    try:
        address = start_loopback(load_fed_config(None, fed_tree(tiny_model_dir, files, infra)), procs,
                                 FLOWER / "bin", infra)
        fed = load_fed_config(None, fed_tree(tiny_model_dir, {}, tmp_path / "run", rounds=1, owners=[],
                                             superlink=address))
        result = federate(fed)
    finally:
        procs.stop()
    assert sorted(result["rounds"][0]["owners"]) == ["north", "south"]


@needs_flower
def test_an_unreachable_superlink_is_named(tmp_path, tiny_model_dir, owner_files):
    from tunekit.federated.runtime import free_port

    address = f"127.0.0.1:{free_port()}"
    fed = load_fed_config(None, fed_tree(tiny_model_dir, owner_files, tmp_path / "run", superlink=address))
    with pytest.raises(FederatedError, match=f"cannot reach the SuperLink at {address}"):
        federate(fed)


def test_an_adapter_of_another_shape_is_refused_by_the_owner():
    params = {"x.lora_A.default.weight": torch.nn.Parameter(torch.zeros(4, 16))}
    with pytest.raises(FederatedError, match=r"tensor x.lora_A.default.weight: the server sent shape \(8, 16\), "
                                             r"this owner's method builds \(4, 16\)"):
        copy_into_(params, {"x.lora_A.default.weight": torch.zeros(8, 16)})
    with pytest.raises(FederatedError, match="other tensors than this owner's method builds"):
        copy_into_(params, {"y.lora_B.default.weight": torch.zeros(16, 4)})


def test_bad_federation_configs_name_the_key(tmp_path, tiny_model_dir, owner_files):
    tree = fed_tree(tiny_model_dir, owner_files, tmp_path)
    with pytest.raises(ConfigError, match="aggregation"):
        load_fed_config(None, {**tree, "aggregation": "mean"})
    with pytest.raises(ConfigError, match="rounds_: unknown key; valid keys: output_dir, rounds"):
        load_fed_config(None, {**tree, "rounds_": 2})
    with pytest.raises(ConfigError, match="dp with aggregation ffa"):
        load_fed_config(None, {**tree, "aggregation": "ffa", "dp": {"epsilon": 0.5, "clip": 0.1}})
    with pytest.raises(ConfigError, match="min_owners 4 is more than the 3 owners"):
        load_fed_config(None, {**tree, "min_owners": 4})
    with pytest.raises(ConfigError, match=r"under training:\):\n  training.method.r: Input should be greater"):
        load_fed_config(None, {**tree, "training": {**tree["training"], "method": {"name": "lora", "r": 0}}})
    with pytest.raises(ConfigError, match="list the data owners"):
        load_fed_config(None, {**tree, "owners": []})


def test_the_federated_preset_loads():
    preset = Path(__file__).parents[1] / "configs" / "federated" / "demo-3-owners.yaml"
    fed = load_fed_config(preset)
    assert [o.name for o in fed.owners] == ["north", "south", "west"] and fed.aggregation == "svd"
    assert fed.training_config().method.r == 8


def test_ffa_round_trains_b_only_and_sends_it(tmp_path, tiny_model_dir, owner_files):
    """FFA-LoRA in the engine: lora_A stays at the global value bit for bit, only B is returned."""
    fed = load_fed_config(None, fed_tree(tiny_model_dir, owner_files, tmp_path, aggregation="ffa"))
    with torch_globals_preserved():
        start, _, _ = initial_tensors(fed.training_config())
        cfg = local_config(fed.training, owner_files["north"], tmp_path / "north", 1, 2)
        result = train_round(cfg, start, "ffa")
    assert result.trained and all("lora_B" in n for n in result.trained)
    assert any(float((result.trained[n] - start[n]).abs().max()) > 0 for n in result.trained)
    agg = aggregate([ClientUpdate("north", {**start, **result.trained}, result.n_examples)], "ffa",
                    global_tensors=start)
    assert all(torch.equal(agg[n], start[n]) for n in start if "lora_A" in n)
