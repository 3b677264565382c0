"""Training data: read files, normalise formats, apply chat templates with loss masks, split and count.

    from tunekit.data import prepare_data
    data = prepare_data(cfg.data, tokenizer)   # data.train / data.validation: list[TokenizedExample]
    print(data.stats.summary())
"""

from .errors import DataError, DataWarning
from .formats import Example, detect_format, normalise_record, normalise_records
from .prepare import DataStats, PreparedData, prepare_data, split_examples
from .readers import Record, read_records
from .tokenize import IGNORE_INDEX, Skipped, TokenizedExample, tokenize_example, tokenize_or_skip

__all__ = [
    "DataError",
    "DataStats",
    "DataWarning",
    "Example",
    "IGNORE_INDEX",
    "PreparedData",
    "Record",
    "Skipped",
    "TokenizedExample",
    "detect_format",
    "normalise_record",
    "normalise_records",
    "prepare_data",
    "read_records",
    "split_examples",
    "tokenize_example",
    "tokenize_or_skip",
]
