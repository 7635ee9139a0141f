"""Anthropic HH-RLHF preference pairs: ``{chosen, rejected}`` plain-text transcripts."""

from __future__ import annotations

import re
from typing import Any

from curation.readers.common import Context, RecordError, message, need_dict, need_str, part

HUMAN, ASSISTANT = "\n\nHuman: ", "\n\nAssistant: "
MARKERS = re.compile(f"({re.escape(HUMAN)}|{re.escape(ASSISTANT)})")


def parse_transcript(text: str, where: str) -> list[dict]:
    """Split on the exact turn markers; the text between markers is kept as it is."""
    pieces = MARKERS.split(text)
    if len(pieces) < 3:
        raise RecordError(f"{where}: no {HUMAN.strip()!r} / {ASSISTANT.strip()!r} turn markers in the transcript")
    if pieces[0]:
        raise RecordError(f"{where}: text before the first turn marker ({pieces[0][:40]!r}); "
                          "HH transcripts start with '\\n\\nHuman: '")
    return [message("user" if marker == HUMAN else "assistant", content)
            for marker, content in zip(pieces[1::2], pieces[2::2])]


def hh_rlhf(value: Any, pos: str, ctx: Context) -> list[dict]:
    """Two rows, the chosen transcript ranked 0 and the rejected one 1, in one rank group."""
    record = need_dict(value)
    chosen = parse_transcript(need_str(record, "chosen"), "chosen")
    rejected = parse_transcript(need_str(record, "rejected"), "rejected")
    group = f"{ctx.file_key}:{pos}"
    return [part(":chosen", chosen, rank_group=group, rank=0.0),
            part(":rejected", rejected, rank_group=group, rank=1.0)]
