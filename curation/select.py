"""Selection: turn scored rows into the SFT, preference and prompt datasets.

Three kinds of output, each traceable to row ids:

* SFT: the best answer per ``prompt_id`` (highest score; rows that lost a human or
  judge ranking in their ``rank_group`` never compete), then an optional absolute
  score floor and an optional top fraction over prompts.
* Preference pairs from the source's own rankings ("native": OASST sibling ranks,
  HH chosen/rejected, AlpacaEval judgements) and from the scorer ("score": best vs
  worst answer of a prompt, or every pair above a margin).
* Prompt-only rows (benchmark questions) pass through as a prompt dataset.

Every candidate that does not make it into an output is rejected with a reason; a row
that fell out of the SFT funnel may still be kept as one side of a preference pair
(the final disposition is settled in ``curation.accounting``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import polars as pl
from pydantic import BaseModel, ConfigDict, Field

from curation.hashing import hash_column
from curation.stage import empty_rejections, rejections
from schemas import PREFERENCE_SCHEMA, PROMPT_SCHEMA, SFT_SCHEMA

STAGE = "select"


class SftSelect(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = Field(True, description="write an SFT dataset")
    min_score: float | None = Field(None, description="drop best answers scoring below this")
    top_fraction: float | None = Field(None, gt=0, le=1,
                                       description="keep only this fraction of prompts, by best score")
    exclude_ranked_losers: bool = Field(
        True, description="rows ranked below a sibling by a human or judge never enter SFT")


class PreferenceSelect(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = Field(True, description="write a preference dataset")
    native: bool = Field(True, description="pairs from the sources' own rankings")
    native_pairs: Literal["best_vs_rest", "all", "adjacent"] = Field(
        "best_vs_rest", description="which ranked pairs to emit within a rank group")
    min_rank_gap: float = Field(
        0.5, ge=0, description="skip native pairs whose ranks differ by less (AlpacaEval near-ties)")
    anchored: bool = Field(
        False, description="pairs between answers each judged against the same anchor answer (AlpacaEval: every "
                           "model vs one reference): X over Y when X did better against the anchor")
    min_anchor_gap: float = Field(
        1.0, gt=0, description="anchored pairs: X's margin over the anchor must exceed Y's by this (margins run "
                               "from -1, lost clearly, to 1, won clearly: 1.0 pairs clear wins with clear losses)")
    max_anchored_per_prompt: int = Field(
        8, ge=1, description="anchored pairs kept per prompt: a fixed sample (by a hash of both ids) of those that qualify")
    from_scores: bool = Field(True, description="pairs from the scorer within a prompt")
    score_pairs: Literal["best_vs_worst", "all_above_margin"] = Field("best_vs_worst")
    min_margin: float = Field(0.1, ge=0, description="minimum score difference for a score pair")
    max_pairs_per_prompt: int = Field(4, ge=1, description="cap for all_above_margin")


class SelectConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sft: SftSelect = SftSelect()
    preference: PreferenceSelect = PreferenceSelect()
    prompts: bool = Field(True, description="write prompt-only rows (benchmark questions) as a prompt dataset")


@dataclass
class Selection:
    sft: pl.DataFrame          # SFT_SCHEMA
    preference: pl.DataFrame   # PREFERENCE_SCHEMA
    prompts: pl.DataFrame      # PROMPT_SCHEMA
    rejected: pl.DataFrame     # funnel rows that made no output
    stats: dict


def _schema_frame(schema) -> pl.DataFrame:
    return pl.from_arrow(schema.empty_table())


def _ranked_losers(frame: pl.DataFrame) -> pl.Series:
    """True for rows whose rank is worse than the best rank in their rank group."""
    best = pl.col("rank").min().over("rank_group")
    return frame.select(
        (pl.col("rank_group").is_not_null() & pl.col("rank").is_not_null() & (pl.col("rank") > best))
        .fill_null(False)
    ).to_series()


def select_sft(candidates: pl.DataFrame, config: SftSelect) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Best answer per prompt. Returns (chosen rows with n_candidates, rejections)."""
    rejected = [empty_rejections()]
    pool = candidates
    if config.exclude_ranked_losers:
        losers = _ranked_losers(pool)
        rejected.append(rejections(pool.filter(losers), STAGE, "ranked_below_sibling",
                                   detail=pl.format("rank {} in {}", pl.col("rank"), pl.col("rank_group"))))
        pool = pool.filter(~losers)

    # Deterministic order: best score, then better native rank, then longer answer, then id.
    ordered = pool.with_columns(pl.len().over("prompt_id").cast(pl.Int32).alias("n_candidates")).sort(
        ["prompt_id", "score", "rank", "answer_chars", "id"],
        descending=[False, True, False, True, False], nulls_last=True)
    best = ordered.group_by("prompt_id", maintain_order=True).head(1)
    others = ordered.join(best.select("id"), on="id", how="anti")
    rejected.append(rejections(
        others.join(best.select("prompt_id", pl.col("id").alias("best_id"), pl.col("score").alias("best_score")),
                    on="prompt_id"),
        STAGE, "not_best",
        detail=pl.format("score {} below {} of {}", pl.col("score").round(4), pl.col("best_score").round(4),
                         pl.col("best_id"))))

    if config.min_score is not None:
        low = best.filter(pl.col("score").is_null() | (pl.col("score") < config.min_score))
        rejected.append(rejections(low, STAGE, "below_min_score",
                                   detail=pl.format("score {} < {}", pl.col("score").round(4),
                                                    pl.lit(config.min_score))))
        best = best.join(low.select("id"), on="id", how="anti")

    if config.top_fraction is not None and best.height:
        keep_n = max(1, int(round(best.height * config.top_fraction)))
        best = best.sort(["score", "id"], descending=[True, False], nulls_last=True)
        cut = best.slice(keep_n)
        rejected.append(rejections(cut, STAGE, "below_top_fraction",
                                   detail=pl.lit(f"not in the top {config.top_fraction:.0%} of prompts by score")))
        best = best.head(keep_n)
    return best, pl.concat(rejected)


