"""A knowledge task whose facts live in documents: product sheets (price, warranty, return window, support
contact, launch date) and questions about them, for the LoRA vs RAG vs both study (benchmarks/rag/lora_vs_rag.py).

Pure stdlib and seeded. Every product has one Markdown sheet; every fact is asked in a train phrasing and a
different test phrasing, so a LoRA trained on the train questions is tested on questions it has not seen, about
facts it has. `changed_sheets` rewrites a share of the facts (new prices, warranties, ...) for the "facts change
after training" step.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

_HEADS = ("Arvo Brisa Corvel Dalto Enzo Fjord Galen Helix Istra Juno Kairo Lumen Mistral Nordo Orla Pavo Quill "
          "Rhea Solva Tarn Ulmo Vela Wren Xilo Yara Zeno").split()
_KINDS = ("laptop|router|headset|monitor|drill|coffee machine|e-bike|tablet|printer|speaker|camera|keyboard|"
          "vacuum robot|smartwatch|projector").split("|")
_CONTACT_TEAMS = ("support", "help", "service", "care", "desk")
_MONTHS = "January February March April May June July August September October November December".split()

FACTS = {  # fact -> (train question, test question)
    "price": ("How much does the {name} cost?", "What is the price of the {name}?"),
    "warranty": ("How long is the warranty on the {name}?", "For how many months is the {name} covered by "
                 "warranty?"),
    "returns": ("Within how many days can the {name} be returned?", "What is the return window for the {name}?"),
    "contact": ("Which e-mail address handles support for the {name}?", "Whom do I e-mail about a problem with "
                "the {name}?"),
    "launch": ("When was the {name} launched?", "What is the launch date of the {name}?"),
}


def _facts(rng: random.Random) -> dict:
    return {"price": f"{rng.randrange(49, 2400)}.{rng.choice(['00', '50', '90', '99'])} EUR",
            "warranty": f"{rng.choice([6, 12, 18, 24, 36, 48, 60])} months",
            "returns": f"{rng.choice([14, 21, 30, 45, 60, 90])} days",
            "contact": None,
            "launch": f"{rng.randrange(1, 29)} {rng.choice(_MONTHS)} {rng.randrange(2019, 2027)}"}


def products(n: int = 60, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    names = rng.sample([f"{h} {k.title()} {rng.randrange(100, 999)}" for h in _HEADS for k in _KINDS], n)
    out = []
    for name in names:
        facts = _facts(rng)
        slug = name.lower().replace(" ", "-")
        facts["contact"] = f"{rng.choice(_CONTACT_TEAMS)}-{slug.split('-')[0]}{rng.randrange(10, 99)}@example.com"
        out.append({"name": name, "slug": slug, "facts": facts})
    return out


def sheet(product: dict) -> str:
    """The product's Markdown sheet: the facts in prose under headings, with distractor numbers."""
    f, name = product["facts"], product["name"]
    hotline = f"+49 30 5550 {sum(map(ord, name)) * 37 % 9000 + 1000}"  # a distractor number, seeded by the name
    return (f"# {name}\n\n## Price and availability\n\nThe {name} is sold at {f['price']} including VAT. It ships "
            f"in 2 to 4 working days; orders above 10 units get a volume quote.\n\n## Warranty and returns\n\n"
            f"The {name} comes with a warranty of {f['warranty']} from the date of delivery. Unused units can be "
            f"returned within {f['returns']} for a full refund.\n\n## Support\n\nQuestions and repairs: write to "
            f"{f['contact']}. The hotline {hotline} answers on working days.\n\n"
            f"## History\n\nThe {name} was launched on {f['launch']}.\n")


def write_sheets(items: list[dict], folder: str | Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for p in items:
        (folder / f"{p['slug']}.md").write_text(sheet(p), encoding="utf-8")
    return folder


def questions(items: list[dict], split: str) -> list[dict]:
    """{"question", "answer", "source", "fact"} for every product x fact, in the train or test phrasing."""
    col = 0 if split == "train" else 1
    return [{"question": FACTS[fact][col].format(name=p["name"]), "answer": p["facts"][fact], "source": p["slug"],
             "fact": fact} for p in items for fact in FACTS]


def changed(items: list[dict], share: float = 0.3, seed: int = 1) -> tuple[list[dict], set[tuple[str, str]]]:
    """A copy where a share of the (product, fact) pairs got a new value; and the set of the pairs changed."""
    rng = random.Random(seed)
    out, moved = json.loads(json.dumps(items)), set()
    for p in out:
        for fact in FACTS:
            if fact != "contact" and rng.random() < share:
                new = _facts(rng)[fact]
                if new != p["facts"][fact]:
                    p["facts"][fact] = new
                    moved.add((p["slug"], fact))
    return out, moved


def normalised_match(prediction: str, answer: str) -> bool:
    """The gold value appears in the prediction (case, spaces and a trailing '.00' aside)."""
    def norm(s: str) -> str:
        return " ".join(s.lower().replace(",", "").replace(".00 ", " ").split())

    return norm(answer) in norm(prediction) or norm(answer.replace(".00 EUR", " EUR")) in norm(prediction)
