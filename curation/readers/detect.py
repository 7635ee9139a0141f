"""Format detection by content: the first record's keys, never the file name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from curation.readers.jsonstream import (PARQUET_MAGIC, TextStream, first_json_record, layout, open_binary,
                                         sketch_object, sniff)


def _is_str(record: dict, key: str) -> bool:
    return isinstance(record.get(key), str)


def classify(record: Any) -> str | None:
    """The format a parsed record (or a sketch of a top-level object) belongs to."""
    if not isinstance(record, dict):
        return None
    keys = record.keys()
    if isinstance(record.get("conversations"), list):
        return "sharegpt"
    if isinstance(record.get("messages"), list):
        return "openai_messages"
    prompt = record.get("prompt")
    if "message_tree_id" in keys or (isinstance(prompt, dict) and "replies" in prompt):
        return "oasst_tree"
    if _is_str(record, "chosen") and _is_str(record, "rejected"):
        return "hh_rlhf"
    if {"output_1", "output_2", "preference"} <= keys:
        return "alpaca_eval_annotations"
    if {"instruction", "output", "generator"} <= keys:
        return "alpaca_eval_outputs"
    if "instruction" in keys and isinstance(record.get("instances"), list):
        return "self_instruct_seed"
    if {"instruction", "context", "response"} <= keys:
        return "dolly"
    if "instruction" in keys and ("output" in keys or "response" in keys):
        return "alpaca"
    if "turns" in keys and "question_id" in keys:
        return "question_prompts"
    prompts = record.get("prompts")
    if isinstance(prompts, list) and ("model_name" in keys or (
            prompts and isinstance(prompts[0], dict) and "results" in prompts[0])):
        return "oasst_sampling"
    return None


def detect_format(path: Path) -> str | None:
    """The format of ``path`` from its content (gzip by magic bytes), or None when unknown."""
    path = Path(path)
    if sniff(path, 4) == PARQUET_MAGIC:
        return "parquet"
    kind = layout(path)
    if kind is None:
        return None
    if kind == "values":
        # One or more pretty-printed objects: a report's big arrays are only peeked at.
        with open_binary(path) as binary:
            return classify(sketch_object(TextStream(binary), enough=lambda sketch: classify(sketch) is not None))
    return classify(first_json_record(path))
