"""Normalise raw records of any supported format into one `Example`: a conversation or a plain text.

    chat               {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...}]}
                       {"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", ...}]}  (ShareGPT)
    prompt_completion  {"prompt": "...", "completion": "...", "system": "..." (optional)}
    alpaca             {"instruction": "...", "input": "..." (optional), "output": "..."}
    text               {"text": "..."}

Everything downstream sees only `Example.messages` (roles system/user/assistant, contents strings) or
`Example.text`. Every check raises DataError naming the file, line and field, and what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import DataError
from .readers import Record, json_type

ROLES = ("system", "user", "assistant")
# ShareGPT speaker -> role. "user"/"assistant" appear in some ShareGPT exports too.
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}
# Format -> the keys that identify it, in detection priority (first match wins).
FORMAT_KEYS: dict[str, tuple[str, ...]] = {
    "chat": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "text": ("text",),
}
FORMATS_HELP = (
    "chat (messages, or ShareGPT conversations), prompt_completion (prompt, completion), "
    "alpaca (instruction, output; optional input), text (text)"
)


@dataclass
class Example:
    """One normalised example: exactly one of `messages` (chat-like formats) or `text` is set."""

    file: str
    line: int | None
    format: str  # the source format: chat, prompt_completion, alpaca or text
    messages: list[dict[str, str]] | None = None  # [{"role": ..., "content": ...}, ...]
    text: str | None = None


def has(record: Record, key: str) -> bool:
    """A key counts as present when its value is not null (Parquet fills absent columns with null)."""
    return record.data.get(key) is not None


def detect_format(record: Record) -> str:
    """The format of `record`; a record that half-matches a format gets an error naming the missing key."""
    if has(record, "messages") or has(record, "conversations"):
        return "chat"
    for name, keys in FORMAT_KEYS.items():
        if all(has(record, k) for k in keys):
            return name
    for name, keys in FORMAT_KEYS.items():
        present = [k for k in keys if has(record, k)]
        if present:
            missing = next(k for k in keys if not has(record, k))
            raise field_error(record, missing, f"missing; a {name} record needs: {', '.join(keys)}{keys_of(record)}")
    raise DataError(
        f"matches no known format{keys_of(record)}; expected one of: {FORMATS_HELP}",
        file=record.file,
        line=record.line,
    )


def normalise_record(
    record: Record, *, format: str = "auto", train_on: str = "completion", system_prompt: str | None = None
) -> Example:
    """`record` as an Example. `format` is a DataConfig.format value; `system_prompt` is added to chat-like
    examples without a system message; train_on="completion" requires an assistant turn to learn from."""
    name = detect_format(record) if format == "auto" else format
    if name == "text":
        text = require_str(record, "text")
        if not text.strip():
            raise field_error(record, "text", "empty text; remove the record or fill it in")
        return Example(record.file, record.line, "text", text=text)
    builders = {"chat": chat_messages, "prompt_completion": prompt_completion_messages, "alpaca": alpaca_messages}
    if name not in builders:
        raise DataError(f"unknown data.format {name!r} (allowed: auto, {', '.join(FORMAT_KEYS)})", file=record.file)
    messages = builders[name](record)
    check_conversation(record, messages, train_on=train_on)
    if system_prompt is not None and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return Example(record.file, record.line, name, messages=messages)


def normalise_records(
    records: list[Record], *, format: str = "auto", train_on: str = "completion", system_prompt: str | None = None
) -> list[Example]:
    """normalise_record over all records; the first bad record raises."""
    return [normalise_record(r, format=format, train_on=train_on, system_prompt=system_prompt) for r in records]


def chat_messages(record: Record) -> list[dict[str, Any]]:
    """`messages` (role/content) or ShareGPT `conversations` (from/value) -> [{"role", "content"}, ...]."""
    key = "messages" if has(record, "messages") or not has(record, "conversations") else "conversations"
    raw = record.data.get(key)
    if raw is None:
        raise field_error(record, "messages", "missing; a chat record needs a list of {role, content} messages")
    if not isinstance(raw, list):
        raise field_error(record, key, f"must be a list of messages, got {json_type(raw)}")
    if not raw:
        raise field_error(record, key, "empty conversation; it needs at least one assistant message")
    messages = []
    for i, item in enumerate(raw):
        where = f"{key}[{i}]"
        if not isinstance(item, dict):
            raise field_error(record, where, f"must be an object with role and content, got {json_type(item)}")
        sharegpt = "role" not in item and ("from" in item or key == "conversations")
        role_key, content_key = ("from", "value") if sharegpt else ("role", "content")
        role_field, content_field = f"{where}.{role_key}", f"{where}.{content_key}"
        allowed = SHAREGPT_ROLES if sharegpt else {r: r for r in ROLES}
        speaker = item.get(role_key)
        if speaker is None:
            raise field_error(record, role_field, f"missing (allowed: {', '.join(allowed)})")
        if not isinstance(speaker, str) or speaker not in allowed:
            raise field_error(record, role_field, f"unknown role {speaker!r} (allowed: {', '.join(allowed)})")
        content = item.get(content_key)
        if not isinstance(content, str):
            got = "missing" if content is None else f"got {json_type(content)}"
            raise field_error(record, content_field, f"must be a string ({got})")
        messages.append({"role": allowed[speaker], "content": content, "fields": (role_field, content_field)})
    return messages


def prompt_completion_messages(record: Record) -> list[dict[str, Any]]:
    """prompt -> user, completion -> assistant, optional system -> system."""
    prompt, completion = require_str(record, "prompt"), require_str(record, "completion")
    messages = []
    if has(record, "system"):
        system = require_str(record, "system")
        messages.append({"role": "system", "content": system, "fields": ("system", "system")})
    messages.append({"role": "user", "content": prompt, "fields": ("prompt", "prompt")})
    messages.append({"role": "assistant", "content": completion, "fields": ("completion", "completion")})
    return messages


def alpaca_messages(record: Record) -> list[dict[str, Any]]:
    """instruction (+ "\\n\\n" + input when input is not blank) -> user, output -> assistant."""
    instruction, output = require_str(record, "instruction"), require_str(record, "output")
    extra = require_str(record, "input") if has(record, "input") else ""
    if not instruction.strip():
        raise field_error(record, "instruction", "empty; an alpaca record needs an instruction")
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return [
        {"role": "user", "content": user, "fields": ("instruction", "instruction")},
        {"role": "assistant", "content": output, "fields": ("output", "output")},
    ]


def check_conversation(record: Record, messages: list[dict[str, Any]], *, train_on: str) -> None:
    """System only first, no blank assistant turn, and (for train_on=completion) an assistant turn.
    Drops the helper key "fields" (role field, content field) from each message: it only served these errors."""
    for i, m in enumerate(messages):
        role_field, content_field = m.pop("fields")
        if m["role"] == "system" and i != 0:
            raise field_error(record, role_field, "system message must be the first message (found at position "
                              f"{i}); move it to the front or merge it into the first system message")
        if m["role"] == "assistant" and not m["content"].strip():
            raise field_error(record, content_field, "empty assistant turn; there is nothing to learn from it")
    if train_on == "completion" and not any(m["role"] == "assistant" for m in messages):
        raise DataError(
            "conversation has no assistant turn, so with data.train_on=completion there is nothing to learn; "
            "add an assistant message or set data.train_on=all",
            file=record.file,
            line=record.line,
        )


def require_str(record: Record, key: str) -> str:
    """record.data[key] when it is a string, else a DataError naming the field."""
    value = record.data.get(key)
    if value is None:
        raise field_error(record, key, f"missing{keys_of(record)}")
    if not isinstance(value, str):
        raise field_error(record, key, f"must be a string, got {json_type(value)}")
    return value


def field_error(record: Record, field: str, message: str) -> DataError:
    return DataError(message, file=record.file, line=record.line, field=field)


def keys_of(record: Record) -> str:
    """'; this record has keys: a, b' for error messages."""
    keys = [k for k in record.data if record.data[k] is not None]
    return f"; this record has keys: {', '.join(map(str, keys)) or '(none)'}"
