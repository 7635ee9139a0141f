"""AlpacaEval: model outputs, and pairwise judge annotations (two ranked rows per judgement)."""

from __future__ import annotations

import math
from typing import Any

from curation.readers.common import Context, RecordError, kind_of, need_dict, need_str, opt_str, part, prompt_and_answer


def alpaca_eval_outputs(value: Any, pos: str, ctx: Context) -> list[dict]:
    record = need_dict(value)
    messages = prompt_and_answer(need_str(record, "instruction"), need_str(record, "output"))
    return [part("", messages, generator=opt_str(record, "generator"))]


def _preference(record: dict) -> float | None:
    """The judge's preference in [1, 2] (1: output_1 won, 2: output_2 won); None when undecided."""
    if "preference" not in record:
        raise RecordError("preference: missing")
    value = record["preference"]
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RecordError(f"preference: expected a number in [1, 2] or null, got {kind_of(value)}")
    if math.isnan(value):
        return None
    if not 1.0 <= value <= 2.0:
        raise RecordError(f"preference: expected a number in [1, 2] or null, got {value!r}")
    return float(value)


def alpaca_eval_annotations(value: Any, pos: str, ctx: Context) -> list[dict]:
    """Both judged answers; rank 0 is the winner, a preference of 1.5 ranks both 0.5."""
    record = need_dict(value)
    instruction = need_str(record, "instruction")
    preference = _preference(record)
    group = f"{ctx.file_key}:{pos}"
    parts = []
    for side in (1, 2):
        rank = None
        if preference is not None:
            rank = preference - 1.0 if side == 1 else 2.0 - preference
        messages = prompt_and_answer(instruction, need_str(record, f"output_{side}"))
        parts.append(part(f":output_{side}", messages, generator=opt_str(record, f"generator_{side}"),
                          rank_group=group, rank=rank))
    return parts
