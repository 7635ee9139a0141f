"""benchmarks/reward.py without a model: best-of-n baselines on the real AlpacaEval annotations, and prompt ids."""

import importlib.util
from pathlib import Path

import polars as pl
import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "reward.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("benchmark_reward", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def annotations(bench, shared_data):
    return bench.load_annotations(shared_data / "alpaca_eval" / "annotations")


def test_bestofn_baselines_match_the_issue(bench, annotations):
    """Issue 5 states: random 0.15, longest 0.57, best single (FuseChat-Gemma-2-9B-Instruct) 0.72, oracle 0.89."""
    assert annotations["model"].n_unique() == 37
    assert annotations["instruction"].n_unique() == 805
    figures = bench.bestofn(annotations)
    assert figures["prompts"] == 805
    assert figures["random"] == pytest.approx(0.15, abs=0.01)
    assert figures["longest"] == pytest.approx(0.57, abs=0.01)
    assert figures["best_single_name"] == "FuseChat-Gemma-2-9B-Instruct"
    assert figures["best_single"] == pytest.approx(0.72, abs=0.01)
    # the issue's oracle cannot pick the reference's self-comparison (a tie on every prompt)
    assert figures["oracle_no_reference"] == pytest.approx(0.89, abs=0.01)
    assert figures["oracle"] > figures["oracle_no_reference"]


def test_scorer_selection_picks_the_highest_score_and_never_an_unscored_answer(bench):
    frame = pl.DataFrame({
        "instruction": ["a", "a", "a", "b", "b"],
        "model": ["m1", "m2", "m3", "m1", "m2"],
        "chars": [10, 30, 20, 5, 50],
        "win": [1.0, 0.5, 0.5, 0.0, 1.0],
        "score": [2.0, 1.0, None, None, -3.0],
    })
    figures = bench.bestofn(frame, "score")
    assert figures["scorer"] == pytest.approx(1.0)  # a: m1 (2.0 > 1.0, m3 unscored); b: m2, the only scored one
    assert figures["longest"] == pytest.approx(0.75)  # a: m2 (0.5), b: m2 (1.0)
    assert figures["random"] == pytest.approx((2 / 3 + 0.5) / 2)
    assert figures["best_single_name"] == "m2" and figures["best_single"] == pytest.approx(0.75)


def test_prompt_ids_are_the_pipelines(bench):
    """Values found in out/shared/preference rows built by the pipeline from the same instructions."""
    ids = bench.prompt_ids(["How did US states get their names?",
                            "do you think retinoid is effective on removing the acne? because I have a lot of it"])
    assert ids == ["d48d8bc278c961645e2c67f09e2b851b", "84f2c0bb1385c990a450d555e00461c9"]


def test_pair_accuracy_counts_ties_and_unscored_sides_as_half(bench):
    answer = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731
    pairs = pl.DataFrame({
        "source": ["hh_harmless"] * 4,
        "chosen": [answer("long answer"), answer("a"), answer("same"), answer("xy")],
        "rejected": [answer("short"), answer("longer one"), answer("same"), answer("z")],
        "chosen_score": [1.0, 0.0, 2.0, None],
        "rejected_score": [0.0, 1.0, 2.0, 5.0],
    })
    row = bench.pair_accuracy(pairs).row(0, named=True)
    assert row["pairs"] == 4 and row["unscored"] == 1
    assert row["acc"] == pytest.approx((1 + 0 + 0.5 + 0.5) / 4)
    assert row["len_acc"] == pytest.approx((1 + 0 + 0.5 + 1) / 4)
