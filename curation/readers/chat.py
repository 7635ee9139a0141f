"""Multi-turn chat layouts: ShareGPT (``conversations[{from, value}]``) and OpenAI ``messages``."""

from __future__ import annotations

from typing import Any

from curation.readers.common import (Context, RecordError, kind_of, message, need_dict, need_list, need_str,
                                     opt_str, part)

SHAREGPT_ROLES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "chatgpt": "assistant", "bard": "assistant", "bing": "assistant",
    "assistant": "assistant", "model": "assistant", "claude": "assistant",
    "system": "system",
}
# 'developer' is the newer OpenAI name for the system role.
OPENAI_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def _leading_system(record: dict, key: str = "system") -> list[dict]:
    system = opt_str(record, key)
    return [message("system", system)] if system else []


def _generator(record: dict) -> str | None:
    """A top-level ``model`` string names the model that answered (LMSYS-style exports)."""
    model = record.get("model")
    return model if isinstance(model, str) and model else None


def sharegpt(value: Any, pos: str, ctx: Context) -> list[dict]:
    record = need_dict(value)
    turns = need_list(record, "conversations")
    messages = _leading_system(record)
    for i, turn in enumerate(turns):
        where = f"conversations[{i}]"
        turn = need_dict(turn, where)
        speaker = need_str(turn, "from", f"{where}.")
        role = SHAREGPT_ROLES.get(speaker.lower())
        if role is None:
            raise RecordError(f"{where}.from: unknown role {speaker!r}")
        messages.append(message(role, need_str(turn, "value", f"{where}.")))
    if not messages:
        raise RecordError("conversations: empty, no conversation to read")
    return [part("", messages, generator=_generator(record))]


def content_text(content: Any, where: str) -> str:
    """A message's content: a string, or a list of parts whose text parts are joined."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise RecordError(f"{where}: expected a string or a list of parts, got {kind_of(content)}")
    texts = []
    for j, item in enumerate(content):
        item_where = f"{where}[{j}]"
        item = need_dict(item, item_where)
        kind = item.get("type", "text")
        if kind != "text":
            raise RecordError(f"{item_where}.type: unsupported part type {kind!r}; only text parts can be read")
        texts.append(need_str(item, "text", f"{item_where}."))
    return "\n".join(texts)


def parse_messages(items: Any, where: str = "messages") -> list[dict]:
    if not isinstance(items, list):
        raise RecordError(f"{where}: expected an array, got {kind_of(items)}")
    messages = []
    for i, item in enumerate(items):
        item_where = f"{where}[{i}]"
        item = need_dict(item, item_where)
        speaker = need_str(item, "role", f"{item_where}.")
        role = OPENAI_ROLES.get(speaker)
        if role is None:
            raise RecordError(f"{item_where}.role: unknown role {speaker!r}")
        if "content" not in item:
            raise RecordError(f"{item_where}.content: missing")
        messages.append(message(role, content_text(item["content"], f"{item_where}.content")))
    return messages


def openai_messages(value: Any, pos: str, ctx: Context) -> list[dict]:
    record = need_dict(value)
    messages = parse_messages(need_list(record, "messages"))
    if not messages:
        raise RecordError("messages: empty, no conversation to read")
    return [part("", messages, generator=_generator(record))]
