"""Normalise stage on real rows from the shared data (AlpacaEval, HH-RLHF, MT-bench, a ShareGPT export)."""

from __future__ import annotations

import gzip
import json
import re
import unicodedata
from pathlib import Path

import polars as pl
import pytest

from curation.hashing import stable_hash
from curation.normalize import NormalizeConfig, html_to_markdown, normalize
from curation.stage import records_frame


def row(source: str, record: str, messages: list[tuple[str, str]], kind: str = "conversation",
        generator: str | None = None) -> dict:
    return dict(id=f"{source}:{record}", messages=[{"role": r, "content": c} for r, c in messages],
                generator=generator, source=source, source_file=f"{source}.json", source_record=record,
                source_sha256="0" * 64, format="test", kind=kind, source_flags=[])


def read_json_gz(path: Path):
    with gzip.open(path) as handle:
        return json.load(handle)


def alpaca(shared_data: Path, model: str) -> list[dict]:
    return read_json_gz(shared_data / "alpaca_eval" / "outputs" / f"{model}.json.gz")


def alpaca_rows(shared_data, model: str, indices=None) -> list[dict]:
    data = alpaca(shared_data, model)
    return [row("alpaca_eval", f"{model}:index:{i}",
                [("user", data[i]["instruction"]), ("assistant", data[i]["output"])], generator=model)
            for i in (indices if indices is not None else range(len(data)))]


def hh_messages(transcript: str) -> list[tuple[str, str]]:
    parts = re.split(r"\n\n(Human|Assistant): ", transcript)
    return [("user" if parts[i] == "Human" else "assistant", parts[i + 1]) for i in range(1, len(parts) - 1, 2)]


def hh_line(shared_data, index: int) -> dict:
    with gzip.open(shared_data / "hh_rlhf" / "harmless_base_1500.jsonl.gz") as lines:
        for i, line in enumerate(lines):
            if i == index:
                return json.loads(line)
    raise IndexError(index)


def by_id(frame: pl.DataFrame) -> dict[str, dict]:
    return {r["id"]: r for r in frame.to_dicts()}


def test_every_row_is_kept_or_rejected_and_schema_is_unchanged(shared_data):
    frame = records_frame(alpaca_rows(shared_data, "gemma-2b-it"))
    result = normalize(frame, NormalizeConfig())
    assert result.kept.schema == frame.schema
    assert result.kept.height + result.rejected.height == frame.height
    assert set(result.kept["id"]) | set(result.rejected["id"]) == set(frame["id"])
    assert result.rejected["stage"].unique().to_list() == ["normalize"]
    assert result.kept.select(pl.col("n_turns", "prompt_chars", "answer_chars", "prompt_id", "content_hash")
                              .null_count()).sum_horizontal().item() == 0


def test_real_empty_answers_are_rejected_never_repaired(shared_data):
    # gemma-2b-it has 22 empty answers; oasst-sft-llama-33b 6 answers that are a lone zero-width space
    gemma = normalize(records_frame(alpaca_rows(shared_data, "gemma-2b-it")), NormalizeConfig())
    assert gemma.reasons == {"empty_answer": 22}
    oasst_rows = alpaca_rows(shared_data, "oasst-sft-llama-33b")
    assert sum(r["messages"][1]["content"] == "\u200b" for r in oasst_rows) == 6
    oasst = normalize(records_frame(oasst_rows), NormalizeConfig(drop_empty_turns=True))
    assert oasst.reasons == {"empty_answer": 6}
    assert set(oasst.rejected["id"]) == {f"alpaca_eval:oasst-sft-llama-33b:index:{i}"
                                         for i in (152, 241, 313, 495, 614, 734)}
    assert oasst.rejected["detail"][0] == "final assistant turn (message 2) is empty after normalisation"


