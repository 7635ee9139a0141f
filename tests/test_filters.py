"""Filter stage on real rows from the shared data: every rule rejects real defects and keeps real good answers."""

from __future__ import annotations

import gzip
import json
import re
from collections import Counter
from pathlib import Path

import polars as pl
import pytest

import curation.filters as filters
from curation.filters import (
    BoilerplateRule,
    FilterConfig,
    LanguageRule,
    RepetitionRule,
    filter_records,
    repetition_stats,
)
from curation.language import detect_languages
from curation.normalize import NormalizeConfig, normalize
from curation.stage import records_frame

OASST_12B = "2023-03-01_theblackcat102_pythia-12b-deduped-sft_sampling.json.gz"
OASST_3B = "2023-03-01_theblackcat102_pythia-3b-deduped-sft_sampling.json.gz"


def row(source: str, record: str, messages: list[tuple[str, str]], kind: str = "conversation",
        generator: str | None = None, flags: list[str] | None = None) -> dict:
    return dict(id=f"{source}:{record}", messages=[{"role": r, "content": c} for r, c in messages],
                generator=generator, source=source, source_file=f"{source}.json", source_record=record,
                source_sha256="0" * 64, format="test", kind=kind, source_flags=flags or [])


def read_json_gz(path: Path):
    with gzip.open(path) as handle:
        return json.load(handle)


def alpaca(shared_data: Path, model: str) -> list[dict]:
    return read_json_gz(shared_data / "alpaca_eval" / "outputs" / f"{model}.json.gz")


def alpaca_rows(shared_data: Path, model: str, indices=None) -> list[dict]:
    data = alpaca(shared_data, model)
    return [row("alpaca_eval", f"{model}:{i}", [("user", data[i]["instruction"]), ("assistant", data[i]["output"])],
                generator=model) for i in (indices if indices is not None else range(len(data)))]


def sampling_row(shared_data: Path, file: str, prompt: int, config: str, k: int) -> dict:
    report = read_json_gz(shared_data / "oasst" / file)
    item = report["prompts"][prompt]
    output = next(r for r in item["results"] if r["sampling_config"] == config)["outputs"][k]
    return row("oasst_sampling", f"{file}:{prompt}:{config}:{k}", [("user", item["prompt"]), ("assistant", output)],
               generator=report["model_name"])


def hh_rows(shared_data: Path, indices) -> list[dict]:
    rows = []
    with gzip.open(shared_data / "hh_rlhf" / "harmless_base_1500.jsonl.gz") as lines:
        for i, line in enumerate(lines):
            if i in indices:
                parts = re.split(r"\n\n(Human|Assistant): ", json.loads(line)["chosen"])
                messages = [("user" if parts[j] == "Human" else "assistant", parts[j + 1])
                            for j in range(1, len(parts) - 1, 2)]
                rows.append(row("hh_harmless", f"{i}:chosen", messages))
    return rows


def prepared(rows: list[dict]) -> pl.DataFrame:
    """Rows as the filter stage sees them: normalised first."""
    result = normalize(records_frame(rows), NormalizeConfig())
    assert result.rejected.is_empty(), result.rejected
    return result.kept


def no_language(**rules) -> FilterConfig:
    return FilterConfig(language=LanguageRule(enabled=False), **rules)


def verdicts(result) -> dict[str, tuple[str, str]]:
    return {r["id"]: (r["reason"], r["detail"]) for r in result.rejected.to_dicts()}


def test_output_contract(shared_data):
    frame = prepared(alpaca_rows(shared_data, "gpt4_0613", range(300, 340)))
    result = filter_records(frame, FilterConfig())
    assert result.kept.schema == frame.schema
    assert result.kept.height + result.rejected.height == frame.height
    assert set(result.kept["id"]) | set(result.rejected["id"]) == set(frame["id"])
    assert set(result.rejected["stage"]) <= {"filter"}
    assert result.kept["id"].to_list() == [i for i in frame["id"] if i in set(result.kept["id"])]  # order kept


