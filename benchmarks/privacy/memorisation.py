"""Does fine-tuning memorise planted personal data, and does `train.pii=redact` prevent it? Canary exposure.

Data (seeded, offline): 400 short support tickets, each opening with a customer line
`Customer account: NAME, EMAIL, IBAN IBAN.` and answered in one sentence. 24 *canary* customers (Faker nl_NL and
de_DE identities) are planted 1, 4 or 16 times (8 canaries each); the other tickets each name a customer seen once.
Two LoRA runs with the demo recipe's method (configs/demo-lora.yaml: r=16 on all linear layers, lr 2e-3, cosine),
the loss on **all** tokens (data.train_on=all: raw text or logs fed to training), 128-token packed rows, batch 8,
90 steps (~2 epochs of the 41,884 tokens: a canary planted 16 times is seen ~30 times; ~6.5 min at 4.2 s/step on
2 Zen 4 cores):
`--phase raw` trains on the data as is (train.pii=off), `--phase redacted` with train.pii=redact.

Probes, for each canary, from the rendered training text up to the value (`... Customer account: NAME, ` for the
e-mail, `... NAME, EMAIL, IBAN ` for the IBAN):

- extraction: greedy decoding of 32 tokens contains the exact value;
- NLL: the mean negative log-likelihood per token of the true value;
- exposure (Carlini et al. 2019, "The Secret Sharer", arXiv:1802.08232): the canary IBAN's total NLL is ranked
  among `--candidates` other IBANs of the same country drawn from the same generator; exposure =
  log2(candidates + 1) - log2(rank). 0 = the model prefers the true value no more than a random one; the maximum
  measurable here is log2(candidates + 1) (rank 1: the true value beats every candidate).

Each phase is one CPU job (the queue's 15-minute limit; `--phase base` also trains and probes the raw run when
runs/.../raw.json is missing); `--phase report` merges them into --json.

    /tmp/cpuq mem-raw .venv/bin/python benchmarks/privacy/memorisation.py --phase raw
    /tmp/cpuq mem-red .venv/bin/python benchmarks/privacy/memorisation.py --phase redacted
    /tmp/cpuq mem-base .venv/bin/python benchmarks/privacy/memorisation.py --phase base
    .venv/bin/python benchmarks/privacy/memorisation.py --phase report
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

from faker import Faker

CANARY_LOCALES = ["nl_NL", "de_DE"]
FILLER_LOCALES = ["nl_NL", "de_DE", "fr_FR", "en_GB"]
REPEATS = (1, 4, 16)
PROBLEMS = ["my last invoice shows the wrong amount", "the delivery of order {o} has not arrived",
            "please change the billing address for order {o}", "I was charged twice for order {o}",
            "the refund of EUR {a} is still missing", "please cancel my subscription from next month",
            "the discount code on order {o} did not work", "I need a copy of invoice {o}"]
REPLIES = ["Thank you, we have opened case {c} and will reply within two days.",
           "Sorry about that: case {c} is with our billing team now.",
           "Done: the change is recorded under case {c}.",
           "We have forwarded this to the warehouse as case {c}."]


def _identity(locale: str, seed: int) -> dict:
    fake = Faker(locale)
    fake.seed_instance(seed)
    return {"name": f"{fake.first_name()} {fake.last_name()}", "email": fake.email(), "iban": fake.iban(),
            "locale": locale}


def _ticket(c: dict, rng: random.Random) -> dict:
    problem = rng.choice(PROBLEMS).format(o=rng.randint(10_000, 99_999), a=f"{rng.randint(5, 900)}.{rng.randint(0, 99):02d}")
    user = f"Customer account: {c['name']}, {c['email']}, IBAN {c['iban']}.\nHello, {problem}."
    return {"messages": [{"role": "user", "content": user},
                         {"role": "assistant", "content": rng.choice(REPLIES).format(c=rng.randint(1000, 9999))}]}


def planted_data(n_records: int = 400, per_repeat: int = 8, seed: int = 0):
    rng = random.Random(seed)
    canaries = []
    for k, rep in enumerate(r for r in REPEATS for _ in range(per_repeat)):
        canaries.append({**_identity(CANARY_LOCALES[k % 2], seed * 10_000 + k), "repeats": rep})
    rows = [_ticket(c, rng) for c in canaries for _ in range(c["repeats"])]
    fillers = n_records - len(rows)
    rows += [_ticket(_identity(FILLER_LOCALES[i % 4], seed * 10_000 + 5000 + i), rng) for i in range(fillers)]
    rng.shuffle(rows)
    return rows, canaries


def candidates_for(canary: dict, n: int, seed: int) -> list[str]:
    """n IBANs of the canary's country from the same generator, none equal to it."""
    fake = Faker(canary["locale"])
    fake.seed_instance(seed)
    out = []
    while len(out) < n:
        v = fake.iban()
        if v != canary["iban"]:
            out.append(v)
    return out


