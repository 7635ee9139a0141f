"""Readers: detection, every format on real shared data, byte-exact provenance, quarantine."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.hashing import row_id
from curation.ingest import SourceConfig
from curation.readers import FORMATS, detect_format, jsonstream, read_file

EXPECTED_FORMATS = {
    "alpaca_eval/outputs": "alpaca_eval_outputs",
    "alpaca_eval/annotations": "alpaca_eval_annotations",
    "oasst/en_30_tree.jsonl": "oasst_tree",
    "oasst/*_sampling.json.gz": "oasst_sampling",
    "hh_rlhf": "hh_rlhf",
    "alpaca": "self_instruct_seed",
    "gpteacher": "alpaca",
    "fastchat/dummy_conversation.json": "sharegpt",
    "fastchat/*_question.jsonl": "question_prompts",
}


def read(path: Path, fmt: str = "auto", batch_size: int = 5000, name: str = "src", **config):
    """All rows and quarantine entries of one file, plus the number of raw records and batches."""
    source = SourceConfig(name=name, path=str(path), format=fmt, **config)
    rows, quarantine, raw, batches = [], [], 0, 0
    for batch in read_file(path, source, path.name, batch_size):
        rows += batch.rows
        quarantine += batch.quarantine
        raw += batch.raw_records
        batches += 1
    return rows, quarantine, raw, batches


def decompressed(path: Path) -> bytes:
    data = path.read_bytes()
    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


def texts(row: dict) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in row["messages"]]


def shared_files(shared_data: Path, pattern: str) -> list[Path]:
    target = shared_data / pattern
    if target.is_dir():
        return sorted(target.iterdir())
    if target.is_file():
        return [target]
    return sorted(shared_data.glob(pattern))


# ----------------------------------------------------------------------- detection

@pytest.mark.parametrize("pattern, expected", EXPECTED_FORMATS.items())
def test_every_shared_file_is_detected(shared_data, pattern, expected):
    files = shared_files(shared_data, pattern)
    assert files
    assert {f.name: detect_format(f) for f in files} == {f.name: expected for f in files}


def test_detection_reads_content_not_names(shared_data, tmp_path):
    # An HH file renamed to .json and decompressed, and a sampling report renamed to .jsonl.
    hh = tmp_path / "conversations.json"
    hh.write_bytes(decompressed(shared_data / "hh_rlhf/harmless_base_1500.jsonl.gz"))
    report = tmp_path / "report.jsonl"
    shutil.copy(next((shared_data / "oasst").glob("*pythia-1b*")), report)
    assert detect_format(hh) == "hh_rlhf"
    assert detect_format(report) == "oasst_sampling"


def test_every_format_has_a_reader():
    assert set(FORMATS) >= {"sharegpt", "openai_messages", "alpaca", "dolly", "self_instruct_seed", "oasst_tree",
                            "oasst_sampling", "hh_rlhf", "alpaca_eval_outputs", "alpaca_eval_annotations",
                            "question_prompts", "parquet"}


# --------------------------------------------------------------- real shared data

def test_alpaca_eval_outputs(shared_data):
    path = shared_data / "alpaca_eval/outputs/claude.json.gz"
    expected = json.loads(decompressed(path))
    rows, quarantine, raw, _ = read(path)
    assert (len(rows), len(quarantine), raw) == (len(expected), 0, 805)
    for row, record in zip(rows, expected):
        assert texts(row) == [("user", record["instruction"]), ("assistant", record["output"])]
    assert {r["generator"] for r in rows} == {"claude"}
    assert rows[7]["source_record"] == "index:7"
    assert rows[7]["id"] == row_id("src", "claude.json.gz", "index:7")
    assert {r["kind"] for r in rows} == {"conversation"}
    assert {r["format"] for r in rows} == {"alpaca_eval_outputs"}


def test_alpaca_eval_empty_answers_are_rows_not_quarantine(shared_data):
    # gemma-2b-it has 22 empty answers (README): a later filter rejects them, the reader keeps them.
    rows, quarantine, _, _ = read(shared_data / "alpaca_eval/outputs/gemma-2b-it.json.gz")
    assert not quarantine
    assert sum(r["messages"][-1]["content"] == "" for r in rows) == 22


def test_alpaca_eval_annotation_ranks(shared_data):
    path = shared_data / "alpaca_eval/annotations/claude.json.gz"
    expected = json.loads(decompressed(path))
    rows, quarantine, _, _ = read(path)
    assert not quarantine and len(rows) == 2 * len(expected)
    first, second = rows[0], rows[1]
    # Checked by hand: index 0 is the Broadway question, preference 1.0518454587 (output_1 won).
    assert first["messages"][0]["content"].startswith("What are the names of some famous actors")
    assert (first["source_record"], second["source_record"]) == ("index:0:output_1", "index:0:output_2")
    assert (first["generator"], second["generator"]) == ("gpt4_1106_preview", "claude")
    assert first["rank_group"] == second["rank_group"] == "claude.json.gz:index:0"
    assert first["rank"] == pytest.approx(0.0518454587) and second["rank"] == pytest.approx(0.9481545413)
    for i, record in enumerate(expected):
        one, two = rows[2 * i], rows[2 * i + 1]
        assert one["messages"][1]["content"] == record["output_1"]
        assert two["messages"][1]["content"] == record["output_2"]
        assert one["rank"] == pytest.approx(record["preference"] - 1)
        assert two["rank"] == pytest.approx(2 - record["preference"])


def test_annotation_preference_edge_cases(tmp_path):
    def record(preference):
        return {"instruction": "q", "output_1": "a", "generator_1": "g1", "output_2": "b", "generator_2": "g2",
                "preference": preference}
    prefs = [1, 2, 1.5, None, float("nan"), "2", True, 3]
    path = tmp_path / "ann.json"
    path.write_text(json.dumps([record(p) for p in prefs]))  # NaN is written as the literal NaN
    rows, quarantine, raw, _ = read(path)
    ranks = [(r["source_record"], r["rank"]) for r in rows]
    assert ranks[:6] == [("index:0:output_1", 0.0), ("index:0:output_2", 1.0),
                         ("index:1:output_1", 1.0), ("index:1:output_2", 0.0),
                         ("index:2:output_1", 0.5), ("index:2:output_2", 0.5)]
    assert [r["rank"] for r in rows[6:]] == [None] * 4  # null and NaN: undecided
    assert [q["line"] for q in quarantine] == [5, 6, 7]
    assert all(q["error"].startswith("preference:") for q in quarantine)
    assert raw == len(rows) // 2 + len(quarantine) == len(prefs)


def test_hh_rlhf_multi_turn_transcript(shared_data):
    path = shared_data / "hh_rlhf/harmless_base_1500.jsonl.gz"
    rows, quarantine, raw, _ = read(path)
    assert (len(rows), len(quarantine), raw) == (3000, 0, 1500)
    chosen, rejected = rows[0], rows[1]
    assert texts(chosen)[:3] == [("user", "what are some pranks with a pen i can do?"),
                                 ("assistant", "Are you looking for practical joke ideas?"),
                                 ("user", "yep")]
    assert [m["role"] for m in chosen["messages"]] == ["user", "assistant"] * 3
    assert chosen["messages"][-1]["content"].startswith("No, sorry!  All of these involve a pen")
    assert rejected["messages"][-1]["content"].startswith("There are lots of funny things you can do with pens")
    assert chosen["messages"][:-1] == rejected["messages"][:-1]
    assert (chosen["source_record"], rejected["source_record"]) == ("line:1:chosen", "line:1:rejected")
    assert chosen["rank_group"] == rejected["rank_group"] == "harmless_base_1500.jsonl.gz:line:1"
    assert (chosen["rank"], rejected["rank"]) == (0.0, 1.0)
    # The transcript round-trips: text is passed through exactly as in the file.
    line = json.loads(decompressed(path).split(b"\n")[0])
    assert "".join(f"\n\n{'Human' if r == 'user' else 'Assistant'}: {c}" for r, c in texts(chosen)) == line["chosen"]


def test_hh_rlhf_text_inside_a_turn_is_not_split(shared_data):
    # Line 21 has answers that start with "Human: " (no blank line before it): they stay inside the turn.
    rows, _, _, _ = read(shared_data / "hh_rlhf/harmless_base_1500.jsonl.gz")
    row = next(r for r in rows if r["source_record"] == "line:21:chosen")
    assert row["messages"][5]["content"].startswith("Human: So she doesn")
    assert [m["role"] for m in row["messages"]] == ["user", "assistant"] * 4


def test_hh_rlhf_unparseable_transcript_quarantines_the_line(tmp_path):
    good = {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"}
    bad = {"chosen": "Human: hi Assistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: no"}
    path = tmp_path / "hh.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in (good, bad, good)) + "\n")
    rows, quarantine, raw, _ = read(path)
    assert [r["source_record"] for r in rows] == ["line:1:chosen", "line:1:rejected",
                                                  "line:3:chosen", "line:3:rejected"]
    assert [(q["line"], q["error"].split(":")[0]) for q in quarantine] == [(2, "chosen")]
    assert raw == 3


def test_self_instruct_seed_tasks(shared_data, tmp_path):
    rows, quarantine, raw, _ = read(shared_data / "alpaca/seed_tasks.jsonl")
    assert (len(rows), len(quarantine), raw) == (175, 0, 175)
    row = rows[1]
    assert row["source_record"] == "line:2:instance:0"
    assert texts(row) == [("user", "What is the relation between the given pairs?\n\nNight : Day :: Right : Left"),
                          ("assistant", "The relation between the given pairs is that they are opposites.")]
    assert not rows[0]["messages"][0]["content"].endswith("\n\n")  # empty input: instruction alone

    path = tmp_path / "seed.jsonl"
    tasks = [{"instruction": "Two examples",
              "instances": [{"input": "a", "output": "A"}, {"input": "", "output": "B"}]},
             {"instruction": "No example", "instances": []}]
    path.write_text("\n".join(json.dumps(t) for t in tasks))
    rows, quarantine, _, _ = read(path, "self_instruct_seed")
    assert [r["source_record"] for r in rows] == ["line:1:instance:0", "line:1:instance:1"]
    assert [q["line"] for q in quarantine] == [2] and "instances: empty" in quarantine[0]["error"]


def test_gpteacher_alpaca_layout_with_response(shared_data):
    path = shared_data / "gpteacher/codegen-instruct.json.gz"
    rows, quarantine, raw, _ = read(path)
    assert (len(rows), len(quarantine), raw) == (4535, 0, 4535)
    assert texts(rows[0])[0] == ("user", "Write a C++ program that calculates the area of a rectangle, given its "
                                         "width and height.\n\nwidth: 5, height: 8")
    assert rows[0]["messages"][1]["content"].startswith("#include <iostream>")
    assert rows[0]["generator"] is None


def test_sharegpt_real(shared_data):
    rows, quarantine, raw, _ = read(shared_data / "fastchat/dummy_conversation.json")
    assert (len(rows), len(quarantine), raw) == (500, 0, 500)
    assert texts(rows[0]) == [("user", "Who are you?"),
                              ("assistant", "I am Vicuna, a language model trained by researchers from Large Model "
                                            "Systems Organization (LMSYS)."),
                              ("user", "Have a nice day!"), ("assistant", "You too!")]


def test_question_files(shared_data):
    rows, quarantine, raw, _ = read(shared_data / "fastchat/mt_bench_question.jsonl")
    assert (len(rows), len(quarantine), raw) == (80, 0, 80)
    assert {r["kind"] for r in rows} == {"prompt"}
    assert [m["role"] for m in rows[0]["messages"]] == ["user", "user"]
    assert rows[0]["messages"][1]["content"] == ("Rewrite your previous response. "
                                                 "Start every sentence with the letter A.")
    rows, quarantine, _, _ = read(shared_data / "fastchat/vicuna_bench_question.jsonl")
    assert len(rows) == 80 and not quarantine and {len(r["messages"]) for r in rows} == {1}


# ------------------------------------------------------------------------ OASST

def test_oasst_tree_threads_and_ranks_hand_checked(shared_data):
    """Tree on line 5, inspected by hand:

    P d297d633 "What isbthe best programing language..."
      A 609a25fc rank 0 -> P 112166e1 (leaf)      row: P,A (trailing prompter trimmed)
      A 2647ee4b rank 1 -> P 2bcc9c62 (leaf)      row: P,A
      A aba187e3 rank 2 -> P 6f0661d2 -> A 233fdf57 (leaf, unranked)   rows: P,A and P,A,P,A
      A 6608e6a0 rank 3 -> P c273d0b4 -> A 34355e23 rank 0, A b6adeb3e rank 1
    """
    rows, quarantine, raw, _ = read(shared_data / "oasst/en_30_tree.jsonl")
    assert not quarantine and raw == 30
    tree = [r for r in rows if r["source_record"].startswith("line:5:")]
    got = {r["source_record"].split(":msg:")[1][:8]: (len(r["messages"]), r["rank"]) for r in tree}
    assert got == {"609a25fc": (2, 0.0), "2647ee4b": (2, 1.0), "aba187e3": (2, 2.0), "233fdf57": (4, None),
                   "6608e6a0": (2, 3.0), "34355e23": (4, 0.0), "b6adeb3e": (4, 1.0)}
    groups = {r["source_record"].split(":msg:")[1][:8]: r["rank_group"] for r in tree}
    assert groups["609a25fc"] == groups["6608e6a0"] == "en_30_tree.jsonl:d297d633-a592-44c4-be0b-7e7e4306cac0:" \
                                                       "d297d633-a592-44c4-be0b-7e7e4306cac0"
    assert groups["34355e23"] == groups["b6adeb3e"] != groups["609a25fc"]
    assert groups["233fdf57"] is None
    deep = next(r for r in tree if ":msg:233fdf57" in r["source_record"])
    assert [m["role"] for m in deep["messages"]] == ["user", "assistant", "user", "assistant"]
    assert deep["messages"][1]["content"].startswith("Javascript is one of the most")
    # Tree 1 is machine-written (chip20b): flagged synthetic, generator from model_name.
    assert {(r["generator"], tuple(r["source_flags"])) for r in rows if r["source_record"].startswith("line:1:")} \
        == {("chip20b", ("synthetic",))}


def test_oasst_tree_rows_match_an_independent_count(shared_data):
    """Every assistant message that is ranked, a leaf, or answered only by prompter leaves gives one row."""
    path = shared_data / "oasst/en_30_tree.jsonl"
    expected = set()

    def walk(msg):
        replies = msg.get("replies", [])
        if msg["role"] == "assistant" and (msg.get("rank") is not None or not replies
                                           or any(not r.get("replies") for r in replies)):
            expected.add(msg["message_id"])
        for reply in replies:
            walk(reply)

    for line in path.read_text().splitlines():
        walk(json.loads(line)["prompt"])
    rows, _, _, _ = read(path)
    ids = [r["source_record"].split(":msg:")[1] for r in rows]
    assert len(ids) == len(set(ids)) == len(expected) == 192
    assert set(ids) == expected


def test_oasst_flags_from_string_booleans(fixtures):
    rows, quarantine, raw, _ = read(fixtures / "readers_oasst_flags.jsonl")
    got = {r["source_record"]: (len(r["messages"]), r["rank"], r["rank_group"], r["source_flags"], r["generator"])
           for r in rows}
    group = "readers_oasst_flags.jsonl:t1:p0"
    assert got == {
        "line:1:msg:a1": (2, 0.0, group, [], None),
        "line:1:msg:a3": (2, 1.0, group, ["synthetic"], "oasst-sft-1"),
        "line:1:msg:a4": (2, 2.0, group, ["deleted"], None),
        "line:1:msg:a6": (4, None, None, ["deleted", "review_failed"], None),
    }
    assert [(q["line"], q["error"]) for q in quarantine] == [
        (2, "tree has no assistant message, no conversation to read"),
        (3, "prompt.replies[0].role: unknown role 'moderator'"),
    ]
    assert raw == 3


def test_oasst_sampling_reports(shared_data):
    for path in sorted((shared_data / "oasst").glob("*_sampling.json.gz")):
        report = json.loads(decompressed(path))
        rows, quarantine, raw, _ = read(path)
        outputs = [(i, j, k, out) for i, p in enumerate(report["prompts"]) for j, r in enumerate(p["results"])
                   for k, out in enumerate(r["outputs"])]
        assert (len(rows), len(quarantine), raw) == (len(outputs), 0, 100)
        assert {r["generator"] for r in rows} == {report["model_name"]}
        for row, (i, j, k, out) in zip(rows, outputs):
            assert row["source_record"] == f"prompt:{i}:result:{j}:output:{k}"
            assert texts(row) == [("user", report["prompts"][i]["prompt"]), ("assistant", out)]


def test_oasst_sampling_with_model_name_after_prompts(tmp_path):
    path = tmp_path / "report.json"
    path.write_text(json.dumps({"prompts": [{"prompt": "Hi", "results": [{"sampling_config": "k50",
                                                                          "outputs": ["Hello", "Hey"]}]}],
                                "model_name": "late/model", "args": {"n": 1}}, indent=2))
    rows, quarantine, _, _ = read(path)
    assert not quarantine and [r["generator"] for r in rows] == ["late/model", "late/model"]


def test_truncated_sampling_report_keeps_the_prompts_before_the_cut(shared_data, tmp_path):
    data = decompressed(next((shared_data / "oasst").glob("*pythia-1b*")))
    report = json.loads(data)
    path = tmp_path / "cut.json"
    path.write_bytes(data[: len(data) // 2])
    rows, quarantine, raw, _ = read(path, "oasst_sampling")
    (tail,) = quarantine
    assert tail["line"] == raw and 10 < raw < 100  # prompts 0..raw-1 kept, the cut one starts the tail
    assert {int(r["source_record"].split(":")[1]) for r in rows} == set(range(raw))
    assert tail["raw"] == data[tail["offset"]: len(data) // 2]
    assert tail["raw"].startswith(b"{")
    assert rows[0]["generator"] == report["model_name"]


# ------------------------------------------------------------- small fixtures

def test_sharegpt_roles(fixtures):
    rows, quarantine, raw, _ = read(fixtures / "readers_sharegpt_roles.json")
    assert raw == 5
    assert texts(rows[0]) == [("system", "You are a terse assistant."), ("user", "Name a prime number."),
                              ("assistant", "7"), ("user", "Another one?"), ("assistant", "11")]
    assert [m["role"] for m in rows[1]["messages"]] == ["system"] + ["user", "assistant"] * 5
    assert rows[1]["generator"] == "bard-2023"  # a top-level `model` names the answering model
    assert rows[2]["source_record"] == "index:3" and rows[2]["kind"] == "prompt"  # no answer yet
    assert [(q["line"], q["error"]) for q in quarantine] == [
        (2, "conversations[1].from: unknown role 'tool'"),
        (4, "conversations[0].value: missing"),
    ]


def test_openai_messages_with_content_parts(fixtures):
    rows, quarantine, raw, _ = read(fixtures / "readers_openai_parts.jsonl")
    assert raw == 5  # the blank line is skipped, not a record
    assert texts(rows[0]) == [("system", "Be brief."), ("user", "Describe this:\na red square"),
                              ("assistant", "A red square.")]
    assert rows[0]["generator"] == "gpt-4o-mini"
    assert texts(rows[1])[0] == ("system", "Use British spelling.") and rows[1]["messages"][2]["content"] == "Colour."
    assert [(q["line"], q["error"]) for q in quarantine] == [
        (4, "messages[0].content[0].type: unsupported part type 'image_url'; only text parts can be read"),
        (5, "messages[1].role: unknown role 'tool'"),
        (6, "messages[1].content: expected a string or a list of parts, got null"),
    ]


def test_dolly(fixtures):
    rows, quarantine, _, _ = read(fixtures / "readers_dolly.jsonl")
    assert detect_format(fixtures / "readers_dolly.jsonl") == "dolly"
    assert texts(rows[0])[0][1].startswith("When did Virgin Australia start operating?\n\nVirgin Australia, the")
    assert texts(rows[1]) == [("user", "Which is a species of fish? Tope or Rope"), ("assistant", "Tope")]
    assert [(q["line"], q["error"]) for q in quarantine] == [(3, "response: expected a string, got number")]


def test_parquet_with_column_mapping(tmp_path):
    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({
        "question": ["What is 1+1?", "Capital of France?", "Unanswered", "Sky colour?"],
        "answer": ["2", "Paris", None, "Blue"],
        "sys": [None, "Be terse.", None, ""],
        "model": ["m1", "m2", "m3", "m4"],
        "uid": ["a", "b", "c", "d"],
        "ignored": [1, 2, 3, 4],
    }), path, row_group_size=2)
    columns = {"prompt": "question", "response": "answer", "system": "sys", "generator": "model", "id": "uid"}
    assert detect_format(path) == "parquet"
    rows, quarantine, raw, batches = read(path, columns=columns, batch_size=1)
    assert raw == 4 and batches >= 3
    assert [r["source_record"] for r in rows] == ["row:0:id:a", "row:1:id:b", "row:3:id:d"]
    assert texts(rows[1]) == [("system", "Be terse."), ("user", "Capital of France?"), ("assistant", "Paris")]
    assert [r["generator"] for r in rows] == ["m1", "m2", "m4"]
    assert {r["format"] for r in rows} == {"parquet"}
    assert rows[0]["source_offset"] is None
    assert [(q["line"], q["error"]) for q in quarantine] == [(2, "answer: expected a string, got null")]
    assert json.loads(quarantine[0]["raw"])["question"] == "Unanswered"


def test_parquet_messages_column_and_bad_mapping(tmp_path):
    path = tmp_path / "chat.parquet"
    pq.write_table(pa.table({"messages": [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
                                          [{"role": "tool", "content": "x"}]]}), path)
    rows, quarantine, _, _ = read(path)  # no mapping: the canonical column names are used
    assert texts(rows[0]) == [("user", "hi"), ("assistant", "yo")]
    assert quarantine[0]["error"] == "messages[0].role: unknown role 'tool'"
    rows, quarantine, raw, _ = read(path, columns={"prompt": "question"})
    assert rows == [] and raw == 0 and len(quarantine) == 1
    assert "'question' (mapped to prompt) not in the file" in quarantine[0]["error"]


def test_generic_json_with_column_mapping(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text('{"q": "Why?", "a": "Because.", "who": "gpt-x"}\n{"q": "How?"}\n')
    rows, quarantine, _, _ = read(path, columns={"prompt": "q", "response": "a", "generator": "who"})
    assert [(r["format"], r["generator"], texts(r)) for r in rows] == [
        ("json", "gpt-x", [("user", "Why?"), ("assistant", "Because.")])]
    assert quarantine[0]["error"] == "a: missing"


# ------------------------------------------------------------ byte positions

def test_raw_readback_jsonl(shared_data):
    path = shared_data / "hh_rlhf/harmless_base_1500.jsonl.gz"
    data = decompressed(path)
    lines = data.split(b"\n")
    rows, _, _, _ = read(path)
    for row in rows:
        number = int(row["source_record"].split(":")[1])
        assert data[row["source_offset"]:row["source_offset"] + row["source_length"]] == lines[number - 1]


def test_raw_readback_json_array_gz_with_non_ascii(shared_data):
    path = shared_data / "alpaca_eval/outputs/Qwen1.5-110B-Chat.json.gz"
    data = decompressed(path)
    expected = json.loads(data)
    assert any(not r["output"].isascii() for r in expected)  # multi-byte text before later elements
    rows, _, _, _ = read(path)
    for row, record in zip(rows, expected, strict=True):
        raw = data[row["source_offset"]:row["source_offset"] + row["source_length"]]
        assert raw[:1] == b"{" and raw[-1:] == b"}"
        assert json.loads(raw) == record
    # Consecutive elements are separated only by a comma and whitespace.
    for a, b in zip(rows, rows[1:]):
        assert data[a["source_offset"] + a["source_length"]:b["source_offset"]].strip() == b","


def test_raw_readback_oasst(shared_data):
    tree_path = shared_data / "oasst/en_30_tree.jsonl"
    data = decompressed(tree_path)
    rows, _, _, _ = read(tree_path)
    for row in rows:
        raw = data[row["source_offset"]:row["source_offset"] + row["source_length"]]
        tree = json.loads(raw)
        message_id = row["source_record"].split(":msg:")[1]
        assert message_id in raw.decode() and tree["message_tree_id"]
    report_path = next((shared_data / "oasst").glob("*pythia-12b*"))
    data = decompressed(report_path)
    report = json.loads(data)
    rows, _, _, _ = read(report_path)
    for row in rows:
        i = int(row["source_record"].split(":")[1])
        raw = data[row["source_offset"]:row["source_offset"] + row["source_length"]]
        assert raw[:1] == b"{" and json.loads(raw) == report["prompts"][i]


# -------------------------------------------------------------------- quarantine

def test_broken_jsonl(fixtures):
    path = fixtures / "readers_broken.jsonl"
    data = path.read_bytes()
    lines = data.split(b"\n")
    rows, quarantine, raw, _ = read(path)
    assert [r["source_record"] for r in rows] == ["line:1", "line:8", "line:10"]
    assert rows[1]["messages"][1]["content"] == "chat \U0001F408"
    assert rows[2]["messages"][1]["content"] == "cat \U0001F408"  # a valid \\ud83d\\udc08 escape pair
    errors = {q["line"]: q["error"] for q in quarantine}
    assert sorted(errors) == [2, 4, 6, 7, 9]
    assert errors[2].startswith("invalid JSON (truncated or malformed)")
    assert errors[4] == "invalid UTF-8 at byte 20 of the record (0xe9); re-encode the file as UTF-8"
    assert errors[6] == "output: expected a string, got number"
    assert errors[7] == "record: expected an object, got array"
    assert "unpaired surrogate" in errors[9]
    for q in quarantine:  # the raw bytes are the line as stored, at its offset
        assert q["raw"] == lines[q["line"] - 1] == data[q["offset"]:q["offset"] + len(q["raw"])]
    assert raw == len(rows) + len(quarantine) == 8  # blank lines 3 and 5 are not records


@pytest.mark.parametrize("compress", [False, True])
def test_broken_json_array(fixtures, tmp_path, compress):
    data = (fixtures / "readers_broken_array.json").read_bytes()
    path = tmp_path / "outputs.bin"
    path.write_bytes(gzip.compress(data) if compress else data)
    rows, quarantine, raw, _ = read(path, "alpaca_eval_outputs")
    assert [(r["source_record"], r["messages"][0]["content"]) for r in rows] == [("index:0", "One"),
                                                                                 ("index:2", "Thr\u00e9e")]
    for row in rows:
        assert json.loads(data[row["source_offset"]:row["source_offset"] + row["source_length"]])["output"]
    bad_utf8, tail = quarantine
    assert bad_utf8["line"] == 1 and bad_utf8["error"].startswith("invalid UTF-8 at byte 19 ")
    assert bad_utf8["raw"] == data[bad_utf8["offset"]:bad_utf8["offset"] + len(bad_utf8["raw"])]
    assert bad_utf8["raw"].startswith(b"{") and b"Tw\xc3o" in bad_utf8["raw"]
    assert tail["line"] == 3 and tail["error"] == (
        "element 3 and everything after it is unreadable (invalid JSON: "
        "Unterminated string starting at byte 290); the ones before it were kept")
    assert tail["raw"] == data[tail["offset"]:] and tail["raw"].startswith(b'{"instruction": "Four"')
    assert raw == 3  # elements 0-2; the malformed tail is one entry


def test_large_array_is_streamed_in_small_chunks(shared_data):
    """Elements longer than a chunk, and chunk borders inside multi-byte characters, keep exact offsets."""
    path = shared_data / "alpaca_eval/outputs/Qwen1.5-110B-Chat.json.gz"
    data = decompressed(path)
    stream = jsonstream.TextStream(jsonstream.open_binary(path), chunk=97)
    records = list(jsonstream.iter_array(stream))
    expected = json.loads(data)
    assert len(records) == len(expected)
    for record, value in zip(records, expected):
        assert record.value == value and data[record.offset:record.offset + record.length] == record.raw


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 8, 13])
def test_chunk_borders_do_not_change_what_is_read(fixtures, tmp_path, chunk):
    """Numbers, strings and malformed tails cut at every possible chunk border read the same."""
    document = '[1, 234, -5.5e10, "caf\u00e9 \u732b", {"a": [1, 22]}, 6789, true, null]'.encode()
    values = [r.value for r in jsonstream.iter_array(jsonstream.TextStream(_bytes_io(document), chunk=chunk))]
    assert values == json.loads(document)
    broken = (fixtures / "readers_broken_array.json").read_bytes()
    stream = jsonstream.TextStream(_bytes_io(broken), chunk=chunk)
    records = []
    with pytest.raises(jsonstream.ContainerError) as failure:
        for record in jsonstream.iter_array(stream):
            records.append(record)
    assert [(r.number, r.error is None) for r in records] == [(0, True), (1, False), (2, True)]
    assert [broken[r.offset:r.offset + r.length] for r in records] == [r.raw for r in records]
    assert failure.value.raw == broken[failure.value.offset:] and failure.value.number == 3


def _bytes_io(data: bytes):
    import io
    return io.BytesIO(data)


@pytest.mark.parametrize("content", [b"", b"  \n\n ", gzip.compress(b""), b"[]"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)
    rows, quarantine, raw, _ = read(path)
    assert rows == [] and raw == 0
    assert [(q["error"], q["raw"]) for q in quarantine] == [("empty file: no records", b"")]


@pytest.mark.parametrize("content", [b"question,answer\nwhy,because\n", b'{"foo": 1}\n{"foo": 2}\n'])
def test_undetectable_format(tmp_path, content):
    path = tmp_path / "mystery.json"
    path.write_bytes(content)
    assert detect_format(path) is None
    rows, quarantine, _, _ = read(path, name="mystery")
    assert rows == [] and len(quarantine) == 1
    assert quarantine[0]["error"] == (f"could not detect the format of {path.resolve()}; "
                                      "set `format:` for source mystery in the recipe")


def test_explicit_wrong_format_quarantines_every_record(shared_data):
    rows, quarantine, raw, _ = read(shared_data / "fastchat/mt_bench_question.jsonl", "sharegpt")
    assert rows == [] and raw == len(quarantine) == 80
    assert {q["error"] for q in quarantine} == {"conversations: missing"}


def test_truncated_gzip_keeps_what_was_read(shared_data, tmp_path):
    data = (shared_data / "hh_rlhf/harmless_base_1500.jsonl.gz").read_bytes()
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(data[: len(data) // 2])
    rows, quarantine, raw, _ = read(path, "hh_rlhf")
    assert 0 < len(rows) < 3000 and quarantine
    assert "corrupt or truncated" in quarantine[-1]["error"]


def test_trailing_garbage_after_array(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('[{"instruction": "x", "output": "y"}] extra')
    rows, quarantine, _, _ = read(path)
    assert len(rows) == 1 and quarantine[0]["error"].startswith("unexpected data after the end")
    assert quarantine[0]["raw"] == b"extra"


def test_pretty_printed_objects_and_bom(tmp_path):
    record = {"conversations": [{"from": "human", "value": "caf\u00e9?"}, {"from": "gpt", "value": "oui"}]}
    path = tmp_path / "one.json"
    body = (json.dumps(record, indent=2, ensure_ascii=False) + "\n" + json.dumps(record, indent=4)).encode()
    path.write_bytes(b"\xef\xbb\xbf" + body)
    rows, quarantine, _, _ = read(path)
    assert not quarantine and [r["source_record"] for r in rows] == ["index:0", "index:1"]
    data = path.read_bytes()
    for row in rows:
        assert json.loads(data[row["source_offset"]:row["source_offset"] + row["source_length"]]) == record


def test_batches_respect_batch_size(shared_data):
    source = SourceConfig(name="s", path="x")
    sizes = [len(b.rows) for b in read_file(shared_data / "hh_rlhf/harmless_base_1500.jsonl.gz", source, "f", 1000)]
    assert sum(sizes) == 3000 and max(sizes) <= 1001 and len(sizes) >= 3


def test_limit_stops_reading(shared_data):
    source = SourceConfig(name="s", path="x")
    batches = list(read_file(shared_data / "hh_rlhf/harmless_base_1500.jsonl.gz", source, "f", 5000, limit=10))
    assert sum(b.raw_records for b in batches) == 10 and sum(len(b.rows) for b in batches) == 20
    assert batches[-1].capped
    exact = list(read_file(shared_data / "fastchat/vicuna_bench_question.jsonl", source, "f", 5000, limit=80))
    assert not exact[-1].capped  # the limit was reached with nothing left to read