def test_refusals_and_ai_disclaimers_are_rejected_with_the_phrase(shared_data):
    rows = (alpaca_rows(shared_data, "gpt4_0613", [296])  # "Sorry, but I can't assist with that."
            + alpaca_rows(shared_data, "claude", [296])  # "I apologize, but I cannot recommend ways to commit ..."
            + alpaca_rows(shared_data, "falcon-40b-instruct", [570]))  # "As an AI language model, I cannot perform ..."
    found = verdicts(filter_records(prepared(rows), no_language()))
    assert found["alpaca_eval:gpt4_0613:296"] == (
        "refusal", "answer opens with a refusal: 'i can't assist with' within its first 300 characters")
    assert found["alpaca_eval:claude:296"][0] == "refusal"
    assert found["alpaca_eval:falcon-40b-instruct:570"] == ("ai_disclaimer",
                                                            "answer contains 'as an ai language model'")


def test_good_answers_with_refusal_like_words_are_kept(shared_data):
    rows = (alpaca_rows(shared_data, "openbuddy-llama2-70b-v10.1", [342])  # monologue: "I can't help but feel ..."
            + alpaca_rows(shared_data, "gpt4_0613", [217, 537])  # templated "In 10 years time" list; emoji-only answer
            + alpaca_rows(shared_data, "gpt-3.5-turbo-0301", [336])  # parody song with a repeated chorus
            + alpaca_rows(shared_data, "Starling-LM-7B-alpha", [409])  # song lyrics, chorus repeated
            + alpaca_rows(shared_data, "minotaur-13b", [563])  # ends with a URL, no full stop
            + alpaca_rows(shared_data, "gpt4_0613_concise", [162]))  # script ending "TO BE CONTINUED..."
    result = filter_records(prepared(rows), FilterConfig())
    assert result.rejected.is_empty(), result.rejected.to_dicts()


def test_language_is_judged_on_the_answer_first(shared_data):
    """The language of a row is the language of what the model learns to write. A French
    translation asked for in English is a French answer (rejected under allow: [en]); English
    answers about a French story in the prompt are English (kept)."""
    translation = alpaca_rows(shared_data, "gpt4_0613", [573])
    story = [r for r in alpaca_rows(shared_data, "gpt4_0613", range(805)) if "Nous n'avons pas de pain" in
             r["messages"][0]["content"]]
    assert story, "the real AlpacaEval prompt quoting a French dialogue"
    found = verdicts(filter_records(prepared(translation + story), FilterConfig()))
    assert found[translation[0]["id"]][0] == "language"
    assert story[0]["id"] not in found


def test_code_strings_are_not_disclaimers(shared_data):
    codegen = read_json_gz(shared_data / "gpteacher" / "codegen-instruct.json.gz")
    hits = [r for r in codegen if "I am an AI language model" in r["response"]]
    assert hits, "the real codegen data has a code answer quoting the phrase in a string literal"
    rows = [row("gpteacher", str(i), [("user", r["instruction"] + "\n\n" + r["input"]), ("assistant", r["response"])])
            for i, r in enumerate(hits)]
    assert filter_records(prepared(rows), no_language()).rejected.is_empty()


def test_truncated_answers(shared_data):
    rows = [sampling_row(shared_data, OASST_12B, 46, "magic_numbers", 0),  # "... directed by James Cameron and"
            sampling_row(shared_data, OASST_3B, 8, "k50", 0)]  # "```python" never closed
    rows += alpaca_rows(shared_data, "guanaco-13b", [232])  # "... or they can be fried, baked, or"
    found = verdicts(filter_records(prepared(rows), no_language()))
    assert found[rows[0]["id"]] == ("ends_mid_sentence", "answer stops mid-sentence: '…was a hit in 1984. "
                                                         "The film is directed by James Cameron and'")
    assert found[rows[1]["id"]] == ("unclosed_code_block", "odd number of ``` fences (1): a code block is never closed")
    assert found[rows[2]["id"]][0] == "ends_mid_sentence"
    # the ellipsis check exists but is off by default: on the shared data every '...' ending was stylistic
    ellipsis = alpaca_rows(shared_data, "gpt4_0613_concise", [162])
    config = no_language(truncation=filters.TruncationRule(trailing_ellipsis=True))
    assert verdicts(filter_records(prepared(ellipsis), config))[ellipsis[0]["id"]][0] == "trailing_ellipsis"