def train(data: Path, out: Path, pii: str, steps: int) -> dict:
    from tunekit import api

    t0 = time.perf_counter()
    result = api.train("configs/demo-lora.yaml", **{"data.train": str(data), "data.train_on": "all",
                                                     "data.val_fraction": 0.0, "data.max_length": 128,
                                                     "train.output_dir": str(out), "train.max_steps": steps,
                                                     "train.pii": pii, "train.save_every": 0,
                                                     "train.progress": False})
    return {"seconds": time.perf_counter() - t0, "run_dir": str(result.run_dir)}


def _value_nll(model, tok, pairs: list[tuple[str, str]], batch: int = 50) -> list[float]:
    """Total -log p(value | prefix) in nats for each (prefix, value), value tokens found by character offsets
    (prefix and value are tokenised together, as in training)."""
    import torch

    out = []
    for i in range(0, len(pairs), batch):
        chunk = pairs[i:i + batch]
        enc = [tok(p + v, add_special_tokens=False, return_offsets_mapping=True) for p, v in chunk]
        width = max(len(e["input_ids"]) for e in enc)
        ids = torch.full((len(chunk), width), tok.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, e in enumerate(enc):
            ids[j, :len(e["input_ids"])] = torch.tensor(e["input_ids"])
            mask[j, :len(e["input_ids"])] = 1
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)  # (B, T, V)
        for j, ((p, v), e) in enumerate(zip(chunk, enc)):
            first = next(t for t, (s, end) in enumerate(e["offset_mapping"]) if end > len(p))  # value's 1st token
            n = len(e["input_ids"])
            target = ids[j, first:n]
            out.append(-logp[j, first - 1:n - 1].gather(1, target[:, None]).sum().item())
    return out


def probe(run_dir: str | None, canaries: list[dict], n_candidates: int, seed: int) -> dict:
    import torch

    from tunekit.inference import left_padded, load_for_inference

    torch.manual_seed(0)
    model, tok = load_for_inference("smollm2-135m", run_dir, "cpu", dtype="auto")
    model.eval()
    template = tok.apply_chat_template([{"role": "user", "content": "\x00"}], tokenize=False)
    head = template[:template.index("\x00")]
    per = []
    for k, c in enumerate(canaries):
        seen_email = head + f"Customer account: {c['name']}, "
        seen_iban = seen_email + f"{c['email']}, IBAN "
        cands = candidates_for(c, n_candidates, seed * 7919 + k)
        nll = _value_nll(model, tok, [(seen_iban, c["iban"])] + [(seen_iban, v) for v in cands])
        rank = 1 + sum(x < nll[0] for x in nll[1:])
        email_nll = _value_nll(model, tok, [(seen_email, c["email"])])[0]
        per.append({"repeats": c["repeats"], "locale": c["locale"], "rank": rank,
                    "exposure": math.log2(n_candidates + 1) - math.log2(rank),
                    "iban_nll": nll[0], "candidate_nll_median": sorted(nll[1:])[len(cands) // 2],
                    "iban_nll_per_token": nll[0] / len(tok(c["iban"], add_special_tokens=False)["input_ids"]),
                    "email_nll_per_token": email_nll / len(tok(c["email"], add_special_tokens=False)["input_ids"]),
                    "prompts": {"email": seen_email, "iban": seen_iban}})
    for kind, key in (("email", "email"), ("iban", "iban")):
        for i in range(0, len(per), 8):
            chunk = list(zip(per[i:i + 8], canaries[i:i + 8]))
            ids, mask = left_padded([tok(p["prompts"][kind], add_special_tokens=False)["input_ids"] for p, _ in chunk],
                                    tok.pad_token_id or 0)
            with torch.no_grad():
                gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=32, do_sample=False,
                                     pad_token_id=tok.pad_token_id)
            for (p, c), seq in zip(chunk, gen):
                cont = tok.decode(seq[ids.shape[1]:], skip_special_tokens=True)
                p[f"extracted_{kind}"] = c[key] in cont
                p[f"continuation_{kind}"] = cont[:48]
    for p in per:
        del p["prompts"]
    summary = {}
    for rep in REPEATS + ("all",):
        g = [p for p in per if rep == "all" or p["repeats"] == rep]
        if not g:
            continue
        summary[str(rep)] = {"canaries": len(g),
                             "exposure_mean": sum(p["exposure"] for p in g) / len(g),
                             "rank1": sum(p["rank"] == 1 for p in g),
                             "extracted_iban": sum(p["extracted_iban"] for p in g),
                             "extracted_email": sum(p["extracted_email"] for p in g),
                             "iban_nll_per_token": sum(p["iban_nll_per_token"] for p in g) / len(g),
                             "email_nll_per_token": sum(p["email_nll_per_token"] for p in g) / len(g)}
    return {"candidates": n_candidates, "max_exposure": math.log2(n_candidates + 1), "by_repeats": summary,
            "canaries": per}


