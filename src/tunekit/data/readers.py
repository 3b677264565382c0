"""Read training records from a local file (.jsonl, .json, .csv, .parquet) or a Hugging Face dataset.

Every reader returns plain dict records that remember where they came from, so that later checks can say
`data/train.jsonl:12: ...`. Nothing here knows about chat formats; that is formats.py.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import DataError

SUPPORTED = (".jsonl", ".json", ".csv", ".parquet")
EXPECTED = "a .jsonl, .json, .csv or .parquet file, or a Hugging Face dataset name like 'owner/name'"
# `owner/name` with hub-legal characters, no further slashes.
HF_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class Record:
    """One raw record. `line`: 1-based line (.jsonl), record index (.json) or data row (.csv/.parquet/hub)."""

    data: dict[str, Any]
    file: str
    line: int | None


def read_records(source: str, *, split: str = "train") -> list[Record]:
    """All records of `source`; raises DataError naming the file (and line) when it cannot be read."""
    path = Path(source)
    if path.is_dir():
        raise DataError(f"is a folder; expected {EXPECTED}", file=source)
    if not path.exists():
        if HF_NAME.match(source) and path.suffix.lower() not in SUPPORTED:
            return read_hf_dataset(source, split=split)
        raise DataError(f"file not found; expected {EXPECTED}", file=source)
    suffix = path.suffix.lower()
    readers = {".jsonl": read_jsonl, ".json": read_json, ".csv": read_csv, ".parquet": read_parquet}
    if suffix not in readers:
        raise DataError(
            f"unsupported file type {suffix or '(no extension)'!r}; supported: {', '.join(SUPPORTED)}", file=source
        )
    records = readers[suffix](path, source)
    if not records:
        raise DataError("no records (the file is empty or has only blank lines)", file=source)
    return records


def decode_utf8(raw: bytes, file: str) -> str:
    """Bytes -> text; a non-UTF-8 byte is reported with the line it is on. A UTF-8 BOM is dropped."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(
            f"byte 0x{raw[e.start]:02x} is not valid UTF-8; save the file as UTF-8", file=file, line=line, unit="line"
        ) from None


def read_jsonl(path: Path, file: str) -> list[Record]:
    """One JSON object per line; blank lines are skipped."""
    text = decode_utf8(path.read_bytes(), file)
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"not valid JSON: {e.msg} (column {e.colno})", file=file, line=number, unit="line"
            ) from None
        if not isinstance(value, dict):
            raise DataError(
                f"expected a JSON object per line, got {json_type(value)}", file=file, line=number, unit="line"
            )
        records.append(Record(value, file, number))
    return records


def read_json(path: Path, file: str) -> list[Record]:
    """A JSON array of objects, or an object with exactly one list-valued key such as {"data": [...]}."""
    text = decode_utf8(path.read_bytes(), file)
    if not text.strip():
        return []
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"not valid JSON: {e.msg} (column {e.colno})", file=file, line=e.lineno, unit="line") from None
    if isinstance(value, dict):
        lists = [k for k, v in value.items() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(
                'expected a JSON array of objects, or an object with one list-valued key like {"data": [...]}; '
                f"got an object with keys: {', '.join(map(str, value)) or '(none)'}",
                file=file,
            )
        value = value[lists[0]]
    if not isinstance(value, list):
        raise DataError(f"expected a JSON array of objects, got {json_type(value)}", file=file)
    records = []
    for index, item in enumerate(value, start=1):
        if not isinstance(item, dict):
            raise DataError(f"expected an object, got {json_type(item)}", file=file, line=index, unit="record")
        records.append(Record(item, file, index))
    return records


def read_csv(path: Path, file: str) -> list[Record]:
    """A CSV file whose first line is the header (column names are the record's keys)."""
    text = decode_utf8(path.read_bytes(), file)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if reader.fieldnames is None:
        return []
    header = [name.strip() for name in reader.fieldnames]
    if any(not name for name in header) or len(set(header)) != len(header):
        raise DataError(
            f"the first line must be a header of distinct column names, got: {', '.join(map(repr, header))}",
            file=file,
            line=1,
            unit="line",
        )
    reader.fieldnames = header
    records = []
    try:
        for row_number, row in enumerate(reader, start=1):
            if None in row:  # DictReader files surplus values under the key None
                raise DataError(
                    f"has more values than the header has columns ({len(header)}: {', '.join(header)})",
                    file=file,
                    line=row_number,
                )
            records.append(Record(dict(row), file, row_number))
    except csv.Error as e:
        raise DataError(f"not valid CSV: {e}", file=file, line=reader.line_num, unit="line") from None
    return records


def read_parquet(path: Path, file: str) -> list[Record]:
    """A Parquet table; each row is a record (nested list/struct columns become lists/dicts)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"not a readable Parquet file: {e}", file=file) from None
    return [Record(row, file, number) for number, row in enumerate(rows, start=1)]


def read_hf_dataset(name: str, *, split: str) -> list[Record]:
    """A dataset from the Hugging Face hub (or its local cache); `line` is the 1-based row."""
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"no such file, and loading it as a Hugging Face dataset needs `pip install datasets`; expected {EXPECTED}",
            file=name,
        ) from None
    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as e:  # the hub raises many kinds (offline, missing, auth); all mean "cannot load"
        raise DataError(
            f"no such file, and loading it as a Hugging Face dataset (split {split!r}) failed: "
            f"{type(e).__name__}: {e}. Offline? Download it first or point data.train at a local file",
            file=name,
        ) from None
    records = [Record(dict(row), name, number) for number, row in enumerate(dataset, start=1)]
    if not records:
        raise DataError(f"split {split!r} has no rows", file=name)
    return records


def json_type(value: Any) -> str:
    """JSON's name for the type of `value`, for error messages."""
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")
