"""Language identification engines on real labelled text (benchmarks/data/langid_set.jsonl)."""

from __future__ import annotations

import gzip
import json
import socket
from pathlib import Path

import pytest

from curation import language
from curation.filters import FilterConfig, LanguageRule, filter_records
from curation.normalize import NormalizeConfig, normalize
from curation.language import DEFAULT_ENGINE, ENGINES, UNDETERMINED, detect_languages, normalise_code
from curation.recipe import RecipeError, parse_recipe
from curation.stage import records_frame

SET = Path(__file__).resolve().parent.parent / "benchmarks" / "data" / "langid_set.jsonl"


@pytest.fixture(scope="module")
def labelled() -> list[dict]:
    rows = [json.loads(line) for line in SET.read_text(encoding="utf-8").splitlines()]
    # a fixed spread: every 4th line covers all three sources, short sentences and long paragraphs
    return rows[::4]


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Every engine must work offline: any attempt to open a socket fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("language identification tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_labelled_set_is_real_multilingual_text():
    rows = [json.loads(line) for line in SET.read_text(encoding="utf-8").splitlines()]
    assert len(rows) >= 500 and len({r["lang"] for r in rows}) >= 40
    assert {r["source"].split(":")[0] for r in rows} == {"spacy==3.8.18", "django==5.2.19",
                                                         "shared/data/oasst/en_30_tree.jsonl"}
    lengths = [len(r["text"]) for r in rows]
    assert min(lengths) < 20 and max(lengths) > 1000


@pytest.mark.parametrize("engine", ENGINES)
def test_each_engine_names_real_languages(engine, labelled):
    texts = [r["text"][:1000] for r in labelled]
    codes, probs = detect_languages(texts, engine)
    accuracy = sum(c == r["lang"] for c, r in zip(codes, labelled, strict=True)) / len(labelled)
    assert accuracy >= 0.93, f"{engine}: {accuracy:.3f}"
    assert all(0.0 <= p <= 1.0 for p in probs)
    assert [c for c, r in zip(codes, labelled) if r["source"].endswith("en_30_tree.jsonl")].count("en") >= 25
    # lines of the set: a Chinese Wikipedia sentence, a French headline, a Danish and an Ukrainian sentence
    found, _ = detect_languages(["在联合国、台湾、香港及澳门，通称为“中文”。",
                                 "Apple lance HomePod parce qu'il se sent menacé par l'Echo d'Amazon",
                                 "Apple overvejer at købe et britisk startup for 1 milliard dollar.",
                                 "Де у Києві найсмачніша кава?"], engine)
    assert found == ["zh", "fr", "da", "uk"]


@pytest.mark.parametrize("engine", ENGINES)
def test_engines_are_deterministic_and_mark_texts_without_letters(engine, labelled):
    texts = [r["text"] for r in labelled[:60]] + ["12345 67890", "", "```\n{}\n```", labelled[0]["text"]]
    first = detect_languages(texts, engine)
    assert first == detect_languages(texts, engine)
    codes, probs = first
    assert codes[-4:-1] == [UNDETERMINED] * 3 and probs[-4:-1] == [0.0] * 3
    assert (codes[-1], probs[-1]) == (codes[0], probs[0])  # repeated text, same answer


def test_fasttext_reads_multiline_text_and_the_shipped_model():
    assert language.fasttext_model_path().name == "lid.176.ftz"
    codes, _ = detect_languages(["Ja, ich kann Deutsch sprechen.\nWie kann ich Ihnen helfen?",
                                 "Où es-tu ?\r\nQui est le président de la France ?"], "fasttext")
    assert codes == ["de", "fr"]


def test_codes_are_normalised_across_engines():
    assert [normalise_code(c) for c in ("zh-cn", "zh-tw", "NB", "en", "pt_BR", "iw")] == ["zh", "zh", "no", "en",
                                                                                             "pt", "he"]


def test_filter_uses_the_default_engine(shared_data, monkeypatch):
    import curation.filters as filters

    engines: list[str] = []

    def recording(texts, engine, processes=1):
        engines.append(engine)
        return detect_languages(texts, engine, processes)

    monkeypatch.setattr(filters, "detect_languages", recording)
    assert LanguageRule().engine == DEFAULT_ENGINE
    with gzip.open(shared_data / "alpaca_eval" / "outputs" / "claude-3-5-sonnet-20240620.json.gz") as handle:
        item = json.load(handle)[462]  # a German reply to an English instruction
    frame = records_frame([dict(id="a", messages=[{"role": "user", "content": item["instruction"]},
                                                  {"role": "assistant", "content": item["output"]}],
                                generator=None, source="alpaca_eval", source_file="x.json", source_record="462",
                                source_sha256="0" * 64, format="test", kind="conversation", source_flags=[])])
    frame = normalize(frame, NormalizeConfig()).kept
    assert filter_records(frame, FilterConfig()).rejected["reason"].to_list() == ["language"]
    assert engines == [DEFAULT_ENGINE]
    engines.clear()
    fast = FilterConfig(language=LanguageRule(engine="fasttext", min_confidence=0.5))
    assert filter_records(frame, fast).rejected["reason"].to_list() == ["language"]
    assert engines == ["fasttext"]


def test_unknown_engine_is_a_one_line_config_error():
    with pytest.raises(ValueError, match="unknown language engine 'cld9'; use one of: langdetect, fasttext, lingua"):
        detect_languages(["text"], "cld9")
    recipe = {"name": "t", "sources": [{"name": "a", "path": "a.jsonl"}],
              "filters": {"language": {"engine": "cld9"}}}
    with pytest.raises(RecipeError) as error:
        parse_recipe(recipe)
    message = str(error.value)
    assert "\n" not in message and "filters.language.engine" in message and "fasttext" in message
