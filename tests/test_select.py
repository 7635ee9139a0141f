"""Selection on real rows: best-of-n per prompt, native and score pairs, thresholds."""

import gzip
import json

import polars as pl
import pytest

from curation.hashing import stable_hash
from curation.select import PreferenceSelect, SelectConfig, SftSelect, select
from curation.stage import records_frame


def _row(source, record, messages, generator=None, rank_group=None, rank=None, score=None, kind="conversation"):
    prompt = json.dumps(messages[:-1] if kind == "conversation" else messages)
    return {
        "id": stable_hash(f"{source}:{record}")[:24], "messages": messages,
        "prompt_id": stable_hash(prompt), "content_hash": stable_hash(json.dumps(messages)),
        "generator": generator, "source": source, "source_file": f"/data/{source}", "source_record": record,
        "source_sha256": "0" * 64, "format": "test", "kind": kind, "rank_group": rank_group, "rank": rank,
        "score": score, "answer_chars": len(messages[-1]["content"]),
    }


@pytest.fixture(scope="module")
def alpaca_eval_rows(shared_data):
    """Five prompts answered by four real models; score = a fixed per-model preference order."""
    models = {"gpt4_1106_preview": 0.9, "Meta-Llama-3-8B-Instruct": 0.7, "alpaca-7b_concise": 0.4, "gemma-2b-it": 0.1}
    rows = []
    for model, score in models.items():
        with gzip.open(shared_data / "alpaca_eval" / "outputs" / f"{model}.json.gz", "rt") as handle:
            data = json.load(handle)
        for index in range(5):
            item = data[index]
            messages = [{"role": "user", "content": item["instruction"]},
                        {"role": "assistant", "content": item["output"]}]
            rows.append(_row("alpaca_eval", f"{model}:{index}", messages, generator=model, score=score + index / 100))
    return records_frame(rows)


def test_best_answer_per_prompt_and_rejections_for_the_rest(alpaca_eval_rows):
    result = select(alpaca_eval_rows, alpaca_eval_rows.clear(), SelectConfig())
    assert result.sft.height == 5
    assert set(result.sft["generator"]) == {"gpt4_1106_preview"}
    assert set(result.sft["n_candidates"]) == {4}
    not_best = result.rejected.filter(pl.col("reason") == "not_best")
    assert not_best.height == 15
    assert not_best["detail"].str.contains("below").all()


def test_score_pairs_best_vs_worst_with_margin(alpaca_eval_rows):
    result = select(alpaca_eval_rows, alpaca_eval_rows.clear(), SelectConfig())
    pairs = result.preference
    assert pairs.height == 5
    assert set(pairs["chosen_generator"]) == {"gpt4_1106_preview"}
    assert set(pairs["rejected_generator"]) == {"gemma-2b-it"}
    assert (pairs["chosen_score"] > pairs["rejected_score"]).all()
    first = pairs.row(0, named=True)
    assert first["prompt"][0]["role"] == "user" and first["chosen"][0]["role"] == "assistant"
    strict = select(alpaca_eval_rows, alpaca_eval_rows.clear(),
                    SelectConfig(preference=PreferenceSelect(min_margin=0.9)))
    assert strict.preference.height == 0


def test_all_pairs_above_margin_are_capped_per_prompt(alpaca_eval_rows):
    config = SelectConfig(preference=PreferenceSelect(score_pairs="all_above_margin", min_margin=0.25,
                                                      max_pairs_per_prompt=2))
    pairs = select(alpaca_eval_rows, alpaca_eval_rows.clear(), config).preference
    assert pairs.group_by("prompt_id").len()["len"].max() == 2
    assert ((pairs["chosen_score"] - pairs["rejected_score"]) >= 0.25).all()


def test_min_score_and_top_fraction(alpaca_eval_rows):
    floor = select(alpaca_eval_rows, alpaca_eval_rows.clear(), SelectConfig(sft=SftSelect(min_score=0.925)))
    assert floor.sft.height == 2  # best scores are 0.90..0.94; only 0.93 and 0.94 reach 0.925
    assert floor.rejected.filter(pl.col("reason") == "below_min_score").height == 3
    top = select(alpaca_eval_rows, alpaca_eval_rows.clear(), SelectConfig(sft=SftSelect(top_fraction=0.4)))
    assert top.sft.height == 2
    assert top.sft["score"].min() >= 0.93