def _pair_rows(chosen: pl.DataFrame, rejected: pl.DataFrame, pair_source: str) -> pl.DataFrame:
    """Build PREFERENCE_SCHEMA rows from aligned chosen/rejected frames (same height, same prompt)."""
    if chosen.is_empty():
        return _schema_frame(PREFERENCE_SCHEMA)
    messages = pl.col("messages")
    left = chosen.select(
        messages.list.head(messages.list.len() - 1).alias("prompt"),
        messages.list.tail(1).alias("chosen"),
        "prompt_id",
        pl.col("id").alias("chosen_id"),
        pl.col("score").alias("chosen_score"),
        pl.col("generator").alias("chosen_generator"),
        "source", "language")
    right = rejected.select(
        messages.list.tail(1).alias("rejected"),
        pl.col("id").alias("rejected_id"),
        pl.col("score").alias("rejected_score"),
        pl.col("generator").alias("rejected_generator"))
    frame = pl.concat([left, right], how="horizontal").with_columns(
        pl.lit(pair_source, dtype=pl.String).alias("pair_source")).select(PREFERENCE_SCHEMA.names)
    return frame.cast(_schema_frame(PREFERENCE_SCHEMA).schema)


def native_pairs(pool: pl.DataFrame, config: PreferenceSelect) -> pl.DataFrame:
    """Pairs from the sources' own rankings, among rows that passed normalise and filter."""
    ranked = _ranked(pool)
    if ranked.is_empty():
        return _schema_frame(PREFERENCE_SCHEMA)
    ranked = ranked.sort(["rank_group", "rank", "id"]).with_columns(
        pl.int_range(pl.len()).over("rank_group").alias("_pos"))
    left = ranked.select(pl.all().name.prefix("c_"))
    right = ranked.select(pl.all().name.prefix("r_"))
    pairs = left.join(right, left_on="c_rank_group", right_on="r_rank_group", how="inner")
    pairs = pairs.filter(
        (pl.col("r_rank") - pl.col("c_rank") >= max(config.min_rank_gap, 1e-9))
        & (pl.col("c_prompt_id") == pl.col("r_prompt_id"))
        & (pl.col("c_content_hash") != pl.col("r_content_hash")))
    if config.native_pairs == "best_vs_rest":
        pairs = pairs.filter(pl.col("c_rank") == pl.col("c_rank").min().over("c_rank_group"))
    elif config.native_pairs == "adjacent":
        pairs = pairs.filter(pl.col("r__pos") == pl.col("c__pos") + 1)
    return _pair_rows(*_sides(pairs.sort(["c_rank_group", "c__pos", "r__pos"])), "native")


