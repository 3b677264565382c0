"""The one error type of the data pipeline: it always names the file, and the line and field when known.

    data/train.jsonl:12: field 'messages[2].role': unknown role 'bot' (allowed: system, user, assistant)
    data/train.json: record 4: field 'output': missing; ...
    data/train.csv: row 7: field 'completion': empty (null); ...

What `line` counts depends on the file: the 1-based line of a .jsonl file, the 1-based record index of a
.json array, the 1-based data row of a .csv/.parquet file or a Hugging Face dataset. `unit` names that
("line", "record", "row"); when not given it follows from the file's extension.
"""

from __future__ import annotations

from pathlib import PurePath

# Extension -> what `line` counts in that kind of file.
UNIT_BY_SUFFIX = {".jsonl": "line", ".json": "record", ".csv": "row", ".parquet": "row"}


def unit_for(file: str) -> str:
    """What a record position means in `file` ("row" for anything that is not a known file type)."""
    return UNIT_BY_SUFFIX.get(PurePath(file).suffix.lower(), "row")


class DataError(ValueError):
    """Bad training data. `str(err)` is the full message; the parts are kept as attributes for tools."""

    def __init__(
        self,
        message: str,
        *,
        file: str,
        line: int | None = None,
        field: str | None = None,
        unit: str | None = None,
    ) -> None:
        self.reason = message
        self.file = file
        self.line = line
        self.field = field
        self.unit = unit or unit_for(file)
        super().__init__(self._format())

    def __reduce__(self):  # keyword-only fields: tell pickle (e.g. DataLoader workers) how to rebuild
        return (_rebuild, (self.reason, self.file, self.line, self.field, self.unit))

    def location(self) -> str:
        """`file:12` for lines, `file: record 12` / `file: row 12` otherwise, `file` when unknown."""
        if self.line is None:
            return self.file
        if self.unit == "line":
            return f"{self.file}:{self.line}"
        return f"{self.file}: {self.unit} {self.line}"

    def _format(self) -> str:
        parts = [self.location()]
        if self.field is not None:
            parts.append(f"field {self.field!r}")
        parts.append(self.reason)
        return ": ".join(parts)


def _rebuild(reason: str, file: str, line: int | None, field: str | None, unit: str) -> DataError:
    return DataError(reason, file=file, line=line, field=field, unit=unit)


class DataWarning(UserWarning):
    """Examples were truncated or dropped; the message gives the counts and where."""