def test_degenerate_repetition(shared_data):
    rows = (alpaca_rows(shared_data, "pythia-12b-mix-sft", [687])  # "- Iconic, iconic, iconic" line after line
            + alpaca_rows(shared_data, "vicuna-7b-v1.3", [623])  # "* Hiroshima" line after line
            + alpaca_rows(shared_data, "alpaca-7b_verbose", [492])  # one paragraph, over and over
            + [sampling_row(shared_data, OASST_12B, 62, "greedy", 0)])  # "Plants are not real.  Plants are not real."
    found = verdicts(filter_records(prepared(rows), no_language()))
    assert {k: v[0] for k, v in found.items()} == {
        "alpaca_eval:pythia-12b-mix-sft:687": "repeated_ngrams",
        "alpaca_eval:vicuna-7b-v1.3:623": "duplicate_lines",
        "alpaca_eval:alpaca-7b_verbose:492": "duplicate_paragraphs",
        rows[3]["id"]: "repeated_ngrams",
    }
    assert found["alpaca_eval:vicuna-7b-v1.3:623"][1].startswith("repeated line fraction 0.")
    # Gopher's web-text thresholds would reject the real song and list answers kept above
    gopher = RepetitionRule(max_duplicate_line_fraction=0.3, max_duplicate_ngram_fraction={5: 0.15, 10: 0.1})
    song = alpaca_rows(shared_data, "gpt-3.5-turbo-0301", [336])
    assert not filter_records(prepared(song), no_language(repetition=gopher)).rejected.is_empty()


def _reference_fractions(text: str) -> dict[str, float]:
    """Plain-Python Gopher n-gram statistics, written independently of the Polars version."""
    words = re.findall(r"[\w']+", text.lower())
    total = sum(map(len, words))
    out = {}
    for n in (2, 3, 4):
        grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
        best = max([c * sum(map(len, g)) for g, c in grams.items() if c > 1], default=0)
        out[f"top{n}_frac"] = min(best / total, 1.0)
    for n in range(5, 11):
        seen, covered = set(), [False] * len(words)
        for i in range(len(words) - n + 1):
            gram = tuple(words[i:i + n])
            if gram in seen:
                covered[i:i + n] = [True] * n
            seen.add(gram)
        out[f"dup{n}_frac"] = sum(len(w) for w, c in zip(words, covered, strict=True) if c) / total
    return out


def test_repetition_statistics_match_a_plain_python_reference(shared_data):
    rows = (alpaca_rows(shared_data, "guanaco-13b", range(0, 800, 5)) + alpaca_rows(shared_data, "phi-2-sft", [624])
            + alpaca_rows(shared_data, "alpaca-7b_verbose", [492]))
    frame = prepared(rows).with_row_index("_row")
    # every n computed everywhere: the pruning bound needs a limit below every possible fraction
    rule = RepetitionRule(max_duplicate_ngram_fraction={n: -1.0 for n in range(5, 11)})
    stats = repetition_stats(filters._texts(frame), rule).join(frame.select("_row", "messages"), on="_row")
    assert stats.height > 100
    for got in stats.to_dicts():
        expected = _reference_fractions(got["messages"][-1]["content"])
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, abs=1e-9), (got["_row"], key)
    # with the default limits, longer n-grams are measured only where dup5 could exceed them
    pruned = repetition_stats(filters._texts(frame), RepetitionRule())
    assert pruned.filter(pl.col("dup10_frac").is_not_null()).height < pruned.height
    assert pruned.filter(pl.col("dup10_frac").is_null())["dup5_frac"].max() <= 0.65


def test_length_rule_on_real_rows(shared_data):
    emoji = alpaca_rows(shared_data, "gpt4_0613", [537])  # "🐱😺🐾🎉🧸🥰": an answer, though without letters
    dots = hh_rows(shared_data, {k for k in range(1500)})
    dots = [r for r in dots if "." in r["messages"][-1]["content"] and r["messages"][-1]["content"].strip(" .") == ""]
    assert dots, "HH has chosen answers made of dots only"
    huge = alpaca_rows(shared_data, "minotaur-13b", [618])  # a 32k-character table that ends in dashes
    found = verdicts(filter_records(prepared(emoji + dots + huge), no_language()))
    assert emoji[0]["id"] not in found
    assert all(found[r["id"]] == ("too_short", "answer has 0 words, fewer than min_answer_words=1") for r in dots)
    assert found[huge[0]["id"]][0] == "too_long"
    assert found[huge[0]["id"]][1].endswith("more than max_answer_chars=24000")


