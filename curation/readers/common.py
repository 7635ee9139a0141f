"""What every format converter shares: the error type, typed field access, row parts.

A converter turns one parsed raw record into a list of row parts (``part(...)`` dicts);
the driver in ``curation.readers`` adds ids and provenance. Converters raise
``RecordError`` with a one-line message naming the field ("conversations[2].from:
unknown role 'tool'"), and the raw record is quarantined with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class RecordError(Exception):
    """The raw record cannot be read as the format says; it is quarantined with this message."""


@dataclass
class Context:
    """What a converter may need besides the record itself."""

    file_key: str
    columns: dict[str, str] = field(default_factory=dict)   # canonical key -> record field / column
    header: dict[str, Any] = field(default_factory=dict)    # top-level members of a report (oasst_sampling)


def kind_of(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def need_dict(value: Any, path: str = "record") -> dict:
    if not isinstance(value, dict):
        raise RecordError(f"{path}: expected an object, got {kind_of(value)}")
    return value


def need_str(obj: dict, key: str, path: str = "") -> str:
    where = f"{path}{key}"
    if key not in obj:
        raise RecordError(f"{where}: missing")
    value = obj[key]
    if not isinstance(value, str):
        raise RecordError(f"{where}: expected a string, got {kind_of(value)}")
    return value


def opt_str(obj: dict, key: str | None, path: str = "") -> str | None:
    """A string field that may be absent or null."""
    if key is None:
        return None
    value = obj.get(key)
    if value is None or isinstance(value, str):
        return value
    raise RecordError(f"{path}{key}: expected a string or null, got {kind_of(value)}")


def need_list(obj: dict, key: str, path: str = "") -> list:
    where = f"{path}{key}"
    if key not in obj:
        raise RecordError(f"{where}: missing")
    value = obj[key]
    if not isinstance(value, list):
        raise RecordError(f"{where}: expected an array, got {kind_of(value)}")
    return value


def message(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def part(suffix: str, messages: list[dict], generator: str | None = None, rank_group: str | None = None,
         rank: float | None = None, flags: list[str] | None = None) -> dict:
    """One row's content; ``suffix`` is appended to the record position ('line:3' + ':chosen')."""
    return {"suffix": suffix, "messages": messages, "generator": generator,
            "rank_group": rank_group, "rank": rank, "source_flags": flags}


def prompt_and_answer(user: str, answer: str | None) -> list[dict]:
    messages = [message("user", user)]
    if answer is not None:
        messages.append(message("assistant", answer))
    return messages


def join_input(instruction: str, extra: str | None) -> str:
    """Alpaca-style user turn: the instruction, then the input after a blank line when there is one."""
    return f"{instruction}\n\n{extra}" if extra else instruction
