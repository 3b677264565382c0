"""`tunekit eval`: generate an answer per test record and score it against the record's answer.

The answer of a record is its last assistant turn (chat), its completion, or its alpaca output; the prompt
is everything before it. When the answers are JSON objects the report adds JSON validity and per-field
accuracy, and each reply ends where its first JSON object closes (what follows cannot change the score, since
the scorer accepts only an object, optionally fenced); exact match compares parsed JSON values (or stripped
strings for plain-text answers).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from .data import DataError, normalise_record, read_records
from .demo.scoring import format_table, parse_json_output, score_predictions


def load_eval_records(source: str, require_answer: bool = True) -> list[tuple[list[dict], str | None]]:
    """(prompt messages, reference answer or None) per record of `source`."""
    return eval_pairs(read_records(source), require_answer)


def eval_pairs(records: list, require_answer: bool = True) -> list[tuple[list[dict], str | None]]:
    """(prompt messages, reference answer or None) per Record: the last assistant turn is the answer."""
    pairs = []
    for record in records:
        ex = normalise_record(record, train_on="completion" if require_answer else "all")
        if ex.messages is None:
            raise DataError("evaluation needs prompt/answer records, not raw text", file=record.file, line=record.line)
        msgs = ex.messages
        if msgs[-1]["role"] == "assistant":
            pairs.append((msgs[:-1], msgs[-1]["content"]))
        elif require_answer:
            raise DataError("the last message must be the assistant's answer to score against",
                            file=record.file, line=record.line, field="messages")
        else:
            pairs.append((msgs, None))
    return pairs


def score_text(predictions: list[str], references: list[str]) -> dict:
    """JSON-aware scores when every reference is a JSON object, else stripped exact match."""
    if references and all(parse_json_output(r) is not None for r in references):
        return score_predictions(predictions, references)
    exact = sum(p.strip() == r.strip() for p, r in zip(predictions, references))
    return {"exact_match": exact / max(len(references), 1), "json_valid": None, "field_accuracy": {},
            "n": len(references)}


@dataclass
class EvalReport:
    data: str
    model: str
    adapter: str | None
    scores: dict
    seconds: float
    dtype: str = "auto"
    predictions: list[dict] = field(default_factory=list)

    def table(self) -> str:
        row = {"model": self.model + (f" + {self.adapter}" if self.adapter else ""), "dtype": self.dtype,
               "n": self.scores["n"],
               "exact_match": self.scores["exact_match"], "json_valid": self.scores["json_valid"]}
        out = format_table([row], ["model", "dtype", "n", "exact_match", "json_valid"])
        if self.scores["field_accuracy"]:
            out += "\n\n" + format_table([{"field": k, "accuracy %": v} for k, v in
                                          self.scores["field_accuracy"].items()], ["field", "accuracy %"])
        return out


def evaluate_generation(data: str, model: str = "smollm2-135m", adapter: str | None = None, batch_size: int = 16,
                        max_new_tokens: int = 256, limit: int | None = None, output: str | None = None,
                        device: str = "auto", dtype: str = "auto") -> EvalReport:
    from .inference import dump_jsonl, generate, load_for_inference

    pairs = load_eval_records(data)[:limit]
    m, tok = load_for_inference(model, adapter, device, dtype=dtype, merge=True)  # merged: no adapter overhead
    refs = [r for _, r in pairs]
    json_answers = bool(refs) and all(parse_json_output(r) is not None for r in refs)
    t0 = time.perf_counter()
    preds = generate(m, tok, [p for p, _ in pairs], max_new_tokens=max_new_tokens, batch_size=batch_size,
                     progress=True, stop_after_json=json_answers)
    scores = score_text(preds, refs)
    rows = [{"prompt": p[-1]["content"], "reference": r, "prediction": y,
             "exact": score_text([y], [r])["exact_match"] == 1.0} for (p, r), y in zip(pairs, preds)]
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        dump_jsonl(rows, Path(output))
    return EvalReport(data, model, adapter, scores, time.perf_counter() - t0, str(m.dtype).replace("torch.", ""),
                      rows)
