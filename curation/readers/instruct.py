"""Single-turn instruction layouts: Alpaca / GPTeacher, Dolly, self-instruct seed tasks, and
Parquet or generic JSON read through a ``columns`` mapping."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from curation.readers.chat import parse_messages
from curation.readers.common import (Context, RecordError, join_input, kind_of, message, need_dict, need_list,
                                     need_str, opt_str, part, prompt_and_answer)
from curation.readers.jsonstream import ContainerError, RawRecord

CANONICAL_COLUMNS = ("messages", "prompt", "response", "system", "generator", "id")


def alpaca(value: Any, pos: str, ctx: Context) -> list[dict]:
    """``{instruction, input?, output}``; GPTeacher files say ``response`` instead of ``output``."""
    record = need_dict(value)
    instruction = need_str(record, "instruction")
    extra = opt_str(record, "input")
    answer_key = "output" if "output" in record else "response"
    answer = need_str(record, answer_key) if answer_key in record else None
    if answer is None:
        raise RecordError("output: missing (neither 'output' nor 'response' is present)")
    return [part("", prompt_and_answer(join_input(instruction, extra), answer))]


def dolly(value: Any, pos: str, ctx: Context) -> list[dict]:
    record = need_dict(value)
    instruction = need_str(record, "instruction")
    context = opt_str(record, "context")
    return [part("", prompt_and_answer(join_input(instruction, context), need_str(record, "response")))]


def self_instruct_seed(value: Any, pos: str, ctx: Context) -> list[dict]:
    """One row per instance: the task instruction with that instance's input and output."""
    record = need_dict(value)
    instruction = need_str(record, "instruction")
    instances = need_list(record, "instances")
    if not instances:
        raise RecordError("instances: empty, the seed task has no example to read")
    parts = []
    for k, instance in enumerate(instances):
        where = f"instances[{k}]"
        instance = need_dict(instance, where)
        extra = opt_str(instance, "input", f"{where}.")
        answer = need_str(instance, "output", f"{where}.")
        parts.append(part(f":instance:{k}", prompt_and_answer(join_input(instruction, extra), answer)))
    return parts


# ------------------------------------------------------------------ column mapping

def mapping_for(columns: dict[str, str], available: list[str] | None = None) -> dict[str, str]:
    """The mapping in force: the recipe's, else canonical names that exist (all of them for JSON)."""
    if columns:
        return dict(columns)
    if available is None:
        return {key: key for key in CANONICAL_COLUMNS}
    return {key: key for key in CANONICAL_COLUMNS if key in available}


def mapped(value: Any, pos: str, ctx: Context) -> list[dict]:
    """A record read through the mapping: ``messages``, or ``prompt`` (+ ``response``)."""
    record = need_dict(value)
    m = mapping_for(ctx.columns)
    explicit = bool(ctx.columns)
    messages_key, prompt_key = m.get("messages"), m.get("prompt")
    if messages_key and (explicit or messages_key in record):
        if record.get(messages_key) is None:
            raise RecordError(f"{messages_key}: missing (mapped to messages)")
        messages = parse_messages(record[messages_key], messages_key)
    elif prompt_key and (explicit or prompt_key in record):
        prompt = need_str(record, prompt_key)
        response_key = m.get("response")
        answer = None
        if response_key and (explicit or response_key in record):
            answer = need_str(record, response_key)
        messages = prompt_and_answer(prompt, answer)
    else:
        raise RecordError("no 'messages' or 'prompt' field; set `columns:` for this source in the recipe")
    system = opt_str(record, m.get("system"))
    if system:
        messages.insert(0, message("system", system))
    if not messages:
        raise RecordError(f"{messages_key}: empty, no conversation to read")
    suffix = ""
    id_key = m.get("id")
    if id_key and record.get(id_key) is not None:
        own_id = record[id_key]
        if not isinstance(own_id, (str, int)) or isinstance(own_id, bool):
            raise RecordError(f"{id_key}: expected a string or integer id, got {kind_of(own_id)}")
        suffix = f":id:{own_id}"
    return [part(suffix, messages, generator=opt_str(record, m.get("generator")))]


def iter_parquet(path: Path, ctx: Context, batch_size: int = 5000) -> Iterator[RawRecord]:
    """Rows of a Parquet file, batch by batch, holding only the mapped columns."""
    parquet = pq.ParquetFile(path)
    names = parquet.schema_arrow.names
    m = mapping_for(ctx.columns, names)
    missing = sorted(f"'{column}' (mapped to {key})" for key, column in m.items() if column not in names)
    if missing:
        raise ContainerError(f"column {', '.join(missing)} not in the file, whose columns are {names}; "
                             "fix `columns:` for this source in the recipe")
    if "messages" not in m and "prompt" not in m:
        raise ContainerError(f"no 'messages' or 'prompt' column among {names}; "
                             "set `columns:` for this source in the recipe")
    ctx.columns = m  # the resolved mapping: every mapped column exists
    number = 0
    for batch in parquet.iter_batches(batch_size=batch_size, columns=sorted(set(m.values()))):
        for value in batch.to_pylist():
            yield RawRecord("row", number, None, None, None, value)
            number += 1


def parquet_raw(value: Any) -> bytes:
    """A Parquet row has no raw text: quarantine it as JSON."""
    return json.dumps(value, ensure_ascii=False, default=str).encode("utf-8")
