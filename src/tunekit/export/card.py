"""The card every export writes: source run, method, format, dtype/quant, files (size, sha256), verification."""

from __future__ import annotations

import datetime
import hashlib
import json
from pathlib import Path


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_card(folder: Path, card: dict) -> None:
    """export.json (everything) and EXPORT.md (the same, for people) into folder."""
    from .. import __version__
    from ..engine.device import cpu_name, isa_label

    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in ("export.json", "EXPORT.md"))
    card["files"] = [{"path": str(p.relative_to(folder)), "bytes": p.stat().st_size, "sha256": sha256(p)}
                     for p in files]
    card["tunekit"] = __version__
    card["created"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    card["cpu"] = f"{cpu_name()} ({isa_label()})"
    (folder / "export.json").write_text(json.dumps(card, indent=2) + "\n")
    lines = [f"# tunekit export: {card['format']}", "",
             f"- source run: `{card['source']}` (method {card['method']}, base `{card['base_model']}`)",
             f"- {card['what']}", f"- created {card['created']} with tunekit {card['tunekit']} on {card['cpu']}", ""]
    if card.get("use"):
        lines += ["## Use", "", "```", *card["use"], "```", ""]
    lines += ["## Files", "", "| file | size | sha256 |", "|---|---:|---|"]
    lines += [f"| {f['path']} | {f['bytes'] / 1e6:.1f} MB | `{f['sha256'][:16]}…` |" for f in card["files"]]
    lines += ["", "## Verification", ""]
    verification = card.get("verification") or {}
    if not verification:
        lines.append("not run (--no-verify)")
    for name, result in verification.items():
        lines.append(f"- **{name}**: " + ", ".join(f"{k} {_fmt(v)}" for k, v in result.items()))
    (folder / "EXPORT.md").write_text("\n".join(lines) + "\n")


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
