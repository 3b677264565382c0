"""The Flower ServerApp (Message API, flwr >= 1.2x): rounds of train messages to the owners' SuperNodes.

Each round: the global adapter (only the trainable tensors, fp32) goes to every connected SuperNode in an
ArrayRecord; each replies with its trained tensors and its number of training examples; replies that carry an
error, or that do not come within `round_timeout_s`, are left out (the round needs `min_owners`); the rest are
aggregated by `aggregate.py` (fedavg, ffa or svd, weighted by examples) and the round is checkpointed
(rounds.py). Runs inside the SuperLink's ServerApp process (Flower's venv), never imported by tunekit's CLI.
"""

from __future__ import annotations

import json
import math
import time
import traceback
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from .aggregate import ClientUpdate, FederatedError, aggregate, check_updates, product_bias
from .config import FedConfig
from .local import (check_federable, copy_into_, eval_loss_on, initial_tensors, save_adapter,
                    trainable_tensors)
from .rounds import history, last_round, load_round, save_round

app = ServerApp()
POLL_S = 0.5


def wait_for_owners(grid: Grid, fed: FedConfig, first: bool) -> list[int]:
    """Node ids of the connected SuperNodes: in the run's first round once every listed owner is there (or
    min_owners when the wait ends), later ones at once (an owner that dropped out is not waited for)."""
    want = max(fed.min_owners, len(fed.owners)) if first else fed.min_owners
    deadline = time.monotonic() + min(fed.round_timeout_s, 600.0)
    nodes: list[int] = []
    while time.monotonic() < deadline:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= want:
            return nodes
        time.sleep(1.0)
    if len(nodes) >= fed.min_owners:
        return nodes
    raise FederatedError(f"only {len(nodes)} SuperNode(s) connected to the SuperLink, the federation needs "
                         f"min_owners={fed.min_owners}: start the owners' SuperNodes (flower-supernode "
                         f"--superlink ADDRESS --node-config 'owner=\"NAME\" data-file=\"FILE\"')")


def collect(grid: Grid, messages: list[Message], timeout_s: float) -> tuple[list[Message], list[str]]:
    """Replies to `messages` until each has one (or an error), its SuperNode went offline (the SuperLink marks a
    node offline after two missed heartbeats), or `timeout_s`; returns (good replies, what failed)."""
    ids = {mid: m.metadata.dst_node_id for mid, m in zip(grid.push_messages(messages), messages)}
    replies: dict[str, Message] = {}
    gone: set[str] = set()
    deadline = time.monotonic() + timeout_s
    while len(replies) + len(gone) < len(ids) and time.monotonic() < deadline:
        for reply in grid.pull_messages([m for m in ids if m not in replies]):
            replies[reply.metadata.reply_to_message_id] = reply
        online = set(grid.get_node_ids())
        gone = {m for m, node in ids.items() if m not in replies and node not in online}
        if len(replies) + len(gone) < len(ids):
            time.sleep(POLL_S)
    good, failed = [], []
    for mid, node in ids.items():
        reply = replies.get(mid)
        if reply is None:
            failed.append(f"node {node}: " + ("went offline (missed heartbeats) before replying" if mid in gone
                                              else f"no reply within round_timeout_s={timeout_s:g}"))
        elif reply.has_error():
            failed.append(f"node {node}: {reply.error.reason.strip().splitlines()[-1][:300]}")
        else:
            good.append(reply)
    return good, failed


def round_messages(nodes: list[int], tensors: dict[str, torch.Tensor], fed: FedConfig,
                   number: int) -> list[Message]:
    config = ConfigRecord({"round": number, "local-steps": fed.local_steps, "aggregation": fed.aggregation,
                           "training": json.dumps(fed.training)})
    return [Message(RecordDict({"adapter": ArrayRecord(tensors), "config": config}), dst_node_id=node,
                    message_type=MessageType.TRAIN, group_id=str(number)) for node in nodes]


def update_from(reply: Message, start: dict[str, torch.Tensor]) -> tuple[ClientUpdate, int]:
    """The owner's update (frozen tensors it did not send filled from the global ones) and its upload bytes."""
    record = reply.content["adapter"]
    tensors = {n: t.float() for n, t in record.to_torch_state_dict().items()}
    for name, value in start.items():
        tensors.setdefault(name, value)  # FFA: lora_A stays the global one (only B is sent)
    metrics = reply.content["metrics"]
    owner = str(reply.content["owner"]["owner"])
    return ClientUpdate(owner, tensors, int(metrics["num-examples"])), record.count_bytes()