def _ranked(pool: pl.DataFrame) -> pl.DataFrame:
    """Conversations a human or judge ranked within a rank group."""
    return pool.filter(pl.col("rank_group").is_not_null() & pl.col("rank").is_not_null()
                       & (pl.col("kind") == "conversation"))


def _sides(pairs: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(chosen, rejected) rows of a self-join whose columns carry 'c_' and 'r_' prefixes."""
    return (pairs.select(pl.col("^c_.*$").name.map(lambda n: n[2:])),
            pairs.select(pl.col("^r_.*$").name.map(lambda n: n[2:])))


def anchored_pairs(pool: pl.DataFrame, config: PreferenceSelect) -> pl.DataFrame:
    """Pairs among answers that were each judged once against a shared anchor answer.

    A judge that compares every answer with one reference (AlpacaEval) ranks them only
    against that reference; a best-of-n scorer must rank them against each other. An
    anchor is an answer (by content hash) that sits in two or more two-answer rank groups
    of one prompt; each other member's margin is the anchor's rank minus its own (1: won
    clearly, -1: lost clearly), and X is preferred to Y when its margin is higher by at
    least ``min_anchor_gap``. Labelled 'anchored': derived from native rankings by
    transitivity through the anchor, not judged head to head.
    """
    ranked = _ranked(pool).filter(pl.len().over("rank_group") == 2)
    if ranked.is_empty():
        return _schema_frame(PREFERENCE_SCHEMA)
    groups_with = pl.col("rank_group").n_unique().over(["prompt_id", "content_hash"])
    anchors = ranked.filter(groups_with >= 2).select(
        "rank_group", pl.col("content_hash").alias("anchor"), pl.col("rank").alias("anchor_rank"))
    judged = (ranked.join(anchors, on="rank_group")
              .filter(pl.col("content_hash") != pl.col("anchor"))
              .with_columns((pl.col("anchor_rank") - pl.col("rank")).alias("margin")))
    left = judged.select(pl.all().name.prefix("c_"))
    right = judged.select(pl.all().name.prefix("r_"))
    pairs = left.join(right, left_on=["c_prompt_id", "c_anchor"], right_on=["r_prompt_id", "r_anchor"],
                      how="inner", coalesce=False)
    pairs = pairs.filter((pl.col("c_margin") - pl.col("r_margin") >= config.min_anchor_gap)
                         & (pl.col("c_content_hash") != pl.col("r_content_hash")))
    # A spread sample, not the widest gaps: those repeat one clear winner against every clear loser.
    order = pl.concat_str("c_id", pl.lit(":"), "r_id").map_batches(hash_column, return_dtype=pl.String)
    pairs = (pairs.with_columns(order.alias("_order")).sort(["c_prompt_id", "_order"])
             .filter(pl.int_range(pl.len()).over("c_prompt_id") < config.max_anchored_per_prompt))
    return _pair_rows(*_sides(pairs), "anchored")


def score_pairs(candidates: pl.DataFrame, config: PreferenceSelect) -> pl.DataFrame:
    """Pairs from scorer margins within each prompt.

    Rows ranked by a human or judge (``rank`` set) are left to native pairs: a scorer must
    not emit a pair that contradicts a human ranking of the same answers.
    """
    scored = candidates.filter(pl.col("score").is_not_null() & (pl.col("kind") == "conversation")
                               & pl.col("rank").is_null())
    if scored.is_empty():
        return _schema_frame(PREFERENCE_SCHEMA)
    ordered = scored.sort(["prompt_id", "score", "id"], descending=[False, True, False]).with_columns(
        pl.int_range(pl.len()).over("prompt_id").alias("_pos"), pl.len().over("prompt_id").alias("_n"))
    if config.score_pairs == "best_vs_worst":
        chosen = ordered.filter(pl.col("_pos") == 0)
        worst = ordered.filter((pl.col("_pos") == pl.col("_n") - 1) & (pl.col("_n") > 1))
        joined = chosen.join(worst, on="prompt_id", suffix="_r")
    else:
        joined = ordered.join(ordered, on="prompt_id", suffix="_r").filter(pl.col("_pos") < pl.col("_pos_r"))
    joined = joined.filter((pl.col("score") - pl.col("score_r") >= config.min_margin)
                           & (pl.col("content_hash") != pl.col("content_hash_r")))
    if config.score_pairs == "all_above_margin":
        joined = (joined.sort(["prompt_id", "_pos", "_pos_r"])
                  .with_columns(pl.int_range(pl.len()).over("prompt_id").alias("_k"))
                  .filter(pl.col("_k") < config.max_pairs_per_prompt))
    joined = joined.sort(["prompt_id", "_pos", "_pos_r"])
    columns = [c for c in candidates.columns]
    chosen = joined.select(columns)
    rejected = joined.select([pl.col(f"{c}_r").alias(c) for c in columns if c != "prompt_id"]
                             + [pl.col("prompt_id")]).select(columns)
    return _pair_rows(chosen, rejected, "score")


def select(candidates: pl.DataFrame, pair_pool: pl.DataFrame, config: SelectConfig,
           sft_sources: set[str] | None = None, preference_sources: set[str] | None = None,
           prompt_sources: set[str] | None = None) -> Selection:
    """Select outputs.

    ``candidates``: rows that survived the funnel (normalise, filter, dedup) and were scored.
    ``pair_pool``: rows that survived normalise and filter (duplicates included, so a native
    pair is not broken because one side also appears elsewhere), with scores where known.
    ``*_sources``: source names allowed in each output (None = all).
    """
    allowed = lambda names: pl.lit(True) if names is None else pl.col("source").is_in(list(names))  # noqa: E731
    rejected = [empty_rejections()]

    prompt_rows = candidates.filter(pl.col("kind") == "prompt")
    conversations = candidates.filter(pl.col("kind") == "conversation")

    if config.prompts:
        prompts_kept = prompt_rows.filter(allowed(prompt_sources))
    else:
        prompts_kept = prompt_rows.clear()
    rejected.append(rejections(prompt_rows.join(prompts_kept.select("id"), on="id", how="anti"),
                               STAGE, "prompts_not_requested"))
    prompts = prompts_kept.select(
        pl.col("messages").alias("prompt"), "id", "prompt_id", "source", "source_file", "source_record",
        "generator", "language").cast(_schema_frame(PROMPT_SCHEMA).schema)

    if config.sft.enabled:
        sft_pool = conversations.filter(allowed(sft_sources))
        rejected.append(rejections(conversations.filter(~allowed(sft_sources)), STAGE, "source_not_for_sft"))
        best, sft_rejected = select_sft(sft_pool, config.sft)
        rejected.append(sft_rejected)
    else:
        best = conversations.clear().with_columns(pl.lit(None, dtype=pl.Int32).alias("n_candidates"))
        rejected.append(rejections(conversations, STAGE, "sft_disabled"))
    sft = best.select(SFT_SCHEMA.names).cast(_schema_frame(SFT_SCHEMA).schema)

    pair_frames = [_schema_frame(PREFERENCE_SCHEMA)]
    if config.preference.enabled:
        if config.preference.native:
            pair_frames.append(native_pairs(pair_pool.filter(allowed(preference_sources)), config.preference))
        if config.preference.anchored:
            pair_frames.append(anchored_pairs(pair_pool.filter(allowed(preference_sources)), config.preference))
        if config.preference.from_scores:
            pair_frames.append(score_pairs(conversations.filter(allowed(preference_sources)), config.preference))
    preference = pl.concat(pair_frames).unique(
        subset=["prompt_id", "chosen_id", "rejected_id"], keep="first", maintain_order=True)

    stats = {
        "sft_rows": sft.height,
        "sft_prompts_competing": conversations.select(pl.col("prompt_id").n_unique()).item() if conversations.height else 0,
        "preference_pairs": preference.height,
        "preference_native": preference.filter(pl.col("pair_source") == "native").height,
        "preference_score": preference.filter(pl.col("pair_source") == "score").height,
        "preference_anchored": preference.filter(pl.col("pair_source") == "anchored").height,
        "prompt_rows": prompts.height,
    }
    return Selection(sft=sft, preference=preference, prompts=prompts, rejected=pl.concat(rejected), stats=stats)