def test_decomposed_accents_are_composed(shared_data):
    real = alpaca(shared_data, "gpt4_1106_preview")[254]["instruction"]  # "... by Jean-Claude Devèze"
    decomposed = unicodedata.normalize("NFD", real)
    assert decomposed != real and "e\u0300" in decomposed
    frame = records_frame([row("t", "nfd", [("user", decomposed), ("assistant", "Sure.")])])
    kept = normalize(frame, NormalizeConfig()).kept
    assert kept["messages"][0][0]["content"] == real
    untouched = normalize(frame, NormalizeConfig(unicode_nfc=False)).kept
    assert untouched["messages"][0][0]["content"] == decomposed


def test_whitespace_invisible_and_control_characters(shared_data):
    answer = alpaca(shared_data, "gpt4_0613_verbose")[337]["output"]
    assert re.search(r"[ \t]+\n", answer)  # the real answer has trailing spaces on some lines
    messy = "\ufeff" + answer.replace("\n", "\r\n") + "\u200b\x07 \r\n\r\n\r\n\r\n\r\n\r\nP.S. \u2060done  "
    frame = records_frame([row("t", "ws", [("user", " \n\n Question?\n\n\n\n\n\nMore.  "), ("assistant", messy)])])
    kept = normalize(frame, NormalizeConfig()).kept
    user, assistant = kept["messages"][0]
    assert user["content"] == "Question?\n\n\nMore."  # 5 blank lines collapse to 2
    text = assistant["content"]
    assert not re.search(r"[\r\ufeff\u200b\u2060\x07]", text)
    assert not re.search(r"[ \t]+\n", text)
    assert text.startswith(answer.split("\n")[0].rstrip()) and text.endswith("\n\n\nP.S. done")
    # ASCII art (and code) keeps the indentation of its first line; a lone leading space goes
    art = alpaca_rows(shared_data, "zephyr-7b-alpha-ExPO", [366])
    assert art[0]["messages"][1]["content"].startswith("  _______")
    spaced = alpaca_rows(shared_data, "phi-2-sft", [0])
    assert spaced[0]["messages"][1]["content"].startswith(" ") and not spaced[0]["messages"][1]["content"][1].isspace()
    both = by_id(normalize(records_frame(art + spaced), NormalizeConfig()).kept)
    assert both[art[0]["id"]]["messages"][1]["content"].startswith("  _______  _______\n /")
    assert both[spaced[0]["id"]]["messages"][1]["content"] == spaced[0]["messages"][1]["content"].strip()
    # emoji joiners carry meaning and stay
    family = records_frame([row("t", "zwj", [("user", "Emoji?"), ("assistant", "👨\u200d👩\u200d👧")])])
    assert normalize(family, NormalizeConfig()).kept["messages"][0][1]["content"] == "👨\u200d👩\u200d👧"
    raw = normalize(frame, NormalizeConfig(whitespace=False)).kept["messages"][0][1]["content"]
    assert "\r\n" in raw


def test_sharegpt_html_export_becomes_markdown(fixtures):
    conversation = json.loads((fixtures / "filters_sharegpt_html.json").read_text())[0]
    messages = [("user" if m["from"] == "human" else "assistant", m["value"]) for m in conversation["conversations"]]
    kept = normalize(records_frame([row("sharegpt", "0", messages)]), NormalizeConfig()).kept
    first, last = kept["messages"][0][1]["content"], kept["messages"][0][3]["content"]
    assert "<" not in first and "Copy code" not in first
    assert first.startswith("You can reverse a string in Python with **slicing**. A slice with a step of `-1`")
    code = 'def reverse_string(text):\n    return text[::-1]\n\nprint(reverse_string("hello_world"))'
    assert f"```python\n{code}\n```" in first
    assert "\n1. Use `reversed()` and join the characters:" in first
    assert "\n2. Loop over the characters" in first
    assert last == ("The same slice works for lists: `items[::-1]` returns a new reversed list, while "
                    "`items.reverse()` reverses the list in place and returns `None`.")
    off = normalize(records_frame([row("sharegpt", "0", messages)]), NormalizeConfig(html_to_markdown=False)).kept
    assert off["messages"][0][1]["content"].startswith('<div class="markdown prose')