def dp_report(fed: FedConfig, number: int) -> dict:
    """(epsilon, delta) of Flower's LocalDpMod per round and owner, and their basic composition over the rounds so
    far (k rounds: k epsilon, k delta); sensitivity = clip (one owner's whole update)."""
    dp = fed.dp
    sigma = dp.clip * math.sqrt(2 * math.log(1.25 / dp.delta)) / dp.epsilon
    return {"mechanism": "flwr LocalDpMod (Gaussian), owner-level", "epsilon_per_round": dp.epsilon,
            "delta_per_round": dp.delta, "clip": dp.clip, "noise_std": sigma, "epsilon_total": number * dp.epsilon,
            "delta_total": number * dp.delta}


def run_rounds(grid: Grid, fed: FedConfig) -> list[dict]:
    cfg = fed.training_config()
    check_federable(cfg, fed.aggregation)
    tensors, model, method = initial_tensors(cfg)
    expected = {n: t.shape for n, t in tensors.items()}
    done, folder = last_round(fed.output_dir) if fed.resume else (0, None)
    if folder is not None:
        resumed = load_round(folder)
        if {n: tuple(t.shape) for n, t in resumed.items()} != {n: tuple(t) for n, t in expected.items()}:
            raise FederatedError(f"{folder} holds another adapter than training: builds (other tensors or shapes): "
                                 f"resume with the federation's original method, rank and target modules, or start "
                                 f"a new output_dir")
        tensors = resumed
        print(f"[tunekit] resuming after round {done} from {folder}", flush=True)
    for number in range(done + 1, fed.rounds + 1):
        t0 = time.perf_counter()
        nodes = wait_for_owners(grid, fed, first=number == done + 1)
        messages = round_messages(nodes, tensors, fed, number)
        down = sum(m.content["adapter"].count_bytes() for m in messages)
        replies, failed = collect(grid, messages, fed.round_timeout_s)
        for line in failed:
            print(f"[tunekit] round {number}: left out {line}", flush=True)
        if len(replies) < fed.min_owners:
            raise FederatedError(f"round {number}: {len(replies)} owner(s) replied, min_owners is "
                                 f"{fed.min_owners}; failures: {'; '.join(failed) or 'none'}")
        pairs, kept = [], []
        for reply in replies:  # an owner whose adapter does not fit the server's is left out, with the reason
            update, sent = update_from(reply, tensors)
            try:
                check_updates([update], expected)
            except FederatedError as e:
                failed.append(str(e))
                print(f"[tunekit] round {number}: left out {e}", flush=True)
                continue
            pairs.append((update, sent))
            kept.append(reply)
        if len(pairs) < fed.min_owners:
            raise FederatedError(f"round {number}: {len(pairs)} owner(s) sent a usable adapter, min_owners is "
                                 f"{fed.min_owners}; failures: {'; '.join(failed)}")
        replies = kept
        updates = [u for u, _ in pairs]
        new = aggregate(updates, fed.aggregation, expected=expected, global_tensors=tensors)
        record = {
            "round": number, "aggregation": fed.aggregation,
            "owners": {u.owner: {"n_examples": u.n_examples,
                                 "train_loss": float(r.content["metrics"]["train-loss"])}
                       for u, r in zip(updates, replies)},
            "left_out": failed, "bytes_down": down, "bytes_up": sum(b for _, b in pairs),
            "product_bias": product_bias(updates, new), "wall_s": time.perf_counter() - t0,
            "dp": None if fed.dp is None else dp_report(fed, number),
        }
        tensors = {n: t.float() for n, t in new.items()}
        if fed.eval_file:  # the server's held-out file, with this round's adapter in the server's model
            copy_into_(trainable_tensors(model), tensors)
            record["eval_loss"] = eval_loss_on(cfg, model, method, fed.eval_file)
        save_round(fed.output_dir, number, tensors, record, lambda out: save_adapter(model, method, tensors, out))
        print(f"[tunekit] round {number}/{fed.rounds}: {len(updates)} owner(s), "
              f"{record['bytes_up'] / 1e6:.2f} MB up, {down / 1e6:.2f} MB down, {record['wall_s']:.1f} s"
              + (f", eval loss {record['eval_loss']:.4f}" if fed.eval_file else ""), flush=True)
    return history(fed.output_dir)


@app.main()
def main(grid: Grid, context: Context) -> None:
    fed = FedConfig.model_validate_json(str(context.run_config["fed-config"]))
    out = Path(fed.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "error.txt").unlink(missing_ok=True)
    try:
        rounds = run_rounds(grid, fed)
    except Exception as e:  # the launcher reads it: flwr run's exit code does not carry the ServerApp's error
        (out / "error.txt").write_text(f"{type(e).__name__}: {e}\n\n{traceback.format_exc()}")
        raise
    (out / "result.json").write_text(json.dumps({"rounds": rounds, "federation": fed.model_dump(mode="json")},
                                                indent=2))
