"""Precision and recall of the redactor per entity type and language on the labelled corpus (corpus.py).

A gold span counts as found when predictions of the same type cover every letter and digit of it (a partial hit
still leaks the rest, so it is a miss). A prediction counts as correct when it overlaps a gold span of its type.
`leaked` counts gold spans that no prediction of any type covers (what a redacted log would still hold).
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path

from .redactor import ENTITIES, Redactor

GOALS = {"IBAN_CODE": 0.99, "CREDIT_CARD": 0.99, "EMAIL_ADDRESS": 0.95, "IP_ADDRESS": 0.95, "PHONE_NUMBER": 0.95}


def _covered(text: str, span: dict, preds) -> bool:
    need = {i for i in range(span["start"], span["end"]) if text[i].isalnum()}
    for p in preds:
        need -= set(range(p.start, p.end))
    return not need


def score(rows: list[dict], redactor: Redactor) -> dict:
    """{"by": {lang: {entity: {tp, fn, fp, precision, recall, leaked}}}, "all": {entity: ...}, "negatives": ...}."""
    counts = defaultdict(lambda: defaultdict(lambda: {"tp": 0, "fn": 0, "fp": 0, "pred": 0, "pred_ok": 0,
                                                       "leaked": 0}))
    neg_hits = defaultdict(int)
    misses = []
    t0 = time.perf_counter()
    for row in rows:
        preds = redactor.find(row["text"], row["lang"])
        for lang in (row["lang"], "all"):
            for s in row["spans"]:
                c = counts[lang][s["entity"]]
                same = [p for p in preds if p.entity == s["entity"]]
                ok = _covered(row["text"], s, same)
                c["tp" if ok else "fn"] += 1
                c["leaked"] += not _covered(row["text"], s, preds)
                if not ok and lang == "all":
                    misses.append({"id": row["id"], "entity": s["entity"], "value": s["value"],
                                   "found": [(p.entity, p.text) for p in preds]})
            for p in preds:
                c = counts[lang][p.entity]
                c["pred"] += 1
                hit = any(s["entity"] == p.entity and p.start < s["end"] and s["start"] < p.end for s in row["spans"])
                c["pred_ok"] += hit
                c["fp"] += not hit
        if row["kind"] == "negative":
            neg_hits[row["lang"]] += bool(preds)
    seconds = time.perf_counter() - t0
    out = {}
    for lang, ents in counts.items():
        out[lang] = {}
        for ent in ENTITIES:
            c = ents.get(ent)
            if not c:
                continue
            gold = c["tp"] + c["fn"]
            out[lang][ent] = {**c, "gold": gold, "recall": c["tp"] / gold if gold else None,
                              "precision": c["pred_ok"] / c["pred"] if c["pred"] else None}
    negatives = {lang: {"strings": sum(r["kind"] == "negative" and r["lang"] == lang for r in rows),
                        "with_a_finding": neg_hits[lang]} for lang in sorted({r["lang"] for r in rows})}
    return {"by": out, "negatives": negatives, "strings": len(rows), "seconds": seconds,
            "ms_per_string": 1000 * seconds / max(1, len(rows)), "misses": misses[:200]}


class PresidioDefaults:
    """The baseline: Presidio's own recognizers (predefined registry) with the same small English spaCy model,
    English only, asked for the same entity types."""

    def __init__(self):
        from presidio_analyzer import AnalyzerEngine

        from .redactor import _nlp_engine

        self.analyzer = AnalyzerEngine(nlp_engine=_nlp_engine(("en",)), supported_languages=["en"])

    def find(self, text: str, language: str | None = None):
        from .redactor import Finding

        found = self.analyzer.analyze(text, language="en", entities=list(ENTITIES), score_threshold=0.35)
        return [Finding(r.entity_type, r.start, r.end, r.score, text[r.start:r.end]) for r in found]


def _f(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def table(result: dict, langs=("en", "nl", "fr", "de", "all")) -> str:
    """Markdown: one row per entity type, P / R per language."""
    head = "| entity | " + " | ".join(f"{lang} P / R" for lang in langs) + " | goal (R) |"
    lines = [head, "|" + "---|" * (len(langs) + 2)]
    for ent in ENTITIES:
        cells = []
        for lang in langs:
            c = result["by"].get(lang, {}).get(ent)
            cells.append(f"{_f(c['precision'])} / {_f(c['recall'])} (n={c['gold']})" if c else "-")
        goal = GOALS.get(ent, 0.90 if ent == "PERSON" else None)
        lines.append(f"| {ent} | " + " | ".join(cells) + f" | {goal if goal else '-'}{' (en)' if ent == 'PERSON' else ''} |")
    neg = result["negatives"]
    lines.append("")
    lines.append("hard negatives with any finding: " + ", ".join(f"{lang} {v['with_a_finding']}/{v['strings']}"
                                                                 for lang, v in neg.items()))
    return "\n".join(lines)


def plot(results: dict[str, dict], path: str | Path) -> None:
    """Recall per entity type and language, one panel per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    langs = ["en", "nl", "fr", "de"]
    results = {k: v for k, v in results.items() if not k.startswith("names-")}
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, (name, res) in zip(axes[0], results.items()):
        x = np.arange(len(ENTITIES))
        for k, lang in enumerate(langs):
            vals = [(res["by"].get(lang, {}).get(e) or {}).get("recall") or 0 for e in ENTITIES]
            ax.bar(x + (k - 1.5) * 0.2, vals, 0.2, label=lang)
        ax.set_xticks(x, [e.replace("_ADDRESS", "").replace("_NUMBER", "").replace("_CODE", "") for e in ENTITIES],
                      rotation=20)
        ax.set_ylim(0, 1.05)
        ax.set_title(f"recall: {name}")
        ax.axhline(0.95, color="grey", lw=0.6, ls="--")
    axes[0][0].legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    import argparse

    from .corpus import generate, generate_heldout_names, write_jsonl

    ap = argparse.ArgumentParser(prog="python -m tunekit.privacy.evaluate")
    ap.add_argument("--n-per-language", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="docs/privacy-eval")
    ap.add_argument("--corpus", default="benchmarks/privacy/corpus.jsonl", help="where the generated corpus goes")
    ap.add_argument("--configs", nargs="*", default=["auto", "auto-holdout", "spacy", "lexicon", "presidio-defaults"])
    ap.add_argument("--heldout-names", type=int, default=240, help="nl/de strings per language and split with names "
                    "unknown to the lists (corpus.generate_heldout_names; 0: skip)")
    args = ap.parse_args(argv)
    rows = generate(args.n_per_language, args.seed)
    write_jsonl(rows, Path(args.corpus))
    results = {}
    for name in args.configs:
        names, holdout = name.replace("-holdout", ""), name.endswith("-holdout")
        if name == "presidio-defaults":
            res = score([r for r in rows if r["lang"] == "en"], PresidioDefaults())
        else:
            res = score(rows, Redactor(names=names, holdout=holdout))
        results[name] = res
        print(f"\n## names={name}  ({res['strings']} strings, {res['ms_per_string']:.1f} ms/string)\n")
        print(table(res))
    if args.heldout_names:
        red = Redactor()
        for split, seed in (("dev", 1), ("test", 2)):  # dev: the name rules were tuned on it; test: never
            res = score(generate_heldout_names(args.heldout_names, seed, split), red)
            results[f"names-{split}"] = res
            print(f"\n## unknown names, {split} ({res['strings']} nl/de strings)\n")
            print(table(res, langs=("nl", "de", "all")))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(results, indent=1, ensure_ascii=False))
    plot(results, args.out + ".png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
