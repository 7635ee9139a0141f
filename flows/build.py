"""The Prefect flow that builds a dataset from a recipe: one task per stage.

Runs without a server (Prefect's ephemeral mode) from ``curate build``; the same flow can
be deployed on a Prefect server. Tasks pass Polars frames in memory, so task caching is
off: caching would hash whole tables.
"""

from __future__ import annotations

import os
import platform
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import polars as pl
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from tqdm.auto import tqdm

import curation
from curation import accounting, outputs, runs
from curation.card import write_card
from curation.dedup import deduplicate, index_kept
from curation.filters import filter_records
from curation.ingest import IngestResult, ingest
from curation.lineage import build_lineage
from curation.normalize import normalize
from curation.recipe import Recipe, load_recipe
from curation.record_cache import RecordCaches
from curation.report import write_report
from curation.score import score_records
from curation.score_cache import resolve_cache_dir
from curation.select import Selection, select
from curation.semantic_dedup import semantic_deduplicate
from curation.stage import StageResult

STAGES = ("ingest", "normalize", "filter", "dedup", "score", "select", "write")


def _bar(stage: str, total: int | None, quiet: bool) -> tqdm:
    return tqdm(total=total, desc=f"{stage:>9}", unit="row", disable=quiet, leave=True, dynamic_ncols=True,
                file=sys.stderr)


def _cumulative(bar: tqdm):
    """A progress callback taking running totals (what stages report) for a bar that takes steps."""
    def progress(done: int) -> None:
        bar.update(done - bar.n)
    return progress


def _sft_sources_first(recipe: Recipe) -> list[str]:
    """Dedup priority: a copy from a source that may feed SFT should survive, not one that cannot be selected."""
    return [s.name for s in recipe.sources if "sft" in s.use_for]


@dataclass
class CachedStageResult(StageResult):
    """A stage's result with what its record caches did (cache name -> hits, computed, key folders)."""
    cache: dict | None = None


def _stage_counts(result: StageResult, rows_in: int) -> dict:
    counts = {"in": rows_in, "out": result.kept.height, "dropped": result.rejected.height,
              "dropped_by_reason": result.reasons}
    if isinstance(result, CachedStageResult) and result.cache is not None:
        counts["cache"] = result.cache
    return counts


def _record_caches(cache_root: Path | None) -> RecordCaches | None:
    return RecordCaches(cache_root / "records") if cache_root is not None else None


def _with_stats(result: StageResult, caches: RecordCaches | None) -> CachedStageResult:
    return CachedStageResult(result.kept, result.rejected, result.values,
                             cache=caches.stats() if caches is not None else None)


@task(name="ingest", cache_policy=NO_CACHE)
def ingest_task(recipe: Recipe, base_dir: Path, quiet: bool) -> IngestResult:
    with _bar("ingest", None, quiet) as bar:
        result = ingest(list(recipe.sources), base_dir, progress=_cumulative(bar))
        bar.update(result.records.height - bar.n)
    return result


@task(name="normalize", cache_policy=NO_CACHE)
def normalize_task(records: pl.DataFrame, recipe: Recipe, quiet: bool, cache_root: Path | None = None) -> StageResult:
    caches = _record_caches(cache_root)
    with _bar("normalize", records.height, quiet) as bar:
        result = normalize(records, recipe.normalize, caches)
        bar.update(records.height)
    return _with_stats(result, caches)


@task(name="filter", cache_policy=NO_CACHE)
def filter_task(records: pl.DataFrame, recipe: Recipe, quiet: bool, cache_root: Path | None = None) -> StageResult:
    caches = _record_caches(cache_root)
    with _bar("filter", records.height, quiet) as bar:
        result = filter_records(records, recipe.filters, recipe.filter_overrides() or None, caches)
        bar.update(records.height)
    return _with_stats(result, caches)


@task(name="dedup", cache_policy=NO_CACHE)
def dedup_task(records: pl.DataFrame, recipe: Recipe, quiet: bool, cache_root: Path | None = None,
               input_ids: pl.Series | None = None) -> StageResult:
    """With a cache root: cached MinHash signatures, and dedup against the rows earlier builds of this
    recipe (by name) kept, through the persisted index (``dedup.against_earlier_builds``)."""
    config = recipe.dedup
    if not config.source_priority:
        config = config.model_copy(update={"source_priority": _sft_sources_first(recipe)})
    caches = _record_caches(cache_root)
    with _bar("dedup", records.height, quiet) as bar:
        result = deduplicate(records, config, caches, dataset=recipe.name, input_ids=input_ids)
        bar.update(records.height)
    return _with_stats(result, caches)


