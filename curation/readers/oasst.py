"""OpenAssistant: export trees (one JSON line per tree) and sampling reports.

A tree yields one row per assistant message that ends a thread or carries a human
``rank`` (the row is the path from the root to it), so both the SFT threads and the
ranked sibling answers are kept. Review facts (deleted, failed review, synthetic) become
``source_flags``: flagged rows are still emitted, a later filter decides.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from curation.readers.common import Context, RecordError, kind_of, message, need_dict, need_list, need_str, part
from curation.readers.jsonstream import (ContainerError, RawRecord, TextStream, check_end, iter_array, open_binary,
                                         read_element, tail_error)

OASST_ROLES = {"prompter": "user", "assistant": "assistant"}
FLAG_ORDER = ("deleted", "review_failed", "synthetic")


def _is(value: Any, truth: bool) -> bool:
    """The export writes booleans either as JSON booleans or as the strings 'True' / 'False'."""
    if isinstance(value, bool):
        return value is truth
    return isinstance(value, str) and value.strip().lower() == ("true" if truth else "false")


def _flags(msg: dict) -> set[str]:
    flags = set()
    if _is(msg.get("deleted"), True):
        flags.add("deleted")
    if _is(msg.get("review_result"), False):
        flags.add("review_failed")
    if _is(msg.get("synthetic"), True):
        flags.add("synthetic")
    return flags


def _rank(msg: dict, where: str) -> float | None:
    rank = msg.get("rank")
    if rank is None:
        return None
    if isinstance(rank, bool) or not isinstance(rank, (int, float)):
        raise RecordError(f"{where}.rank: expected a number, got {kind_of(rank)}")
    return float(rank)


def oasst_tree(value: Any, pos: str, ctx: Context) -> list[dict]:
    tree = need_dict(value)
    root = need_dict(tree.get("prompt"), "prompt")
    tree_id = tree.get("message_tree_id") or root.get("message_id")
    if not isinstance(tree_id, str):
        raise RecordError(f"message_tree_id: expected a string, got {kind_of(tree_id)}")

    parts: list[dict] = []
    emitted: set[str] = set()
    seen_ids: set[str] = set()
    # Depth-first walk; each stack entry is (message, where, path of (message, row message, flags)).
    stack: list[tuple[dict, str, list]] = [(root, "prompt", [])]
    while stack:
        msg, where, path = stack.pop()
        msg = need_dict(msg, where)
        msg_id = need_str(msg, "message_id", f"{where}.")
        if msg_id in seen_ids:
            raise RecordError(f"{where}.message_id: {msg_id!r} appears twice in the tree")
        seen_ids.add(msg_id)
        speaker = need_str(msg, "role", f"{where}.")
        role = OASST_ROLES.get(speaker)
        if role is None:
            raise RecordError(f"{where}.role: unknown role {speaker!r}")
        path = path + [(msg, message(role, need_str(msg, "text", f"{where}.")), _flags(msg))]
        replies = msg.get("replies") or []
        if not isinstance(replies, list):
            raise RecordError(f"{where}.replies: expected an array, got {kind_of(replies)}")
        rank = _rank(msg, where)

        end = None  # the assistant message whose path is a row, if any
        if role == "assistant" and (rank is not None or not replies):
            end = len(path)
        elif role == "user" and not replies and len(path) > 1 and path[-2][1]["role"] == "assistant":
            end = len(path) - 1  # a thread ending in an unanswered prompt: trim it off
        if end is not None:
            last = path[end - 1][0]
            if last["message_id"] not in emitted:
                emitted.add(last["message_id"])
                parts.append(_row(path[:end], tree_id, ctx, where))
        for i in range(len(replies) - 1, -1, -1):
            stack.append((replies[i], f"{where}.replies[{i}]", path))

    if not parts:
        raise RecordError("tree has no assistant message, no conversation to read")
    return parts


def _row(path: list, tree_id: str, ctx: Context, where: str) -> dict:
    last = path[-1][0]
    flags: set[str] = set().union(*(step[2] for step in path))
    rank = _rank(last, where)
    rank_group = None
    if rank is not None:
        rank_group = f"{ctx.file_key}:{tree_id}:{last.get('parent_id')}"
    generator = last.get("model_name") if "synthetic" in path[-1][2] else None
    if generator is not None and not isinstance(generator, str):
        raise RecordError(f"{where}.model_name: expected a string, got {kind_of(generator)}")
    return part(f":msg:{last['message_id']}", [step[1] for step in path], generator=generator,
                rank_group=rank_group, rank=rank, flags=[f for f in FLAG_ORDER if f in flags])


# ---------------------------------------------------------------- sampling reports

def iter_sampling(path: Path, ctx: Context) -> Iterator[RawRecord]:
    """Each ``prompts[I]`` element of a sampling report, streamed as one raw record.

    The other top-level members (``model_name``, ``args``...) are small; they go into
    ``ctx.header``. When ``model_name`` comes after ``prompts`` it is found first by a
    pass that streams over the prompts without keeping them.
    """
    with open_binary(path) as binary:
        stream = TextStream(binary)
        if not stream.take("{"):
            raise ContainerError("expected a sampling report: a JSON object with 'model_name' and 'prompts'",
                                 None, 0)
        found_prompts = False
        number = 0
        while not stream.take("}"):
            try:
                key, _text = stream.read_value()
            except (json.JSONDecodeError, RecursionError) as exc:
                raise tail_error(stream, "member", number, exc) from None
            if not isinstance(key, str) or not stream.take(":"):
                raise tail_error(stream, "member", number,
                                 json.JSONDecodeError("Expecting a key and ':'", stream.buf, stream.pos))
            if key == "prompts" and stream.peek() == "[":
                found_prompts = True
                if "model_name" not in ctx.header:
                    ctx.header.update(_header_after_prompts(path))
                yield from iter_array(stream, label="prompt")
            else:
                try:
                    ctx.header[key] = read_element(stream, "member", number).value
                except (json.JSONDecodeError, RecursionError) as exc:
                    raise tail_error(stream, "member", number, exc) from None
            number += 1
            if not stream.take(",") and stream.peek() != "}":
                raise tail_error(stream, "member", number,
                                 json.JSONDecodeError("Expecting ',' or '}'", stream.buf, stream.pos))
        check_end(stream)
    if not found_prompts:
        raise ContainerError("the sampling report has no 'prompts' array, no conversation to read")


def _header_after_prompts(path: Path) -> dict:
    """Top-level members other than ``prompts``; a malformed report yields what was read before the fault."""
    header: dict = {}
    with open_binary(path) as binary:
        stream = TextStream(binary)
        stream.take("{")
        try:
            while stream.peek() and not stream.take("}"):
                key, _text = stream.read_value()
                stream.take(":")
                if key == "prompts" and stream.peek() == "[":
                    for _skipped in iter_array(stream):
                        pass
                else:
                    header[key], _text = stream.read_value()
                if not stream.take(","):
                    break
        except (json.JSONDecodeError, RecursionError, ContainerError):
            pass
    return header


def oasst_sampling(value: Any, pos: str, ctx: Context) -> list[dict]:
    """One row per sampled output: the prompt as the user turn, the output as the answer."""
    entry = need_dict(value, pos)
    prompt = need_str(entry, "prompt")
    generator = ctx.header.get("model_name")
    if generator is not None and not isinstance(generator, str):
        raise RecordError(f"model_name: expected a string, got {kind_of(generator)}")
    parts = []
    for j, result in enumerate(need_list(entry, "results")):
        where = f"results[{j}]"
        result = need_dict(result, where)
        for k, output in enumerate(need_list(result, "outputs", f"{where}.")):
            if not isinstance(output, str):
                raise RecordError(f"{where}.outputs[{k}]: expected a string, got {kind_of(output)}")
            parts.append(part(f":result:{j}:output:{k}", [message("user", prompt), message("assistant", output)],
                              generator=generator))
    if not parts:
        raise RecordError("results: no outputs, no conversation to read")
    return parts
