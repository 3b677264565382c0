"""The demo invoice task split across 3 data owners, non-IID by currency: centralized LoRA vs each owner alone vs
`tunekit federate` with each aggregation (and with local DP), exact match and eval loss per round, bytes per round.

    .venv/bin/python benchmarks/scale_out/federated_demo.py --phase all      # every phase in one process
    .venv/bin/python benchmarks/scale_out/federated_demo.py --phase data|central|alone|fedavg|ffa|svd|dp|eval|report

Owners: north = EUR invoices, south = USD, west = GBP and CHF (the train split of `write_demo_dataset`, by the
target's currency); the test set is `--n-test` invoices of all currencies. Same compute everywhere: each owner
trains `--local-steps` steps of `--batch` examples per round for `--rounds` rounds (federated or alone);
centralized trains rounds x local-steps steps of 3 x batch examples on the pooled files (the examples all three
owners saw, in one place). Every phase writes runs/fed-demo/<phase>.json, so phases can run as separate jobs;
`report` merges them into docs/scale-out-federated.json and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

OWNERS = {"north": ("EUR",), "south": ("USD",), "west": ("GBP", "CHF")}
AGGREGATIONS = {"fedavg": {"aggregation": "fedavg"}, "ffa": {"aggregation": "ffa"}, "svd": {"aggregation": "svd"}}


def training_tree(a) -> dict:
    return {"model": {"name": a.model},
            "data": {"val_fraction": 0.0, "max_length": 512, "packing": False},
            "method": {"name": "lora", "r": a.r, "alpha": 2.0 * a.r, "target_modules": "all-linear"},
            "optim": {"lr": a.lr, "schedule": "constant", "warmup_steps": 0, "max_grad_norm": 1.0},
            "train": {"batch_size": a.batch, "precision": "auto", "device": "cpu", "threads": a.threads,
                      "eval_every": 0, "save_every": 0, "energy": False, "pii": "off", "plan_check": False,
                      # Each owner's round is a fresh process: no Inductor compile paid again every round.
                      "compile": "off", "fused_ops": "off", "progress": False, "seed": 0}}


def write_data(a, root: Path) -> dict:
    from tunekit.demo.invoices import write_demo_dataset

    paths = write_demo_dataset(root / "data", n_train=a.n_train, n_test=a.n_test, seed=0)
    rows = [json.loads(x) for x in paths["train"].read_text().splitlines()]
    files = {}
    for owner, currencies in OWNERS.items():
        mine = [r for r in rows if json.loads(r["messages"][1]["content"])["currency"] in currencies]
        files[owner] = root / "data" / f"{owner}.jsonl"
        files[owner].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in mine))
    pooled = root / "data" / "pooled.jsonl"
    pooled.write_text("".join(files[o].read_text() for o in OWNERS))
    return {"owners": {o: {"currencies": list(c), "examples": sum(1 for _ in files[o].open())} for o, c in
                       OWNERS.items()}, "test": str(paths["test"]), "n_test": a.n_test}


def train_alone(a, root: Path, name: str, data: Path, steps: int, batch: int) -> dict:
    from tunekit.config import Config
    from tunekit.engine import train

    tree = training_tree(a)
    tree["data"]["train"] = str(data)
    tree["train"].update({"output_dir": str(root / name), "max_steps": steps, "batch_size": batch})
    t0 = time.perf_counter()
    r = train(Config.model_validate(tree))
    return {"adapter": str(root / name), "steps": steps, "batch": batch, "tokens": r.tokens_seen,
            "wall_s": time.perf_counter() - t0}


def run_federation(a, root: Path, name: str, extra: dict) -> dict:
    from tunekit.federated.config import load_fed_config
    from tunekit.federated.runtime import federate

    tree = {"output_dir": str(root / name), "rounds": a.rounds, "local_steps": a.local_steps, "min_owners": 3,
            "owners": [{"name": o, "data": str(root / "data" / f"{o}.jsonl")} for o in OWNERS],
            "training": training_tree(a), "resume": True, **extra}  # a cut-short job continues
    t0 = time.perf_counter()
    result = federate(load_fed_config(None, tree))
    return {"rounds": result["rounds"], "wall_s": time.perf_counter() - t0,
            "adapters": [str(root / name / "rounds" / f"round-{r['round']:04d}" / "adapter") for r in result["rounds"]]}


def eval_loss(model: str, adapter: str | None, test: str) -> float:
    """Mean cross-entropy per answer token of the test set (the engine's token weighting), bf16 merged model."""
    import torch

    from tunekit.config import DataConfig
    from tunekit.data import prepare_data
    from tunekit.inference import load_for_inference

    m, tok = load_for_inference(model, adapter, "cpu", dtype="bfloat16", merge=True)
    examples = prepare_data(DataConfig(train=test, val_fraction=0.0, max_length=512, packing=False), tok).train
    total, count = 0.0, 0
    with torch.no_grad():
        for ex in examples:
            ids = torch.tensor([ex.input_ids])
            logits = m(input_ids=ids).logits[0, :-1].float()  # (T-1, V): position t predicts token t+1
            targets = torch.tensor(ex.labels[1:])
            keep = targets != -100
            total += float(torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="sum"))
            count += int(keep.sum())
    return total / max(count, 1)


def score(a, adapter: str | None, test: str) -> dict:
    from tunekit.evaluate import evaluate_generation

    rep = evaluate_generation(test, model=a.model, adapter=adapter, batch_size=16, max_new_tokens=96,
                              limit=a.n_test, device="cpu", dtype="bfloat16")
    return {"exact_match": rep.scores["exact_match"], "json_valid": rep.scores["json_valid"],
            "eval_loss": eval_loss(a.model, adapter, test), "eval_s": rep.seconds}