def test_html_is_converted_only_where_it_is_the_format_not_the_content(shared_data):
    falcon = alpaca_rows(shared_data, "falcon-40b-instruct", [41, 265])  # whole answers rendered as HTML
    modal = alpaca_rows(shared_data, "alpaca-7b_verbose", [409])  # asked for HTML: the HTML is the answer
    gemma = alpaca_rows(shared_data, "gemma-2b-it", [77, 141])  # Markdown opening with <h6>; <br> in a prompt
    rows = by_id(normalize(records_frame(falcon + modal + gemma), NormalizeConfig(whitespace=False)).kept)
    phone = rows["alpaca_eval:falcon-40b-instruct:index:41"]["messages"][1]["content"]
    assert phone.startswith("There are several things you can do to use your phone less:\n\n1. Set limits for yourself")
    assert "<li>" not in phone and "\n2. Disable notifications" in phone
    # cut off inside the markup (ends with "<li>"), still an HTML export
    assert "<li>" not in rows["alpaca_eval:falcon-40b-instruct:index:265"]["messages"][1]["content"]
    for original in modal + gemma:
        assert rows[original["id"]]["messages"] == original["messages"]


def test_html_to_markdown_keeps_code_language_and_drops_buttons():
    html = ('<div class="markdown prose"><pre><div><span>bash</span><button>Copy code</button></div>'
            '<code class="language-bash">ls -la\n</code></pre></div>')
    assert html_to_markdown(html) == "```bash\nls -la\n```"


def test_consecutive_roles_are_merged_on_real_hh_transcripts(shared_data):
    chosen = hh_messages(hh_line(shared_data, 495)["chosen"])
    assert [r for r, _ in chosen] == ["user", "assistant", "assistant", "user", "assistant"]
    frame = records_frame([row("hh", "495:chosen", chosen)])
    kept = normalize(frame, NormalizeConfig()).kept
    merged = kept["messages"][0]
    assert [m["role"] for m in merged] == ["user", "assistant", "user", "assistant"]
    assert merged[1]["content"] == chosen[1][1].strip() + "\n\n" + chosen[2][1].strip()
    assert kept["n_turns"][0] == 4
    strict = normalize(frame, NormalizeConfig(merge_consecutive_roles=False))
    assert strict.reasons == {"role_alternation": 1}
    assert strict.rejected["detail"][0] == "message 3 is a second 'assistant' turn in a row"


def test_role_order_repairs_and_rejections():
    q, a = "What is the capital of France?", "Paris is the capital of France."
    rows = [
        row("t", "leading", [("assistant", "Hello! How can I help?"), ("user", q), ("assistant", a)]),
        row("t", "trailing", [("user", q), ("assistant", a), ("user", "Thanks!")]),
        row("t", "system_late", [("user", q), ("system", "Be brief."), ("assistant", a)]),
        row("t", "system_first", [("system", "Be brief."), ("user", q), ("assistant", a)]),
        row("t", "no_answer", [("user", q)]),
        row("t", "only_assistant", [("assistant", a)]),
        row("t", "empty", []),
        row("t", "bad_role", [("human", q), ("gpt", a)]),
        row("t", "empty_middle", [("user", q), ("assistant", " \n "), ("user", "Well?"), ("assistant", a)]),
        row("t", "blank", [("user", "\u200b"), ("user", " ")]),
    ]
    result = normalize(records_frame(rows), NormalizeConfig())
    kept, why = by_id(result.kept), dict(zip(result.rejected["id"], result.rejected["reason"], strict=True))
    assert [m["role"] for m in kept["t:leading"]["messages"]] == ["user", "assistant"]
    assert [m["content"] for m in kept["t:trailing"]["messages"]] == [q, a]
    assert [m["role"] for m in kept["t:system_first"]["messages"]] == ["system", "user", "assistant"]
    assert kept["t:empty_middle"]["messages"][0]["content"] == q + "\n\nWell?"
    assert why == {"t:system_late": "bad_role_order", "t:no_answer": "no_answer", "t:only_assistant": "no_answer",
                   "t:empty": "empty_conversation", "t:bad_role": "bad_role", "t:blank": "empty_conversation"}
    detail = dict(zip(result.rejected["id"], result.rejected["detail"], strict=True))
    assert detail["t:bad_role"] == "message 1 has role 'human'; roles must be system, user or assistant"
    assert detail["t:system_late"] == "system message at message 2; a system prompt must come first"

    strict = normalize(records_frame(rows[:2]), NormalizeConfig(leading_assistant="reject", trim_trailing_user=False))
    assert strict.reasons == {"bad_role_order": 2}
    no_drop = normalize(records_frame([rows[8]]), NormalizeConfig(drop_empty_turns=False))
    assert no_drop.reasons == {"empty_turn": 1}


