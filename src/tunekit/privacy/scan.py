"""Personal data in training files: `tunekit data scan`, `tunekit data redact`, and `train.pii` before training.

Every string in a record is looked at, nested ones included (`messages[2].content`); a finding is reported by
file, line and field with its value masked (`j******************l`), never in full.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    from .redactor import Redactor

from .errors import PrivacyError


@dataclass
class ScanReport:
    file: str
    records: int = 0
    strings: int = 0
    counts: Counter = field(default_factory=Counter)
    records_with_pii: int = 0
    examples: list[dict] = field(default_factory=list)  # {"where": "file:line:field", "entity", "masked"}

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def to_dict(self) -> dict:
        return {"file": self.file, "records": self.records, "strings": self.strings, "findings": self.total,
                "records_with_pii": self.records_with_pii, "counts": dict(self.counts), "examples": self.examples}

    def render(self, max_examples: int = 10) -> str:
        if not self.total:
            return f"{self.file}: no personal data found in {self.records} records ({self.strings} strings)"
        lines = [f"{self.file}: {self.total} finding(s) in {self.records_with_pii} of {self.records} records"]
        from .redactor import ENTITIES

        width = max(len(e) for e in self.counts)
        lines += [f"  {e:<{width}}  {self.counts[e]:>6}" for e in ENTITIES if self.counts.get(e)]
        lines.append("examples (values masked):")
        lines += [f"  {x['where']}: {x['entity']} {x['masked']}" for x in self.examples[:max_examples]]
        return "\n".join(lines)


def strings_of(value: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """(field path, text) of every string inside a record: `messages[1].content`, `prompt`, ..."""
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from strings_of(v, f"{path}.{k}" if path else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from strings_of(v, f"{path}[{i}]")


def redact_value(value: Any, redactor: "Redactor", found: list | None = None) -> Any:
    """A copy of a record (dicts, lists, strings) with every string redacted; findings appended to `found`."""
    if isinstance(value, str):
        text, f = redactor.redact_with_findings(value)
        if found is not None:
            found += f
        return text
    if isinstance(value, dict):
        return {k: redact_value(v, redactor, found) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_value(v, redactor, found) for v in value]
    return value


def scan_file(path: str, redactor: "Redactor | None" = None, examples_per_type: int = 3) -> ScanReport:
    from ..data.readers import read_records
    from .redactor import mask_value, shared_redactor

    redactor = redactor or shared_redactor()
    report = ScanReport(file=path)
    shown: Counter = Counter()
    for rec in read_records(path):
        report.records += 1
        hit = False
        for where, text in strings_of(rec.data):
            report.strings += 1
            for f in redactor.find(text):
                hit = True
                report.counts[f.entity] += 1
                if shown[f.entity] < examples_per_type:
                    shown[f.entity] += 1
                    report.examples.append({"where": f"{rec.file}:{rec.line}:{where}", "entity": f.entity,
                                            "masked": mask_value(f.text)})
        report.records_with_pii += hit
    return report


def redact_file(src: str, out: str, redactor: "Redactor | None" = None) -> ScanReport:
    """Write a redacted copy of `src` to `out` (.jsonl, .json or .csv, by out's suffix); returns what was found."""
    from ..data.readers import read_records
    from .redactor import shared_redactor

    redactor = redactor or shared_redactor()
    report = ScanReport(file=src)
    rows = []
    for rec in read_records(src):
        found: list = []
        rows.append(redact_value(rec.data, redactor, found))
        report.records += 1
        report.records_with_pii += bool(found)
        report.counts.update(f.entity for f in found)
    out_path = Path(out)
    if out_path.resolve() == Path(src).resolve():
        raise PrivacyError(f"--out {out}: give a new file, not the input")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
    suffix = out_path.suffix.lower()
    with open(tmp, "w", encoding="utf-8", newline="") as fh:
        if suffix == ".jsonl":
            fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        elif suffix == ".json":
            json.dump(rows, fh, ensure_ascii=False, indent=1)
        elif suffix == ".csv":
            cols = list(dict.fromkeys(k for r in rows for k in r))
            w = csv.DictWriter(fh, fieldnames=cols)
            w.writeheader()
            w.writerows({k: json.dumps(v, ensure_ascii=False) if isinstance(v, (dict, list)) else v
                         for k, v in r.items()} for r in rows)
        else:
            raise PrivacyError(f"--out {out}: unsupported suffix {suffix or '(none)'}; use .jsonl, .json or .csv")
    os.replace(tmp, out_path)  # a reader never sees half a file
    return report


def cached_scan(path: str) -> ScanReport:
    """scan_file, remembered by the file's SHA-256 under $TUNEKIT_CACHE/pii-scan/ (a rerun on the same data is
    instant; the cache holds counts and masked examples only)."""
    import hashlib

    from ..models import cache_dir

    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    cached = cache_dir() / "pii-scan" / f"{digest}.json"
    if cached.exists():
        d = json.loads(cached.read_text())
        return ScanReport(file=path, records=d["records"], strings=d["strings"], counts=Counter(d["counts"]),
                          records_with_pii=d["records_with_pii"], examples=d["examples"])
    report = scan_file(path)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(f".{cached.name}.{os.getpid()}")
    tmp.write_text(json.dumps(report.to_dict()))
    os.replace(tmp, cached)
    return report


def apply_pii_policy(cfg, say=None):
    """What `train.pii` asks before training: off, warn (print the scan), refuse (error if anything is found) or
    redact (train on redacted copies written to <output_dir>/pii-redacted/). Returns the config to train with."""
    mode = cfg.train.pii
    if mode == "off":
        return cfg
    say = say or (lambda m: print(m, file=sys.stderr, flush=True))
    files = {k: v for k, v in (("train", cfg.data.train), ("validation", cfg.data.validation))
             if v and Path(v).is_file()}
    if not files:
        return cfg
    updates = {}
    for key, path in files.items():
        if mode == "redact":
            out = Path(cfg.train.output_dir) / "pii-redacted" / (Path(path).stem + ".jsonl")
            report = redact_file(path, str(out))
            say(f"[tunekit] train.pii=redact: {report.total} finding(s) in {path} replaced by placeholders "
                f"({', '.join(f'{e} {n}' for e, n in report.counts.items()) or 'none'}); training on {out}")
            updates[key] = str(out)
            continue
        report = cached_scan(path)
        if not report.total:
            say(f"[tunekit] train.pii={mode}: no personal data found in {path}")
            continue
        if mode == "refuse":
            raise PrivacyError(report.render() + "\ntrain.pii=refuse: not training on personal data; run "
                               f"`tunekit data redact {path} --out REDACTED.jsonl` and train on that, or set "
                               "train.pii to redact, warn or off")
        say("[tunekit] warning: personal data in the training data (train.pii=warn; set train.pii=redact to train "
            "on a redacted copy, or refuse to stop):\n" + report.render())
    if updates:
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update=updates)})
    return cfg
