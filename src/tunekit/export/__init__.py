"""`tunekit export RUN_DIR --format hf|gguf|ollama|lora-gguf|vllm --out DIR`: a trained model where users run it.

    run folder -> merged fp32 model (merging.load_merged) -> hf folder | GGUF (+ Modelfile) ;  adapter -> LoRA GGUF |
    vLLM adapter folder -> checks by the consuming tool (verify.py) -> EXPORT.md + export.json (card.py)

Every export is written to a temporary folder next to --out and renamed at the end, so an error (or Ctrl-C)
never leaves a half-written folder that looks complete.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .errors import ExportError

FORMATS = ("hf", "gguf", "ollama", "lora-gguf", "vllm")
__all__ = ["FORMATS", "ExportError", "export"]


def export(run_dir: str, fmt: str, out: str, quant: str | None = None, model: str | None = None,
           dtype: str = "float32", verify: bool = True, gguf_pre: str | None = None, serve_name: str | None = None,
           overwrite: bool = False, threads: int | None = None) -> dict:
    """Export `run_dir` as `fmt` into `out`; returns the card (also written as out/export.json)."""
    from . import formats

    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r} is not one of: {', '.join(FORMATS)}")
    source = Path(run_dir)
    if not source.is_dir():
        raise ExportError(f"{source}: not a folder (give a tunekit run folder or a PEFT adapter folder)")
    target = Path(out)
    if target.resolve() == source.resolve() or source.resolve() in target.resolve().parents:
        raise ExportError(f"--out {target} is inside the run folder {source}; choose a folder elsewhere")
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise ExportError(f"--out {target} exists and is not empty; choose a new folder or pass --overwrite")
    tmp = target.parent / f".{target.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        writer = {"hf": formats.export_hf, "gguf": formats.export_gguf, "ollama": formats.export_ollama,
                  "lora-gguf": formats.export_lora_gguf, "vllm": formats.export_vllm}[fmt]
        card = writer(source, tmp, quant=quant, model=model, dtype=dtype, verify=verify, gguf_pre=gguf_pre,
                      serve_name=serve_name, threads=threads)
        from .card import write_card

        write_card(tmp, card)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    card["out"] = str(target)
    return card