@task(name="semantic_dedup", cache_policy=NO_CACHE)
def semantic_dedup_task(records: pl.DataFrame, recipe: Recipe, quiet: bool,
                        cache_root: Path | None = None) -> tuple[StageResult, dict]:
    config = recipe.semantic_dedup
    if config.enabled and not config.source_priority:
        config = config.model_copy(update={"source_priority": _sft_sources_first(recipe), "keep": recipe.dedup.keep})
    caches = _record_caches(cache_root) if config.enabled else None
    with _bar("semantic", records.height, quiet or not config.enabled) as bar:
        result, info = semantic_deduplicate(records, config, cache=caches)
        bar.update(records.height)
    return _with_stats(result, caches), info


@task(name="score", cache_policy=NO_CACHE)
def score_task(candidates: pl.DataFrame, pair_pool: pl.DataFrame, recipe: Recipe, base_dir: Path,
               cache_root: Path | None, quiet: bool):
    """Score the funnel's survivors and the ranked rows native pairs are built from (cached scores are reused)."""
    ranked = pair_pool.filter(pl.col("rank_group").is_not_null())
    to_score = pl.concat([candidates, ranked.join(candidates.select("id"), on="id", how="anti")])
    if recipe.score is None:
        return candidates, pair_pool, None, {}
    cache_dir = resolve_cache_dir(recipe.score.cache_dir, base_dir)
    if recipe.score.cache_dir is None and cache_root is not None:
        cache_dir = cache_root / "scores"
    config = recipe.score.model_copy(update={"cache_dir": None if cache_dir is None else str(cache_dir)})
    with _bar("score", None, quiet) as bar:
        scored, info = score_records(to_score, config, progress=bar.update, on_total=lambda n: bar.reset(total=n))
        bar.update(info.counts["computed"] - bar.n)
    stats = {"distinct_contents": info.counts["distinct"], "cached": info.counts["cached"],
             "computed": info.counts["computed"], "cache_dir": config.cache_dir, "model_hash": info.model_hash}
    scores = scored.select("id", "score", "scorer")
    attach = lambda frame: frame.drop("score", "scorer").join(scores, on="id", how="left")  # noqa: E731
    return attach(candidates), attach(pair_pool), info, stats


@task(name="select", cache_policy=NO_CACHE)
def select_task(candidates: pl.DataFrame, pair_pool: pl.DataFrame, recipe: Recipe, quiet: bool) -> Selection:
    with _bar("select", candidates.height, quiet) as bar:
        selection = select(candidates, pair_pool, recipe.select,
                           sft_sources=recipe.sources_for("sft"),
                           preference_sources=recipe.sources_for("preference"),
                           prompt_sources=recipe.sources_for("prompts"))
        bar.update(candidates.height)
    return selection


@task(name="write", cache_policy=NO_CACHE)
def write_task(out_dir: Path, recipe: Recipe, ingested: IngestResult, selection: Selection,
               settlement: accounting.Settlement, lineage: pl.DataFrame, manifest: dict, quiet: bool) -> dict:
    datasets = {
        "sft": selection.sft,
        "preference": selection.preference,
        "prompts": selection.prompts,
        "rejected": settlement.rejected,
        "quarantine": ingested.quarantine,
        "lineage": lineage,
    }
    with _bar("write", sum(f.height for f in datasets.values()), quiet) as bar:
        files = {}
        for name, frame in datasets.items():
            files[name] = outputs.write_dataset(frame, out_dir, name, recipe.outputs)
            bar.update(frame.height)
    manifest["outputs"] = files
    manifest["conservation"] = accounting.check_outputs(out_dir, manifest)
    manifest["times"]["finished"] = datetime.now(timezone.utc).isoformat()
    outputs.write_json_atomic(manifest, out_dir / "manifest.json")
    return manifest


@task(name="dedup-index", cache_policy=NO_CACHE)
def index_task(kept: pl.DataFrame, recipe: Recipe, cache_root: Path) -> int:
    """Add the rows dedup kept to the persisted index, now that the build passed conservation."""
    return index_kept(kept, recipe.dedup, RecordCaches(cache_root / "records"), recipe.name)


@task(name="document", cache_policy=NO_CACHE)
def document_task(out_dir: Path, manifest: dict) -> list[Path]:
    """The dataset card and the visual report: derived from the finished build, so written after the
    manifest and not listed in it (``curate report OUT_DIR`` rewrites them)."""
    return [write_card(out_dir, manifest), write_report(out_dir, manifest)]


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:8]


def _prefect_ids() -> dict:
    """The flow run (and deployment) this build runs as, so `curate runs` can join Prefect's view with ours."""
    from prefect.runtime import deployment, flow_run

    return {"flow_run_id": flow_run.id, "flow_run_name": flow_run.name, "deployment_id": deployment.id}


