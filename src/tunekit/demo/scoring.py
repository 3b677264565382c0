"""Score model outputs on the demo extraction task: strict JSON parsing, exact match, per-field accuracy."""

from __future__ import annotations

import json
import math
import re

_FENCE = re.compile(r"^```(?:json)?\s*\n?(.*?)\n?```$", re.DOTALL)
_END_MARKERS = ("<|im_end|>", "<|endoftext|>")
PERCENT_COLUMNS = ("exact_match", "json_valid")
NUMBER_TOLERANCE = 1e-6


def parse_json_output(text: str) -> dict | None:
    """The JSON object in a model's output, or None.

    Tolerated: surrounding whitespace, trailing end-of-turn markers (`<|im_end|>`), and one ```json
    (or bare ```) fence around the object. Anything else (prose around the object, a list, invalid
    JSON) gives None.
    """
    text = text.strip()
    stripped = True
    while stripped:  # markers may repeat or follow each other: "...}<|im_end|>\n<|endoftext|>"
        stripped = False
        for marker in _END_MARKERS:
            if text.endswith(marker):
                text, stripped = text[: -len(marker)].rstrip(), True
    fence = _FENCE.match(text)
    if fence:
        text = fence.group(1).strip()
    try:
        obj = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None


def values_equal(a: object, b: object) -> bool:
    """Equality of parsed JSON values; numbers compare as floats within 1e-6, "12.5" != 12.5."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=0.0, abs_tol=NUMBER_TOLERANCE)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(values_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(values_equal(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def score_predictions(predictions: list[str], references: list[str]) -> dict:
    """exact_match, json_valid, field_accuracy (per reference key) and n over paired outputs.

    A prediction matches exactly when it parses and equals its reference as a dict: same keys (any
    order), equal values. A field counts as correct when the parsed prediction has that key with an
    equal value; an unparseable prediction gets every field wrong.
    """
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions for {len(references)} references; "
                         "pass one prediction per reference")
    refs = []
    for i, ref in enumerate(references):
        parsed = parse_json_output(ref)
        if parsed is None:
            raise ValueError(f"reference {i} is not a JSON object: {ref[:80]!r}")
        refs.append(parsed)
    keys = list(dict.fromkeys(k for ref in refs for k in ref))
    n = len(refs)
    exact = valid = 0
    correct = {k: 0 for k in keys}
    for pred_text, ref in zip(predictions, refs):
        pred = parse_json_output(pred_text)
        if pred is None:
            continue
        valid += 1
        exact += values_equal(pred, ref)
        for k in ref:
            correct[k] += k in pred and values_equal(pred[k], ref[k])
    totals = {k: sum(k in ref for ref in refs) for k in keys}
    return {"exact_match": exact / n if n else 0.0, "json_valid": valid / n if n else 0.0,
            "field_accuracy": {k: correct[k] / totals[k] for k in keys}, "n": n}


def paired_exact_test(reference: list[bool], other: list[bool]) -> tuple[int, int, float]:
    """McNemar's exact test of two models scored on the same examples: (examples only `other` gets right, examples
    only `reference` gets right, two-sided p-value). Examples both get right or both miss say nothing about which is
    better; under "equally good" each of the n discordant ones goes either way with probability 1/2, so
    p = min(1, 2 P(Binomial(n, 1/2) <= min(wins, losses)))."""
    if len(reference) != len(other):
        raise ValueError(f"paired test needs the same examples: {len(reference)} vs {len(other)} scores")
    wins = sum(1 for r, o in zip(reference, other) if o and not r)
    losses = sum(1 for r, o in zip(reference, other) if r and not o)
    n = wins + losses
    tail = sum(math.comb(n, k) for k in range(min(wins, losses) + 1)) / 2**n
    return wins, losses, min(1.0, 2 * tail)


def _cell(column: str, value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if column.endswith("%") or column in PERCENT_COLUMNS:
            return f"{100 * value:.1f}%"
        return f"{value:.4g}"
    return str(value)


def markdown_table(rows: list[dict], columns: list[str], cell) -> str:
    """A Markdown table; `cell(column, value)` formats each value (value None for a missing key)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(c, r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def format_table(rows: list[dict], columns: list[str]) -> str:
    """A plain-text table: header, a dashed separator, one line per row.

    Floats in a column named "...%" or exact_match/json_valid are fractions shown as percentages
    (0.93 -> "93.0%"); other floats use 4 significant digits; None shows "-", a missing key "".
    Numbers are right-aligned, everything else left-aligned.
    """
    cells = [[_cell(c, row.get(c, "")) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    numeric = [any(isinstance(row.get(c), (int, float)) and not isinstance(row.get(c), bool)
                   for row in rows) for c in columns]

    def line(values: list[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w)
                         for v, w, num in zip(values, widths, numeric)).rstrip()

    return "\n".join([line(list(columns)), line(["-" * w for w in widths])] + [line(r) for r in cells])
