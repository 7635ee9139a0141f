"""Evaluation question files (MT-bench, vicuna-bench): prompts without answers."""

from __future__ import annotations

from typing import Any

from curation.readers.common import Context, RecordError, kind_of, message, need_dict, need_list, part


def question_prompts(value: Any, pos: str, ctx: Context) -> list[dict]:
    """Every turn becomes a user message; the row has no answer, so its kind is 'prompt'."""
    record = need_dict(value)
    turns = need_list(record, "turns")
    if not turns:
        raise RecordError("turns: empty, the question has no prompt to read")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, str):
            raise RecordError(f"turns[{i}]: expected a string, got {kind_of(turn)}")
        messages.append(message("user", turn))
    return [part("", messages)]
