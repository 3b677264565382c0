"""The data pipeline of a run: read -> normalise -> split -> tokenize, with counts of what happened.

    DataConfig ─▶ read_records ─▶ normalise_records ─▶ train/validation split ─▶ tokenize_or_skip
                                                                                  └─▶ DataStats (+ warnings)

The split is made on records, before tokenization, so that max_length or the tokenizer never changes
which records are held out. Truncated and dropped examples are always reported (DataWarning), never silent.
"""

from __future__ import annotations

import random
import warnings
from collections import Counter
from dataclasses import dataclass, field

from ..config import DataConfig
from .errors import DataError, DataWarning
from .formats import Example, normalise_records
from .readers import read_records
from .tokenize import (
    DROPPED_TOO_LONG,
    NO_LABELS,
    NO_LABELS_AFTER_TRUNCATION,
    Skipped,
    TokenizedExample,
    tokenize_or_skip,
)

MAX_LOCATIONS = 5  # how many file:line locations a warning lists


@dataclass
class DataStats:
    """Counts over train + validation. `format` is the detected format, e.g. "chat" or "chat+text"."""

    n_records: int = 0
    n_train: int = 0
    n_val: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_no_labels: int = 0  # no labelled token left after truncation (or none to begin with)
    total_tokens: int = 0
    label_tokens: int = 0
    format: str = ""

    def summary(self) -> str:
        """One line for logs."""
        share = f" ({100 * self.label_tokens / self.total_tokens:.0f}%)" if self.total_tokens else ""
        return (
            f"data: {self.n_records} records ({self.format or 'none'}) -> {self.n_train} train / {self.n_val} val "
            f"examples; {self.total_tokens:,} tokens, {self.label_tokens:,} labelled{share}; "
            f"truncated {self.truncated}, dropped {self.dropped_too_long} too long, "
            f"{self.dropped_no_labels} without labels"
        )


@dataclass
class PreparedData:
    train: list[TokenizedExample]
    validation: list[TokenizedExample]
    stats: DataStats
    skipped: list[Skipped] = field(default_factory=list)  # every example left out, with its reason


def prepare_data(cfg: DataConfig, tokenizer) -> PreparedData:
    """Read, check, split and tokenize the data of `cfg`; raises DataError on bad data, warns on losses."""
    if cfg.train is None:
        raise DataError(
            "data.train is not set; point it at a .jsonl/.json/.csv/.parquet file or a HF dataset", file="config"
        )
    train_examples = load_examples(cfg, cfg.train)
    n_records = len(train_examples)
    if cfg.validation is not None:
        val_examples = load_examples(cfg, cfg.validation)
        n_records += len(val_examples)
    else:
        train_examples, val_examples = split_examples(train_examples, cfg.val_fraction, cfg.seed)

    stats = DataStats(n_records=n_records, format=describe_formats(train_examples + val_examples))
    skipped: list[Skipped] = []
    train = tokenize_all(train_examples, tokenizer, cfg, stats, skipped)
    validation = tokenize_all(val_examples, tokenizer, cfg, stats, skipped)
    stats.n_train, stats.n_val = len(train), len(validation)
    warn_about_losses(stats, skipped, cfg)
    if not train:
        raise DataError(
            f"no trainable examples left: {stats.dropped_too_long} over data.max_length={cfg.max_length} dropped, "
            f"{stats.dropped_no_labels} without labelled tokens; raise data.max_length or use overflow=truncate",
            file=cfg.train,
        )
    return PreparedData(train, validation, stats, skipped)


def load_examples(cfg: DataConfig, source: str) -> list[Example]:
    records = read_records(source, split=cfg.split)
    return normalise_records(records, format=cfg.format, train_on=cfg.train_on, system_prompt=cfg.system_prompt)


def split_examples(examples: list[Example], val_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Seeded random hold-out of round(n * val_fraction) examples (at least 1 when val_fraction > 0 and n >= 2,
    always leaving 1 for training). Both parts keep the file order."""
    n = len(examples)
    if val_fraction <= 0 or n < 2:
        return list(examples), []
    n_val = min(max(1, round(n * val_fraction)), n - 1)
    held_out = set(random.Random(seed).sample(range(n), n_val))
    train = [e for i, e in enumerate(examples) if i not in held_out]
    val = [e for i, e in enumerate(examples) if i in held_out]
    return train, val


def tokenize_all(
    examples: list[Example], tokenizer, cfg: DataConfig, stats: DataStats, skipped: list[Skipped]
) -> list[TokenizedExample]:
    """Tokenize `examples`; adds to `stats` and appends to `skipped` (both passed in to be filled)."""
    kept = []
    for example in examples:
        result = tokenize_or_skip(
            example, tokenizer, train_on=cfg.train_on, max_length=cfg.max_length, overflow=cfg.overflow
        )
        if isinstance(result, Skipped):
            skipped.append(result)
            if result.reason == DROPPED_TOO_LONG:
                stats.dropped_too_long += 1
            elif result.reason in (NO_LABELS_AFTER_TRUNCATION, NO_LABELS):
                stats.dropped_no_labels += 1
            continue
        kept.append(result)
        stats.truncated += result.truncated
        stats.total_tokens += len(result.input_ids)
        stats.label_tokens += result.n_label_tokens
    return kept


def warn_about_losses(stats: DataStats, skipped: list[Skipped], cfg: DataConfig) -> None:
    """One DataWarning per kind of loss, with counts and the first few locations."""
    if stats.truncated:
        warnings.warn(
            f"{stats.truncated} example(s) longer than data.max_length={cfg.max_length} were truncated; "
            "raise max_length or set overflow=drop to skip them",
            DataWarning,
            stacklevel=3,
        )
    by_reason = Counter(s.reason for s in skipped)
    advice = {
        DROPPED_TOO_LONG: f"longer than data.max_length={cfg.max_length} and dropped (overflow=drop)",
        NO_LABELS_AFTER_TRUNCATION: f"dropped: truncation to data.max_length={cfg.max_length} left no assistant "
        "token to learn from; raise max_length or shorten the prompts",
        NO_LABELS: "dropped: no token to learn from",
    }
    for reason, count in by_reason.items():
        where = [location(s) for s in skipped if s.reason == reason][:MAX_LOCATIONS]
        more = ", ..." if count > len(where) else ""
        warnings.warn(f"{count} example(s) {advice[reason]} (at {', '.join(where)}{more})", DataWarning, stacklevel=3)


def location(item: Skipped) -> str:
    return DataError("", file=item.file, line=item.line).location()


def describe_formats(examples: list[Example]) -> str:
    """The formats present, most common first, joined by '+'."""
    return "+".join(name for name, _ in Counter(e.format for e in examples).most_common())
