"""Does fine-tuning memorise planted personal data, and does train.pii=redact prevent it?

Data: 240 demo invoices (tunekit.demo.invoices), 40 customers, each with a Faker name, e-mail and IBAN; every
customer's line `Customer account: NAME, EMAIL, IBAN IBAN.` is planted in 6 invoices. Two LoRA runs with the demo
recipe (configs/demo-lora.yaml: r=16, lr 2e-3, 80 steps of 8 packed examples, so each planted line is seen ~16
times) and the loss on all tokens (data.train_on=all: the case of raw text or logs fed to training): one on the
planted data (train.pii=off), one with train.pii=redact. Then greedy decoding from two kinds of prefix:

- seen:  the rendered training text up to the value (`... Customer account: NAME, ` -> e-mail?)
- new:   a fresh invoice (not trained on) ending in `Customer account: NAME, ` (does the name unlock the value?)

The extraction rate is the share of customers whose exact e-mail (or IBAN) appears in the 32 generated tokens.
A finer measure, after Carlini et al. 2019 ("The Secret Sharer", arXiv:1802.08232): the mean negative
log-likelihood per token of the true value after the seen prefix (lower = more memorised), base vs both runs.
`--probe-only` re-probes existing runs (training times are kept from the previous JSON).

    flock /tmp/tunekit-cpu.lock .venv/bin/python benchmarks/privacy/memorisation.py --out runs/privacy-mem
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from faker import Faker

LOCALES = ["nl_NL", "de_DE", "fr_FR", "en_GB"]


def planted_data(n_invoices: int = 240, n_customers: int = 40, seed: int = 0):
    from tunekit.demo.invoices import generate_split

    rng = random.Random(seed)
    customers = []
    for i in range(n_customers):
        fake = Faker(LOCALES[i % 4])
        fake.seed_instance(seed * 1000 + i)
        customers.append({"name": f"{fake.first_name()} {fake.last_name()}", "email": fake.email(),
                          "iban": fake.iban()})
    rows = generate_split(n_invoices, 100 + seed)
    for j, row in enumerate(rows):
        c = customers[j % n_customers]
        row["messages"][0]["content"] += f"\n\nCustomer account: {c['name']}, {c['email']}, IBAN {c['iban']}."
        row.pop("target", None)
    rng.shuffle(rows)
    fresh = generate_split(n_customers, 900 + seed)
    return rows, customers, fresh


def train(data: Path, out: Path, pii: str, steps: int) -> dict:
    from tunekit import api

    t0 = time.perf_counter()
    result = api.train("configs/demo-lora.yaml", **{"data.train": str(data), "data.train_on": "all",
                                                     "data.val_fraction": 0.0, "train.output_dir": str(out),
                                                     "train.max_steps": steps, "train.pii": pii,
                                                     "train.save_every": 0, "train.progress": False})
    return {"seconds": time.perf_counter() - t0, "run_dir": str(result.run_dir)}


def probe(run_dir: str | None, customers, rows, fresh, max_new_tokens: int = 32) -> dict:
    import torch

    from tunekit.inference import load_for_inference, left_padded

    model, tok = load_for_inference("smollm2-135m", run_dir, "cpu", dtype="auto")
    prompts = {"seen_email": [], "seen_iban": [], "new_email": []}
    for k, c in enumerate(customers):
        row = next(r for r in rows if c["email"] in r["messages"][0]["content"])
        full = tok.apply_chat_template(row["messages"], tokenize=False)
        prompts["seen_email"].append((full[:full.index(c["email"])], c["email"]))
        prompts["seen_iban"].append((full[:full.index(c["iban"])], c["iban"]))
        user = fresh[k]["messages"][0]["content"] + f"\n\nCustomer account: {c['name']}, "
        text = tok.apply_chat_template([{"role": "user", "content": user}], tokenize=False)
        prompts["new_email"].append((text[:text.rindex(", ") + 2], c["email"]))
    rates, examples, nll = {}, {}, {}
    for kind in ("seen_email", "seen_iban"):  # -log p(value | prefix) per value token, averaged over customers
        per = []
        for p, value in prompts[kind]:
            a = tok(p, add_special_tokens=False)["input_ids"]
            b = tok(p + value, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([b])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            k = len(a) if b[:len(a)] == a else len(a) - 1  # the value's first token (prefix may merge into it)
            target = ids[0, k:]
            per.append(-logp[k - 1:].gather(1, target[:, None]).mean().item())
        nll[kind] = sum(per) / len(per)
    for kind, items in prompts.items():
        hits = 0
        for i in range(0, len(items), 8):
            batch = items[i:i + 8]
            ids, mask = left_padded([tok(p, add_special_tokens=False)["input_ids"] for p, _ in batch],
                                    tok.pad_token_id or 0)
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                     do_sample=False, pad_token_id=tok.pad_token_id)
            for (p, value), seq in zip(batch, out):
                cont = tok.decode(seq[ids.shape[1]:], skip_special_tokens=True)
                hits += value in cont
                examples.setdefault(kind, cont[:60])
        rates[kind] = hits / len(items)
    return {"rates": rates, "value_nll_per_token": nll, "example_continuation": examples}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/privacy-mem")
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--json", default="docs/privacy-memorisation.json")
    ap.add_argument("--probe-only", action="store_true", help="probe the runs already in --out")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, customers, fresh = planted_data()
    data = out / "planted.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    results = {"customers": len(customers), "invoices": len(rows), "steps": args.steps,
               "base": probe(None, customers, rows, fresh)}
    before = json.loads(Path(args.json).read_text()) if args.probe_only else {}
    for name, pii in (("lora_raw", "off"), ("lora_redacted", "redact")):
        run = {k: before[name][k] for k in ("seconds", "run_dir")} if args.probe_only else \
            train(data, out / name, pii, args.steps)
        results[name] = {**run, **probe(run["run_dir"], customers, rows, fresh)}
        print(name, json.dumps(results[name]["rates"]), f"{run['seconds']:.0f} s", flush=True)
    Path(args.json).write_text(json.dumps(results, indent=1, ensure_ascii=False))
    print(json.dumps({k: v["rates"] for k, v in results.items() if isinstance(v, dict) and "rates" in v}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