def test_native_pairs_from_real_hh_and_ranked_losers_stay_out_of_sft(shared_data):
    rows = []
    with gzip.open(shared_data / "hh_rlhf" / "harmless_base_1500.jsonl.gz", "rt") as handle:
        for line_no, line in zip(range(1, 6), handle):
            record = json.loads(line)
            for side, rank in (("chosen", 0.0), ("rejected", 1.0)):
                turns = [t for t in record[side].split("\n\nHuman: ") if t]
                messages = []
                for turn in turns:
                    human, _, assistant = turn.partition("\n\nAssistant: ")
                    messages.append({"role": "user", "content": human.strip()})
                    messages.append({"role": "assistant", "content": assistant.strip()})
                rows.append(_row("hh", f"line:{line_no}:{side}", messages, rank_group=f"hh:{line_no}", rank=rank))
    frame = records_frame(rows)
    result = select(frame, frame, SelectConfig(preference=PreferenceSelect(from_scores=False)))
    assert result.preference.height == 5
    assert set(result.preference["pair_source"]) == {"native"}
    chosen_ids = set(frame.filter(pl.col("rank") == 0)["id"])
    assert set(result.preference["chosen_id"]) == chosen_ids
    assert set(result.sft["id"]) <= chosen_ids
    assert result.rejected.filter(pl.col("reason") == "ranked_below_sibling").height == 5


def test_native_pairs_skip_near_ties_and_identical_answers():
    user = {"role": "user", "content": "Name a primary colour."}
    rows = [
        _row("judged", "a", [user, {"role": "assistant", "content": "Red."}], rank_group="g1", rank=0.45),
        _row("judged", "b", [user, {"role": "assistant", "content": "Blue."}], rank_group="g1", rank=0.55),
        _row("judged", "c", [user, {"role": "assistant", "content": "Yellow."}], rank_group="g2", rank=0.0),
        _row("judged", "d", [user, {"role": "assistant", "content": "Yellow."}], rank_group="g2", rank=1.0),
    ]
    frame = records_frame(rows)
    result = select(frame, frame, SelectConfig(preference=PreferenceSelect(from_scores=False)))
    assert result.preference.height == 0


def test_prompts_pass_through_and_source_restrictions(alpaca_eval_rows):
    question = _row("mt_bench", "line:1", [{"role": "user", "content": "Compose a travel blog post."}], kind="prompt")
    frame = pl.concat([alpaca_eval_rows, records_frame([question])])
    result = select(frame, frame.clear(), SelectConfig(), sft_sources=set(), prompt_sources={"mt_bench"})
    assert result.prompts.height == 1
    assert result.sft.height == 0
    assert result.rejected.filter(pl.col("reason") == "source_not_for_sft").height == 20
    assert result.preference.height == 5  # preference is still allowed for every source


def test_anchored_pairs_from_real_alpaca_eval_judgements(shared_data):
    """Three models' answers, each judged against the same reference: pairs among the answers, by margin."""
    from curation.ingest import ingest
    from curation.normalize import NormalizeConfig, normalize
    from curation.recipe import SourceConfig

    folder = shared_data / "alpaca_eval" / "annotations"
    models = ["claude-2.1", "alpaca-7b_concise", "FuseChat-Gemma-2-9B-Instruct"]
    sources = [SourceConfig(name=f"judged/{m}", path=str(folder / f"{m}.json.gz"), max_records=6) for m in models]
    pool = normalize(ingest(sources, folder).records, NormalizeConfig()).kept
    config = PreferenceSelect(native=False, from_scores=False, anchored=True, min_anchor_gap=1.0,
                              max_anchored_per_prompt=100)
    result = select(pool, pool, SelectConfig(sft=SftSelect(enabled=False), preference=config))
    pairs = result.preference

    # Expected from the raw judgements: margin = 2 * preference - 3 (1: the model won clearly, -1: lost clearly).
    margins = {}
    for model in models:
        with gzip.open(folder / f"{model}.json.gz", "rt") as handle:
            for item in json.load(handle)[:6]:
                if item["preference"] is not None:
                    margins[(item["instruction"], model)] = 2 * item["preference"] - 3
    expected = {(q, a, b) for (q, a), ma in margins.items() for (q2, b), mb in margins.items()
                if q == q2 and ma - mb >= 1.0}
    got = {(p[0]["content"], c, r) for p, c, r in pairs.select("prompt", "chosen_generator", "rejected_generator").rows()}
    assert got == expected and len(expected) > 0
    assert set(pairs["pair_source"]) == {"anchored"}
    assert "gpt4_1106_preview" not in set(pairs["chosen_generator"]) | set(pairs["rejected_generator"])
    assert result.stats["preference_anchored"] == pairs.height

    capped = select(pool, pool, SelectConfig(sft=SftSelect(enabled=False), preference=config.model_copy(
        update={"max_anchored_per_prompt": 1}))).preference
    assert capped["prompt_id"].value_counts()["count"].max() == 1
    assert set(capped.select("chosen_id", "rejected_id").rows()) <= set(pairs.select("chosen_id", "rejected_id").rows())
