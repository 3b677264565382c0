"""Offline (sequence-level) distillation data: the teacher's response to every training prompt, as chat JSONL.

Sequence-level KD (Kim & Rush 2016): the student is fine-tuned on the teacher's outputs instead of (or besides)
the gold answers. Generation is batched, shows progress, and is resumable: each finished batch is appended and
flushed, every row records the index of its prompt, and a rerun skips the prompts already answered (provided
the settings in the sidecar `<file>.meta.json` are the same). Each row keeps its provenance: source file and
line, teacher, adapter, generation settings. Prompts the teacher answers with nothing go to
`<file>.rejected.jsonl` instead (an empty assistant turn is not training data).
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

from .teacher import DistillError


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def adapter_digest(adapter: str | None) -> str | None:
    """A short hash of the adapter's weights, so the data names exactly which teacher wrote it."""
    if adapter is None:
        return None
    files = sorted(p for p in Path(adapter).glob("*.safetensors"))
    return ",".join(f"{p.name}:{file_digest(p)}" for p in files) or None


def generation_settings(d, source: str) -> dict:
    return {"source": source, "source_sha256": file_digest(Path(source)) if Path(source).is_file() else None,
            "teacher": d.teacher, "teacher_adapter": d.teacher_adapter,
            "teacher_adapter_sha256": adapter_digest(d.teacher_adapter), "max_new_tokens": d.max_new_tokens,
            "temperature": d.teacher_temperature}


def rejected_path(out: Path) -> Path:
    """Where prompts the teacher answered with nothing are listed (kept out of the training data)."""
    return out.with_name(out.stem + ".rejected.jsonl")


def done_indices(out: Path) -> set[int]:
    """Prompt indices already answered in `out` (or rejected); a torn last line (killed mid-write) is dropped."""
    if not out.exists():
        return set()
    rejected = rejected_path(out)
    done = {json.loads(x)["provenance"]["index"] for x in rejected.read_text().splitlines()
            if x.endswith("}")} if rejected.exists() else set()
    lines = out.read_text(encoding="utf-8").splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines = lines[:-1]
        out.write_text("".join(lines), encoding="utf-8")
    return done | {json.loads(line)["provenance"]["index"] for line in lines if line.strip()}


def write_teacher_data(d, source: str, out: str, device: str = "auto", progress: bool = True) -> Path:
    """Answer every prompt of `source` with the teacher of distill config `d`; returns the JSONL path."""
    from ..data import read_records
    from ..evaluate import eval_pairs
    from ..inference import generate, load_for_inference

    out_path = Path(out)
    meta_path = out_path.with_name(out_path.name + ".meta.json")
    settings = generation_settings(d, source)
    raw = read_records(source)
    records = eval_pairs(raw, require_answer=False)
    done: set[int] = set()
    if out_path.exists():
        previous = json.loads(meta_path.read_text()) if meta_path.exists() else None
        if previous is None or previous.get("settings") != settings:
            raise DistillError(f"{out_path} exists but was written with other settings ({meta_path}); delete it or "
                               f"set distill.teacher_data to a new file")
        done = done_indices(out_path)
    todo = [i for i in range(len(records)) if i not in done]
    if not todo:
        print(f"[tunekit] teacher data: all {len(records)} prompts already answered in {out_path}", flush=True)
        return out_path
    out_path.parent.mkdir(parents=True, exist_ok=True)
    meta_path.write_text(json.dumps({"settings": settings, "n_prompts": len(records),
                                     "started": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2) + "\n")
    model, tokenizer = load_for_inference(d.teacher, d.teacher_adapter, device=device)
    print(f"[tunekit] teacher data: {len(todo)} of {len(records)} prompts to answer -> {out_path}"
          + (f" (resuming: {len(done)} done)" if done else ""), flush=True)
    t0, n_tokens, n_empty = time.perf_counter(), 0, 0
    chunk = d.generate_batch_size * 4  # a few generation batches per flush: length-sorting works within a chunk
    with open(out_path, "a", encoding="utf-8") as f, open(rejected_path(out_path), "a", encoding="utf-8") as rej:
        for start in range(0, len(todo), chunk):
            idx = todo[start : start + chunk]
            replies = generate(model, tokenizer, [records[i][0] for i in idx], max_new_tokens=d.max_new_tokens,
                               temperature=d.teacher_temperature, batch_size=d.generate_batch_size)
            for i, reply in zip(idx, replies):
                prompt = [{"role": m["role"], "content": m["content"]} for m in records[i][0]]
                row = {"messages": prompt + [{"role": "assistant", "content": reply}],
                       "provenance": {"index": i, "file": raw[i].file, "line": raw[i].line,
                                      "teacher": d.teacher, "teacher_adapter": d.teacher_adapter}}
                n_empty += not reply.strip()
                (f if reply.strip() else rej).write(json.dumps(row, ensure_ascii=False) + "\n")
                n_tokens += len(tokenizer(reply, add_special_tokens=False)["input_ids"])
            rej.flush()
            f.flush()
            if progress:
                finished = min(start + chunk, len(todo))
                elapsed = time.perf_counter() - t0
                eta = elapsed / finished * (len(todo) - finished)
                print(f"teacher data {finished}/{len(todo)}  {n_tokens / elapsed:,.0f} generated tok/s  "
                      f"ETA {eta:,.0f}s", file=sys.stderr, flush=True)
    if n_empty:
        print(f"[tunekit] teacher data: {n_empty} prompts got an empty reply; listed in {rejected_path(out_path)}, "
              f"not trained on", flush=True)
    meta = json.loads(meta_path.read_text())
    meta["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    return out_path