def test_prompt_rows_keep_their_user_turns(shared_data):
    lines = (shared_data / "fastchat" / "mt_bench_question.jsonl").read_text().splitlines()
    questions = [json.loads(line) for line in lines]
    rows = [row("mt_bench", str(q["question_id"]), [("user", t) for t in q["turns"]], kind="prompt") for q in questions]
    result = normalize(records_frame(rows), NormalizeConfig())
    assert result.rejected.is_empty()
    first = result.kept.row(0, named=True)
    assert [m["role"] for m in first["messages"]] == ["user", "user"]
    assert first["n_turns"] == 2 and first["answer_chars"] is None
    assert first["prompt_chars"] == sum(len(t) for t in questions[0]["turns"])
    ends_in_answer = row("t", "p", [("user", "Hi"), ("assistant", "Hello")], kind="prompt")
    assert normalize(records_frame([ends_in_answer]), NormalizeConfig()).reasons == {"bad_role_order": 1}


def test_prompt_id_is_shared_by_every_model_answering_an_instruction(shared_data):
    models = ["gpt4_1106_preview", "claude-2.1", "vicuna-7b"]
    frame = records_frame([r for m in models for r in alpaca_rows(shared_data, m, range(50))])
    instructions = alpaca(shared_data, models[0])[:50]
    prompts = records_frame([row("prompts", str(i), [("user", r["instruction"])], kind="prompt")
                             for i, r in enumerate(instructions)])
    kept = normalize(pl.concat([frame, prompts]), NormalizeConfig()).kept
    kept = kept.with_columns(index=pl.col("source_record").str.extract(r"(\d+)$").cast(pl.Int64))
    per_index = kept.group_by("index").agg(pl.col("prompt_id").n_unique(), pl.len())
    assert per_index["prompt_id"].to_list() == [1] * 50 and per_index["len"].to_list() == [4] * 50
    assert kept["prompt_id"].n_unique() == 50
    conversations = kept.filter(pl.col("kind") == "conversation")
    assert conversations["content_hash"].n_unique() == conversations.height
    # answer_chars / prompt_chars measure the normalised text
    one = conversations.row(0, named=True)
    assert one["answer_chars"] == len(one["messages"][-1]["content"])
    assert one["prompt_chars"] == len(one["messages"][0]["content"])


def test_hashes_are_stable_and_unambiguous():
    frame = records_frame([row("t", "a", [("user", "Hi"), ("assistant", "Hello!")]),
                           row("t", "b", [("user", "Hi\nassistant\n6\nHello!")]  # crafted to collide with naive joins
                               + [("assistant", "x")])])
    kept = normalize(frame, NormalizeConfig()).kept
    # role, content length and content per message: this exact value must never change
    assert kept["prompt_id"][0] == stable_hash("user\n2\nHi")
    assert kept["content_hash"][0] == stable_hash("user\n2\nHi\nassistant\n6\nHello!")
    assert kept["content_hash"][1] != kept["content_hash"][0]
    again = normalize(frame, NormalizeConfig()).kept
    assert again.equals(kept)


@pytest.mark.parametrize("kind", [None, "chat"])
def test_bad_kind_is_rejected(kind):
    bad = row("t", "k", [("user", "Hi"), ("assistant", "Hello")])
    frame = records_frame([bad]).with_columns(kind=pl.lit(kind, dtype=pl.String))
    assert normalize(frame, NormalizeConfig()).reasons == {"bad_kind": 1}