@flow(name="build-dataset", log_prints=True)
def build_dataset(recipe: str, out: str | None = None, out_root: str | None = None, if_busy: str = "skip",
                  cache_dir: str | None = None, quiet: bool = False) -> dict:
    """Build the datasets a recipe describes; returns the manifest (or a no-op / skipped status).

    ``out``: write into that folder. ``out_root``: a versioned build into OUT_ROOT/<run_id>/, with
    OUT_ROOT/latest moved there once conservation holds; one build per root at a time (``if_busy``:
    skip or wait), and nothing is built when recipe, inputs, models and code equal the latest build's.
    """
    logger = get_run_logger()
    if (out is None) == (out_root is None):
        raise ValueError("give exactly one of out (a folder) or out_root (versioned builds under one root)")
    if if_busy not in ("skip", "wait"):
        raise ValueError(f"if_busy must be 'skip' or 'wait', not {if_busy!r}")
    recipe_path = Path(recipe)
    parsed, base_dir = load_recipe(recipe_path)
    cache_root = runs.resolve_cache_root(cache_dir, out_root)
    fingerprint = runs.build_fingerprint(parsed, base_dir)
    run_id = new_run_id()
    context = {"prefect": _prefect_ids(), "fingerprint": {"digest": fingerprint.digest, **fingerprint.parts},
               "out_root": None if out_root is None else str(Path(out_root).resolve())}
    if out is not None:
        return _build(parsed, base_dir, recipe_path, Path(out), run_id, cache_root, context, quiet)

    root = Path(out_root).resolve()
    holder = {"run_id": run_id, "pid": os.getpid(), "started": runs.now(), "recipe_path": str(recipe_path.resolve()),
              "flow_run_id": context["prefect"]["flow_run_id"]}
    try:
        with runs.build_lock(root, holder, wait=if_busy == "wait", log=logger.info):
            previous = runs.latest_run(root)
            earlier = (runs.read_json(previous / "manifest.json") or {}) if previous is not None else {}
            if earlier.get("fingerprint", {}).get("digest") == fingerprint.digest:
                logger.info("no-op: recipe, %d input files, models and code are unchanged since build %s; "
                            "nothing to do (latest stays %s)", len(fingerprint.parts["inputs"]),
                            earlier["run_id"], previous)
                runs.write_run_status(root, run_id, **holder, status="no-op", finished=runs.now(),
                                      same_as=earlier["run_id"])
                return {"status": "no-op", "run_id": earlier["run_id"], "out_dir": str(previous),
                        "reason": f"unchanged since build {earlier['run_id']}"}
            if earlier:
                logger.info("rebuilding, changed since build %s: %s", earlier.get("run_id"),
                            "; ".join(runs.changed_parts(earlier.get("fingerprint"), fingerprint.parts)))
            run_dir = runs.new_run_dir(root, run_id)
            runs.write_run_status(root, run_id, **holder, status="running")
            try:
                manifest = _build(parsed, base_dir, recipe_path, run_dir, run_id, cache_root, context, quiet)
            except BaseException as error:
                runs.write_run_status(root, run_id, status="failed", finished=runs.now(),
                                      error=f"{type(error).__name__}: {error}")
                raise
            runs.update_latest(root, run_dir)  # only now: the build passed conservation in write_task
            runs.write_run_status(root, run_id, status="completed", finished=runs.now())
            logger.info("latest -> %s", run_dir)
            return manifest
    except runs.BuildBusy as busy:
        logger.warning("skipped: %s; this run writes nothing (if_busy='wait' queues instead)", busy)
        runs.write_run_status(root, run_id, **holder, status="skipped", finished=runs.now(), reason=str(busy))
        return {"status": "skipped", "run_id": run_id, "reason": str(busy), "holder": busy.holder}