def evaluate_all(a, root: Path) -> dict:
    """Every trained adapter on the same test set: the federations per round, the others at their end. Scores
    already in eval.json are kept and each new one is saved at once, so a job cut short continues in the next."""
    data = json.loads((root / "data.json").read_text())
    path = root / "eval.json"
    out = json.loads(path.read_text()) if path.exists() else {}
    todo = [("base", None)]
    for phase in ("central", "alone"):
        part = json.loads((root / f"{phase}.json").read_text()) if (root / f"{phase}.json").exists() else {}
        todo += [(name, run["adapter"]) for name, run in part.items()]
    for phase in (*AGGREGATIONS, "dp"):
        if (root / f"{phase}.json").exists():
            fed = json.loads((root / f"{phase}.json").read_text())
            todo += [(f"federated-{phase}/{k}", ad) for k, ad in enumerate(fed["adapters"])]
    for key, adapter in todo:
        name, _, k = key.partition("/")
        have = out.get(name)
        if (k and isinstance(have, list) and len(have) > int(k)) or (not k and have is not None):
            continue
        result = score(a, adapter, data["test"])
        if k:
            out.setdefault(name, []).append(result)
        else:
            out[name] = result
        path.write_text(json.dumps(out, indent=2))
        print(f"[fed-demo] eval {key}: exact match {result['exact_match']:.2f}, loss {result['eval_loss']:.4f}",
              flush=True)
    return out


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def report(a, root: Path) -> None:
    parts = {p.stem: json.loads(p.read_text()) for p in root.glob("*.json")}
    out = {"setting": vars(a), "cpu": f"{cpu_name()}, {os.cpu_count()} cores", **parts}
    docs = Path(a.docs)
    docs.parent.mkdir(parents=True, exist_ok=True)
    docs.with_suffix(".json").write_text(json.dumps(out, indent=2))
    ev = parts.get("eval", {})
    print("| run | exact match (per round) | eval loss (per round) | MB up per round |")
    print("|---|---|---|---|")
    for name, s in ev.items():
        rows = s if isinstance(s, list) else [s]
        fed = parts.get(name.replace("federated-", ""), {}) if name.startswith("federated-") else {}
        mb = " / ".join(f"{r['bytes_up'] / 1e6:.1f}" for r in fed.get("rounds", [])) or "-"
        em = " / ".join(f"{100 * r['exact_match']:.0f}%" for r in rows)
        loss = " / ".join(f"{r['eval_loss']:.3f}" for r in rows)
        print(f"| {name} | {em} | {loss} | {mb} |")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colors = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 3)
    for name, s in ev.items():
        color = next(colors)
        for ax, key in zip(axes, ("exact_match", "eval_loss")):
            if isinstance(s, list):  # a federation: one point per round
                ax.plot(range(1, len(s) + 1), [r[key] for r in s], marker="o", label=name, color=color)
            else:  # trained once with the same compute (or the base model): a line across
                ax.axhline(s[key], ls="--", lw=1, label=name, color=color)
    for ax, title in zip(axes, ("exact match on the test invoices", "eval loss (per answer token)")):
        ax.set_xlabel("round")
        ax.set_xticks(range(1, a.rounds + 1))
        ax.set_title(title)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"3 owners non-IID by currency, {a.rounds} rounds x {a.local_steps} local steps ({cpu_name()})",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(docs.with_suffix(".png"), dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--phase", default="all")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", default="runs/fed-demo")
    ap.add_argument("--docs", default="docs/scale-out-federated.json")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--local-steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n-train", type=int, default=600)
    ap.add_argument("--n-test", type=int, default=50)
    ap.add_argument("--dp-epsilon", type=float, default=1.0)
    ap.add_argument("--dp-clip", type=float, default=1e-3)
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = Path(a.out)
    root.mkdir(parents=True, exist_ok=True)
    phases = ["data", "central", "alone", *AGGREGATIONS, "dp", "eval", "report"] if a.phase == "all" else [a.phase]
    for phase in phases:
        t0 = time.perf_counter()
        if phase == "data":
            result = write_data(a, root)
        elif phase == "central":
            steps = a.rounds * a.local_steps
            result = {"central": train_alone(a, root, "central", root / "data" / "pooled.jsonl", steps, 3 * a.batch)}
        elif phase == "alone":
            result = {f"alone-{o}": train_alone(a, root, f"alone-{o}", root / "data" / f"{o}.jsonl",
                                                a.rounds * a.local_steps, a.batch) for o in OWNERS}
        elif phase in AGGREGATIONS:
            result = run_federation(a, root, f"fed-{phase}", AGGREGATIONS[phase])
        elif phase == "dp":
            result = run_federation(a, root, "fed-dp", {"aggregation": "svd", "dp": {
                "epsilon": a.dp_epsilon, "delta": 1e-5, "clip": a.dp_clip}})
        elif phase == "eval":
            result = evaluate_all(a, root)
        elif phase == "report":
            report(a, root)
            continue
        else:
            raise SystemExit(f"unknown phase {phase!r}")
        result_path = root / f"{phase}.json"
        result_path.write_text(json.dumps(result, indent=2))
        print(f"[fed-demo] {phase}: {time.perf_counter() - t0:.0f} s, load average {os.getloadavg()[0]:.2f}",
              flush=True)


if __name__ == "__main__":
    main()