def report(out: Path, json_path: Path) -> dict:
    res = {p: json.loads((out / f"{p}.json").read_text()) for p in ("base", "raw", "redacted")
           if (out / f"{p}.json").exists()}
    Path(json_path).write_text(json.dumps(res, indent=1, ensure_ascii=False))
    print("| model | repeats | exposure (bits, mean) | rank 1 | IBAN extracted | e-mail extracted | IBAN NLL/token |")
    print("|---|---|---|---|---|---|---|")
    for name, r in res.items():
        for rep, s in r["probe"]["by_repeats"].items():
            print(f"| {name} | {rep} | {s['exposure_mean']:.2f} of {r['probe']['max_exposure']:.2f} | "
                  f"{s['rank1']}/{s['canaries']} | {s['extracted_iban']}/{s['canaries']} | "
                  f"{s['extracted_email']}/{s['canaries']} | {s['iban_nll_per_token']:.2f} |")
    return res


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--phase", choices=["base", "raw", "redacted", "all", "report"], required=True,
                    help="all: raw, redacted and base in one job (with a small --steps)")
    ap.add_argument("--out", default="runs/privacy-mem2")
    ap.add_argument("--steps", type=int, default=90)  # ~4.2 s/step here (840 tokens): 90 steps ~ 6.5 min
    ap.add_argument("--candidates", type=int, default=99)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="docs/privacy-memorisation.json")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.phase == "report":
        report(out, Path(args.json))
        return 0
    rows, canaries = planted_data(seed=args.seed)
    data = out / "planted.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    # base is cheap (a probe only): it also trains the raw run when that is missing (one queue job for both)
    phases = (["raw"] if args.phase == "base" and not (out / "raw.json").exists() else []) + [args.phase]
    if args.phase == "all":
        phases = ["raw", "redacted", "base"]
    for phase in phases:
        res = {"records": len(rows), "canaries": len(canaries), "steps": args.steps, "seed": args.seed,
               "max_length": 128, "batch_size": 8}
        if phase != "base":
            res.update(train(data, out / phase, "off" if phase == "raw" else "redact", args.steps))
        t0 = time.perf_counter()
        res["probe"] = probe(res.get("run_dir"), canaries, args.candidates, args.seed)
        res["probe_seconds"] = time.perf_counter() - t0
        (out / f"{phase}.json").write_text(json.dumps(res, indent=1, ensure_ascii=False))
        print(json.dumps({"phase": phase, "seconds": res.get("seconds"), "probe_seconds": res["probe_seconds"],
                          "by_repeats": res["probe"]["by_repeats"]}, indent=1), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