def test_flags(shared_data):
    tree = json.loads((shared_data / "oasst" / "en_30_tree.jsonl").read_text().splitlines()[0])
    prompt, reply = tree["prompt"]["text"], tree["prompt"]["replies"][0]["text"]
    rows = [row("oasst", "deleted", [("user", prompt), ("assistant", reply)], flags=["synthetic", "deleted"]),
            row("oasst", "review", [("user", prompt), ("assistant", reply)], flags=["review_failed"]),
            row("oasst", "synthetic", [("user", prompt), ("assistant", reply)], flags=["synthetic"])]
    result = filter_records(prepared(rows), no_language())
    assert verdicts(result) == {"oasst:deleted": ("flag_deleted", "the source marks this record 'deleted'"),
                                "oasst:review": ("flag_review_failed", "the source marks this record 'review_failed'")}
    assert filter_records(prepared(rows), no_language(flags=filters.FlagRule(reject=[]))).rejected.is_empty()


def test_first_failing_rule_wins_in_the_documented_order(shared_data):
    refusal = alpaca_rows(shared_data, "gpt4_0613", [296])[0]
    refusal["source_flags"] = ["deleted"]  # fails flags and boilerplate: flags come first
    garbage = alpaca_rows(shared_data, "phi-2-sft", [624])[0]  # "instruct, instruct, ...,": truncated and repetitive
    found = verdicts(filter_records(prepared([refusal, garbage]), no_language()))
    assert found[refusal["id"]][0] == "flag_deleted"
    assert found[garbage["id"]][0] == "ends_mid_sentence"
    no_truncation = no_language(truncation=filters.TruncationRule(enabled=False))
    assert verdicts(filter_records(prepared([garbage]), no_truncation))[garbage["id"]][0] == "repeated_ngrams"


def test_language_runs_last_and_only_on_survivors(shared_data, monkeypatch):
    seen: list[str] = []

    def recording(texts, engine, processes=1):
        seen.extend(texts)
        return detect_languages(texts, engine, processes)

    monkeypatch.setattr(filters, "detect_languages", recording)
    rows = (alpaca_rows(shared_data, "vicuna-13b-v1.5", [462])  # "Ja, ich kann Deutsch sprechen. Wie kann ich ..."
            + alpaca_rows(shared_data, "claude-3-5-sonnet-20240620", [462])  # a longer German reply
            + alpaca_rows(shared_data, "gpt4_0613", [296, 0, 1, 2])  # a refusal, then three good answers
            + alpaca_rows(shared_data, "gpt-3.5-turbo-0301", [199]))  # 'Write "Test"' / 'Test.': too short to judge
    langdetect = FilterConfig(language=LanguageRule(engine="langdetect"))
    result = filter_records(prepared(rows), langdetect)
    found = verdicts(result)
    assert found["alpaca_eval:vicuna-13b-v1.5:462"] == ("language",
                                                        "detected 'de' with probability 1.0 (>= 0.9); allowed: en")
    # (langdetect calls claude's German reply with an English translation below 0.9: kept)
    assert found["alpaca_eval:gpt4_0613:296"][0] == "refusal"
    assert len(seen) == 5 and not any("assist with that" in t for t in seen)
    kept = result.kept.select("id", "language", "language_score").rows_by_key("id", unique=True)
    assert all(kept[f"alpaca_eval:gpt4_0613:{i}"][0] == "en" and kept[f"alpaca_eval:gpt4_0613:{i}"][1] > 0.99
               for i in (0, 1, 2))
    assert kept["alpaca_eval:gpt-3.5-turbo-0301:199"] == (None, None)
    # a lower bar turns langdetect's mistakes into rejections: it calls this English maths answer Danish
    eggs = alpaca_rows(shared_data, "OpenHermes-2.5-Mistral-7B", [448])
    assert filter_records(prepared(eggs), langdetect).rejected.is_empty()
    strict = FilterConfig(language=LanguageRule(engine="langdetect", min_confidence=0.5))
    assert verdicts(filter_records(prepared(eggs), strict))[eggs[0]["id"]][0] == "language"
    # The default engine (fastText, threshold 0.5) makes the same calls on these rows.
    default = filter_records(prepared(rows + eggs), FilterConfig())
    found = verdicts(default)
    assert found["alpaca_eval:vicuna-13b-v1.5:462"] == ("language",
                                                        "detected 'de' with probability 0.983 (>= 0.5); allowed: en")
    assert found["alpaca_eval:claude-3-5-sonnet-20240620:462"][0] == "language"
    kept = default.kept.select("id", "language").rows_by_key("id", unique=True)
    assert all(kept[f"alpaca_eval:gpt4_0613:{i}"] == ("en",) for i in (0, 1, 2))
    assert eggs[0]["id"] in kept