def _build(parsed: Recipe, base_dir: Path, recipe_path: Path, out_dir: Path, run_id: str, cache_root: Path | None,
           context: dict, quiet: bool) -> dict:
    logger = get_run_logger()
    started = time.perf_counter()
    started_at = datetime.now(timezone.utc).isoformat()
    out_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    stage_counts: dict[str, dict] = {}

    def timed(stage: str, fn, *args):
        t0 = time.perf_counter()
        value = fn(*args)
        timings[stage] = round(time.perf_counter() - t0, 3)
        return value

    ingested = timed("ingest", ingest_task, parsed, base_dir, quiet)
    rows = ingested.records
    stage_counts["ingest"] = {"in": rows.height + ingested.quarantine.height, "out": rows.height,
                              "dropped": ingested.quarantine.height,
                              "dropped_by_reason": {"quarantined": ingested.quarantine.height}
                              if ingested.quarantine.height else {}}
    logger.info("ingest: %d rows from %d files, %d quarantined", rows.height, len(ingested.files),
                ingested.quarantine.height)

    normalized = timed("normalize", normalize_task, rows, parsed, quiet, cache_root)
    stage_counts["normalize"] = _stage_counts(normalized, rows.height)
    filtered = timed("filter", filter_task, normalized.kept, parsed, quiet, cache_root)
    stage_counts["filter"] = _stage_counts(filtered, normalized.kept.height)
    score_first = parsed.score is not None and parsed.dedup.keep == "score"
    if score_first:
        # Reward-aware dedup: score every survivor of the filter (each distinct content once),
        # so each duplicate cluster keeps its best-scored member.
        pair_pool, _, scorer, score_stats = timed("score", score_task, filtered.kept, filtered.kept, parsed,
                                                  base_dir, cache_root, quiet)
        deduped = timed("dedup", dedup_task, pair_pool, parsed, quiet, cache_root, rows["id"])
    else:
        deduped = timed("dedup", dedup_task, filtered.kept, parsed, quiet, cache_root, rows["id"])
    stage_counts["dedup"] = _stage_counts(deduped, filtered.kept.height)
    semantic, semantic_model = timed("semantic_dedup", semantic_dedup_task, deduped.kept, parsed, quiet,
                                     cache_root)
    stage_counts["semantic_dedup"] = _stage_counts(semantic, deduped.kept.height)
    if score_first:
        candidates = semantic.kept
    for stage in ("normalize", "filter", "dedup", "semantic_dedup"):
        counts = stage_counts[stage]
        logger.info("%s: %d in, %d out, dropped %s", stage, counts["in"], counts["out"], counts["dropped_by_reason"])

    if not score_first:
        candidates, pair_pool, scorer, score_stats = timed("score", score_task, semantic.kept, filtered.kept, parsed,
                                                           base_dir, cache_root, quiet)
    stage_counts["score"] = {"in": candidates.height, "out": candidates.height, "dropped": 0,
                             "dropped_by_reason": {}, "before_dedup": score_first,
                             "scored": int(candidates["score"].is_not_null().sum()), **score_stats}

    selection = timed("select", select_task, candidates, pair_pool, parsed, quiet)
    stage_rejections = [normalized.rejected, filtered.rejected, deduped.rejected, semantic.rejected, selection.rejected]
    settlement = accounting.settle(
        rows, stage_rejections,
        selection, ingested.quarantine.height, scores=pl.concat([pair_pool.select("id", "score"),
                                                                 candidates.select("id", "score")]))
    # funnel order: a later frame's value wins (see curation.lineage)
    value_frames = [normalized.kept, filtered.kept, *([filtered.values] if filtered.values is not None else []),
                    deduped.kept, semantic.kept, pair_pool, candidates]
    lineage = timed("lineage", build_lineage, rows, value_frames, stage_rejections, selection)
    select_reasons = selection.rejected.group_by("reason").len().sort("reason")
    stage_counts["select"] = {
        "in": candidates.height, "out": selection.sft.height + selection.prompts.height,
        "dropped": selection.rejected.height,
        "dropped_by_reason": dict(zip(select_reasons["reason"].to_list(), select_reasons["len"].to_list())),
        **selection.stats,
        "recovered_by_preference": settlement.recovered_by_preference,
    }

    manifest = {
        "run_id": run_id,
        "status": "completed",
        "out_dir": str(out_dir.resolve()),
        **context,
        "recipe_path": str(recipe_path.resolve()),
        "recipe": parsed.model_dump(mode="json"),
        "inputs": [dict(vars(f)) for f in ingested.files],
        "stages": stage_counts,
        "models": ([scorer.provenance()] if scorer is not None else [])
                  + ([{"name": "semantic-dedup", "kind": "embedding", **semantic_model}] if semantic_model else []),
        "package": {"name": "curation", "version": curation.__version__},
        "environment": {"python": platform.python_version(), "platform": platform.platform(),
                        "polars": pl.__version__, "pid": os.getpid()},
        "times": {"started": started_at, "stage_seconds": timings},
        "counts": settlement.counts,
    }
    manifest = timed("write", write_task, out_dir, parsed, ingested, selection, settlement, lineage, manifest, quiet)
    if cache_root is not None and parsed.dedup.against_earlier_builds:
        indexed = index_task(deduped.kept, parsed, cache_root)
        index_stats = manifest["stages"]["dedup"].get("cache", {}).get("dedup_index")
        if index_stats is not None:
            index_stats["computed"] = indexed
    manifest["times"]["stage_seconds"] = timings
    manifest["times"]["total_seconds"] = round(time.perf_counter() - started, 3)
    outputs.write_json_atomic(manifest, out_dir / "manifest.json")
    t0 = time.perf_counter()
    documents = document_task(out_dir, manifest)
    logger.info("wrote %s in %.1f s", ", ".join(p.name for p in documents), time.perf_counter() - t0)
    counts = manifest["counts"]
    logger.info("build %s: %d input records -> %d kept, %d rejected, %d quarantined; conservation holds",
                run_id, counts["input_records"], counts["kept"], counts["rejected"], counts["quarantined"])
    return manifest