def test_language_identification_is_deterministic(shared_data):
    answers = [r["output"][:1000] for r in alpaca(shared_data, "gpt4_1106_preview")[:120]]
    texts = answers + answers[:20] + ["12345 67890", ""]
    first = detect_languages(texts, "langdetect")
    assert first == detect_languages(texts, "langdetect")
    assert first == detect_languages(texts, "langdetect", processes=2)  # worker processes agree
    codes, probs = first
    assert codes[-2:] == ["und", "und"] and probs[-2:] == [0.0, 0.0]
    assert Counter(codes[:120])["en"] >= 118
    with pytest.raises(ValueError, match="unknown language engine"):
        detect_languages(texts, "cld9")


def test_per_source_override_keeps_hh_refusals(shared_data):
    hh = hh_rows(shared_data, {197, 351, 696, 896, 904, 945, 946, 1060})  # chosen answers that politely refuse
    other = alpaca_rows(shared_data, "gpt4_0613", [296])
    frame = prepared(hh + other)
    default = filter_records(frame, no_language())
    assert Counter(reason for reason, _ in verdicts(default).values()) == {"refusal": 9}
    harmless = no_language(boilerplate=BoilerplateRule(refusal=False))
    overridden = filter_records(frame, no_language(), overrides={"hh_harmless": harmless})
    assert set(verdicts(overridden)) == {other[0]["id"]}  # the override touches only its source
    assert overridden.kept["id"].to_list() == [r["id"] for r in hh]


def test_prompt_rows_get_only_language_and_length(shared_data):
    lines = (shared_data / "fastchat" / "mt_bench_question.jsonl").read_text().splitlines()
    questions = [json.loads(line) for line in lines]
    rows = [row("mt_bench", str(q["question_id"]), [("user", t) for t in q["turns"]], kind="prompt") for q in questions]
    rows.append(row("mt_bench", "disclaimer", [("user", "As an AI language model, I'm sorry, but I cannot fulfill "
                                                         "requests that end with the")], kind="prompt"))
    result = filter_records(prepared(rows), FilterConfig())
    assert result.rejected.is_empty()
    assert (result.kept["language"] == "en").sum() >= 75
    tiny = filter_records(prepared([row("p", "x", [("user", "?")], kind="prompt")]), no_language())
    assert verdicts(tiny) == {"p:x": ("too_short", "prompt has 1 characters, fewer than min_prompt_chars=2")}


def test_defaults_on_all_alpaca_eval_outputs(shared_data):
    """Calibration: per-rule rejections of the 54k shared AlpacaEval answers (language excluded: 100 s)."""
    files = sorted((shared_data / "alpaca_eval" / "outputs").glob("*.json.gz"))
    rows = [row("alpaca_eval", f"{f.name}:{i}", [("user", r["instruction"]), ("assistant", r["output"])],
                generator=r["generator"]) for f in files for i, r in enumerate(read_json_gz(f))]
    normalised = normalize(records_frame(rows), NormalizeConfig())
    assert normalised.reasons == {"empty_answer": 29}
    result = filter_records(normalised.kept, no_language())
    assert result.reasons == {"ai_disclaimer": 1003, "duplicate_lines": 31, "duplicate_ngrams": 41,
                              "duplicate_paragraphs": 29, "ends_mid_sentence": 77, "refusal": 91,
                              "repeated_ngrams": 22, "too_long": 2, "too_short": 5, "unclosed_code_block": 138}
    assert result.rejected.height / normalised.kept.height < 0.03
