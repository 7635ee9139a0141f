"""What changed between two builds of a dataset, row by row, and why.

Rows are matched by id. An id hashes the source name, the file's path inside the source and
the record's position in the file (``curation.hashing.row_id``): a row keeps its id when the
text at its position is edited, and an added file brings only new ids. Each build says what
became of each row it read: the outputs it is in, or the stage and reason that dropped it
(from lineage/ when the build has one, else from the outputs and rejected/). A row is
*changed* when that status differs, or when its text differs under the same status.

Each difference gets a cause from what differs between the builds: ``input added|removed|
changed`` (the row's own file), ``competition`` (it shares a prompt with rows of a changed
file, or lost to / beat one in dedup or selection), ``config`` (a recipe key of a stage the
row reached in both builds), ``model`` (scorer or embedding model), and when none of those
apply ``input elsewhere`` (some other file changed), ``code`` (package version) or
``unexplained``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from curation.outputs import output_paths
from curation.verify import load_manifest

# Funnel order; "kept" is past every stage. A difference in stage X can only change rows that reached X.
STAGE_ORDER = {"ingest": 0, "normalize": 1, "filter": 2, "dedup": 3, "semantic_dedup": 4, "score": 5, "select": 6,
               "kept": 7}
RECIPE_STAGES = {"normalize": "normalize", "filters": "filter", "dedup": "dedup", "semantic_dedup": "semantic_dedup",
                 "score": "score", "select": "select"}
NO_EFFECT = {"name", "description", "outputs"}       # recipe keys that change no row's fate
NO_EFFECT_KEYS = {"score.cache_dir"}                 # where scores are cached, not what they are
SOURCE_STAGES = {"filters": "filter", "use_for": "select", "license": None}
ROW_COLUMNS = {"id": pl.String, "source": pl.String, "source_file": pl.String, "prompt_id": pl.String,
               "status": pl.String, "stage": pl.String, "competitor": pl.String, "text": pl.UInt64}
BEST_OF = r"of ([0-9a-f]{24})$"                      # select's not_best detail names the winning row
MISSING = "(not recorded)"


class DiffError(ValueError):
    """A build cannot be read for a diff; the message is one line for people."""


@dataclass
class Build:
    out_dir: Path
    manifest: dict
    rows: pl.DataFrame   # ROW_COLUMNS: one row per input row the build read
    lineage: bool


@dataclass
class BuildDiff:
    a: Build
    b: Build
    rows: pl.DataFrame            # one row per added, removed or changed id (see _explain for the columns)
    counts: dict
    files: list[dict]             # input files that were added, removed or changed
    config: list[dict]            # recipe keys that differ: key, a, b, stage
    models: list[dict]            # models that differ: role, a, b, stage
    code: dict | None             # package versions, when they differ
    quarantine: list[dict] = field(default_factory=list)  # per source, when the quarantined counts differ

    def table(self, by: str) -> pl.DataFrame:
        """Counts of added, removed and changed rows per ``source`` or ``cause``."""
        return (self.rows.group_by(by).agg(
            added=(pl.col("change") == "added").sum(), removed=(pl.col("change") == "removed").sum(),
            changed=pl.col("change").is_in(["status", "text"]).sum())
            .sort(["added", "removed", "changed", by], descending=[True, True, True, False]))

    def stage_table(self) -> pl.DataFrame:
        """Per stage: rows added or removed there, and changed rows leaving it (status in A) or entering it (in B)."""
        where = [("added", "added", "stage_b"), ("removed", "removed", "stage_a"),
                 ("status", "changed_from", "stage_a"), ("status", "changed_to", "stage_b"),
                 ("text", "text_changed", "stage_a")]
        long = pl.concat([self.rows.filter(pl.col("change") == change).select(
            pl.col(column).alias("stage"), pl.lit(kind).alias("k")) for change, kind, column in where])
        kinds = [kind for _, kind, _ in where]
        table = long.group_by("stage").agg(**{k: (pl.col("k") == k).sum() for k in kinds})
        return table.sort(pl.col("stage").replace_strict(STAGE_ORDER, default=99, return_dtype=pl.Int32))

    def transitions(self) -> pl.DataFrame:
        return (self.rows.filter(pl.col("change") == "status").group_by("status_a", "status_b", "cause").len()
                .sort(["len", "status_a", "status_b"], descending=[True, False, False]))

    def examples(self, n: int | None) -> dict[str, list[dict]]:
        """Up to ``n`` rows (None: all) per kind of change, in id order (ids are hashes, so a fair sample)."""
        columns = ["id", "source", "source_file", "status_a", "status_b", "cause"]
        out = {}
        for kind in ("added", "removed", "status", "text"):
            picked = self.rows.filter(pl.col("change") == kind).sort("id")
            out[kind] = (picked if n is None else picked.head(n)).select(columns).to_dicts()
        return out

    def to_json(self, rows: int | None = 5) -> dict:
        return {
            "a": _build_info(self.a), "b": _build_info(self.b), "counts": self.counts, "inputs": self.files,
            "config": self.config, "models": self.models, "code": self.code, "quarantine": self.quarantine,
            "by_source": self.table("source").to_dicts(), "by_stage": self.stage_table().to_dicts(),
            "by_cause": self.table("cause").to_dicts(), "transitions": self.transitions().to_dicts(),
            "rows": self.examples(rows),
        }


def _build_info(build: Build) -> dict:
    return {"out": str(build.out_dir), "run_id": build.manifest.get("run_id"), "rows": build.rows.height,
            "lineage": build.lineage}


# ---------------------------------------------------------------- reading a build

def _parts(build_dir: Path, manifest: dict, name: str) -> list[Path]:
    paths = output_paths(build_dir, manifest, name)
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise DiffError(f"{missing[0]} is listed in the manifest but missing; run `curate verify {build_dir}` "
                        "and rebuild")
    return paths


def _read(paths: list[Path], columns: list[str]) -> pl.DataFrame:
    return pl.read_parquet(paths, columns=columns) if paths else pl.DataFrame(schema={c: pl.String for c in columns})


def _texts(build_dir: Path, manifest: dict) -> pl.DataFrame:
    """A hash of each row's text, from the output that holds it (normalised in sft, prompts and preference; raw in
    rejected, as read)."""
    frames = [pl.DataFrame(schema={"id": pl.String, "text": pl.UInt64})]
    sft = _read(_parts(build_dir, manifest, "sft"), ["id", "messages"])
    if sft.height:
        frames.append(sft.select("id", pl.col("messages").hash().alias("text")))
    prompts = _read(_parts(build_dir, manifest, "prompts"), ["id", "prompt"])
    if prompts.height:
        frames.append(prompts.select("id", pl.col("prompt").hash().alias("text")))
    pairs = _read(_parts(build_dir, manifest, "preference"),
                  ["chosen_id", "rejected_id", "prompt", "chosen", "rejected"])
    if pairs.height:
        frames.append(pairs.select(pl.col("chosen_id").alias("id"),
                                   pl.concat_list("prompt", "chosen").hash().alias("text")))
        frames.append(pairs.select(pl.col("rejected_id").alias("id"),
                                   pl.concat_list("prompt", "rejected").hash().alias("text")))
    rejected = _read(_parts(build_dir, manifest, "rejected"), ["id", "messages"])
    if rejected.height:
        frames.append(rejected.select("id", pl.col("messages").hash().alias("text")))
    return pl.concat(frames).unique("id", keep="first", maintain_order=True)


def _competitor(duplicate_of: pl.Expr, reason: pl.Expr, detail: pl.Expr) -> pl.Expr:
    """The row that beat this one: the duplicate it lost to, or the best answer of its prompt."""
    return pl.coalesce(duplicate_of, pl.when(reason == "not_best").then(detail.str.extract(BEST_OF, 1)))


def _rows_from_lineage(build_dir: Path, manifest: dict) -> pl.DataFrame:
    columns = ["id", "source", "source_file", "prompt_id", "outputs", "stage", "reason", "detail", "duplicate_of"]
    lineage = _read(_parts(build_dir, manifest, "lineage"), columns)
    kept = pl.col("stage").is_null()
    return lineage.select(
        "id", "source", "source_file", "prompt_id",
        pl.when(kept).then(pl.lit("kept:") + pl.col("outputs").list.sort().list.join("+"))
        .otherwise(pl.col("stage") + pl.lit(":") + pl.col("reason")).alias("status"),
        pl.when(kept).then(pl.lit("kept")).otherwise(pl.col("stage")).alias("stage"),
        _competitor(pl.col("duplicate_of"), pl.col("reason"), pl.col("detail")).alias("competitor"),
    )


def _rows_from_outputs(build_dir: Path, manifest: dict) -> pl.DataFrame:
    """Without lineage: kept rows from the outputs, dropped rows from rejected/.

    A row kept only in preference/ has no source_file there (and no source when it is the
    rejected side of a scorer pair); ``diff_builds`` fills those from the other build.
    """
    origin = ["id", "source", "source_file", "prompt_id"]
    sft = _read(_parts(build_dir, manifest, "sft"), origin).with_columns(output=pl.lit("sft"))
    prompts = _read(_parts(build_dir, manifest, "prompts"), origin).with_columns(output=pl.lit("prompts"))
    pairs = _read(_parts(build_dir, manifest, "preference"), ["chosen_id", "rejected_id", "prompt_id", "source",
                                                              "pair_source"])
    sides = [pl.DataFrame(schema={**{c: pl.String for c in origin}, "output": pl.String})]
    if pairs.height:
        none = pl.lit(None, dtype=pl.String)
        sides.append(pairs.select(pl.col("chosen_id").alias("id"), "source", none.alias("source_file"), "prompt_id",
                                  output=pl.lit("preference")))
        sides.append(pairs.select(pl.col("rejected_id").alias("id"),
                                  pl.when(pl.col("pair_source") == "native").then(pl.col("source")).alias("source"),
                                  none.alias("source_file"), "prompt_id", output=pl.lit("preference")))
    kept = [f for f in (sft, prompts) if f.height] + sides
    kept = pl.concat([f.select(*origin, "output") for f in kept]).group_by("id").agg(
        *[pl.col(c).drop_nulls().first() for c in origin[1:]],
        (pl.lit("kept:") + pl.col("output").unique().sort().str.join("+")).alias("status"))
    kept = kept.select(*origin, "status", stage=pl.lit("kept"), competitor=pl.lit(None, dtype=pl.String))
    rejected = _read(_parts(build_dir, manifest, "rejected"),
                     ["id", "source", "source_file", "stage", "reason", "detail", "duplicate_of"])
    if rejected.height:
        rejected = rejected.select(
            "id", "source", "source_file", pl.lit(None, dtype=pl.String).alias("prompt_id"),
            (pl.col("stage") + pl.lit(":") + pl.col("reason")).alias("status"), "stage",
            _competitor(pl.col("duplicate_of"), pl.col("reason"), pl.col("detail")).alias("competitor"))
        kept = pl.concat([kept, rejected])
    return kept


def load_build(out_dir: str | Path) -> Build:
    """Every row a build read, with what became of it and a hash of its text."""
    out_dir = Path(out_dir)
    manifest = load_manifest(out_dir)
    lineage = bool(manifest["outputs"].get("lineage"))
    try:
        rows = (_rows_from_lineage if lineage else _rows_from_outputs)(out_dir, manifest)
        rows = rows.join(_texts(out_dir, manifest), on="id", how="left")
    except (pl.exceptions.PolarsError, OSError) as error:
        raise DiffError(f"{out_dir}: cannot read the outputs ({str(error).splitlines()[0]}); run "
                        f"`curate verify {out_dir}`") from None
    rows = rows.select(list(ROW_COLUMNS)).cast(ROW_COLUMNS)
    return Build(out_dir=out_dir, manifest=manifest, rows=rows, lineage=lineage)


# ---------------------------------------------------------------- what differs between the builds

def compare_inputs(a: dict, b: dict) -> list[dict]:
    """Pair up the input files of two manifests (by path, then by source and file name for moved data)."""
    files_a, files_b = list(a["inputs"]), list(b["inputs"])
    by_path = {f["path"]: f for f in files_b}
    pairs, left = [], []
    for f in files_a:
        other = by_path.pop(f["path"], None)
        if other is None:
            left.append(f)
        else:
            pairs.append((f, other))
    name = lambda f: (f.get("source"), Path(f["path"]).name)  # noqa: E731
    right = {}
    for f in by_path.values():
        right.setdefault(name(f), []).append(f)
    for f in left:
        match = right.get(name(f), [])
        pairs.append((f, match.pop()) if len(match) == 1 else (f, None))
    pairs += [(None, f) for group in right.values() for f in group]
    out = []
    for fa, fb in pairs:
        state = ("added" if fa is None else "removed" if fb is None
                 else "unchanged" if fa["sha256"] == fb["sha256"] else "changed")
        one = fa or fb
        out.append({"source": one.get("source"), "path_a": fa and fa["path"], "path_b": fb and fb["path"],
                    "state": state, "sha256_a": fa and fa["sha256"], "sha256_b": fb and fb["sha256"],
                    "rows_a": fa and fa.get("rows"), "rows_b": fb and fb.get("rows"),
                    "quarantined_a": fa and fa.get("quarantined"), "quarantined_b": fb and fb.get("quarantined")})
    return out


def _flatten(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        flat = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: value}


def _recipe_keys(recipe: dict) -> dict:
    """Flat recipe keys, sources by name (so reordering sources is no change)."""
    recipe = dict(recipe)
    sources = {s.get("name", str(i)): s for i, s in enumerate(recipe.pop("sources", []) or [])}
    flat = _flatten(recipe)
    for name, source in sources.items():
        flat.update(_flatten({k: v for k, v in source.items() if k != "name"}, f"sources.{name}"))
        flat[f"sources.{name}"] = "present"
    return flat


def _score_stage(*recipes: dict) -> str:
    """Scores feed select, and dedup too when a recipe keeps the best-scored duplicate."""
    return "dedup" if any((r.get("dedup") or {}).get("keep") == "score" for r in recipes) else "score"


def key_stage(key: str, score_stage: str = "score") -> str | None:
    """The first stage a recipe key acts on (None: it changes no row)."""
    parts = key.split(".")
    if parts[0] == "sources":
        if len(parts) < 3:
            return "ingest"                      # a source added or removed
        return SOURCE_STAGES.get(parts[2], "ingest")
    if parts[0] in NO_EFFECT or key in NO_EFFECT_KEYS:
        return None
    stage = RECIPE_STAGES.get(parts[0], "ingest")  # an unknown key may act anywhere
    return score_stage if stage == "score" else stage


def compare_recipes(a: dict, b: dict) -> list[dict]:
    keys_a, keys_b = _recipe_keys(a), _recipe_keys(b)
    score_stage = _score_stage(a, b)
    # A source in one recipe only is one difference, not one per key of it.
    whole = {k for k in set(keys_a) ^ set(keys_b) if k.count(".") == 1 and k.startswith("sources.")}
    out = []
    for key in sorted(set(keys_a) | set(keys_b)):
        va, vb = keys_a.get(key, MISSING), keys_b.get(key, MISSING)
        if va != vb and not any(key.startswith(w + ".") for w in whole):
            out.append({"key": key, "a": va, "b": vb, "stage": key_stage(key, score_stage)})
    return out


def _model_role(model: dict) -> str:
    return "semantic_dedup" if model.get("name") == "semantic-dedup" or model.get("kind") == "embedding" else "scorer"


def _model_identity(model: dict) -> dict:
    """What makes a model give different results (run statistics such as cluster counts excluded)."""
    return {k: model.get(k) for k in ("kind", "model", "files", "model_hash", "settings", "threshold", "field")}


def compare_models(a: dict, b: dict) -> list[dict]:
    models_a = {_model_role(m): m for m in a.get("models", [])}
    models_b = {_model_role(m): m for m in b.get("models", [])}
    score_stage = _score_stage(a.get("recipe", {}), b.get("recipe", {}))
    out = []
    for role in sorted(set(models_a) | set(models_b)):
        ma, mb = models_a.get(role), models_b.get(role)
        if ma is None or mb is None or _model_identity(ma) != _model_identity(mb):
            describe = lambda m: None if m is None else f"{m.get('name')} ({m.get('model')})"  # noqa: E731
            same_name = ma is not None and mb is not None and describe(ma) == describe(mb)
            out.append({"role": role, "a": describe(ma), "b": describe(mb),
                        "detail": "same name, different weights or settings" if same_name else None,
                        "stage": score_stage if role == "scorer" else "semantic_dedup"})
    return out


# ---------------------------------------------------------------- the diff

def _explain(joined: pl.DataFrame, files: list[dict], config: list[dict], models: list[dict],
             code_changed: bool) -> pl.DataFrame:
    """Add ``change`` and ``cause`` to the rows that differ."""
    state_of = {}
    for f in files:
        for path in (f["path_a"], f["path_b"]):
            if path is not None:
                state_of[path] = f["state"]
    changed_sources = sorted({f["source"] for f in files if f["state"] != "unchanged"})
    inputs_changed = bool(changed_sources)
    file_state = pl.coalesce(pl.col("source_file_b"), pl.col("source_file_a")).replace_strict(
        state_of, default=None, return_dtype=pl.String)
    rows = joined.with_columns(
        pl.coalesce("source_a", "source_b").alias("source"),
        pl.coalesce("source_file_b", "source_file_a").alias("source_file"),
        file_state.alias("file_state"),
        pl.when(pl.col("status_a").is_null()).then(pl.lit("added"))
        .when(pl.col("status_b").is_null()).then(pl.lit("removed"))
        .when(pl.col("status_a") != pl.col("status_b")).then(pl.lit("status"))
        .when(pl.col("text_a") != pl.col("text_b")).then(pl.lit("text"))
        .alias("change"))

    # Rows of changed files, and what they touch: their prompts, and rows they beat or lost to.
    moved = rows.filter(pl.col("file_state").is_in(["added", "removed", "changed"]))
    moved_ids = moved["id"].implode()
    moved_prompts = pl.concat([moved["prompt_id_a"], moved["prompt_id_b"]]).drop_nulls().unique().implode()
    beaten_by_moved = pl.concat([moved["competitor_a"], moved["competitor_b"]]).drop_nulls().unique().implode()
    linked = (pl.col("prompt_id_a").is_in(moved_prompts).fill_null(False)
              | pl.col("prompt_id_b").is_in(moved_prompts).fill_null(False)
              | pl.col("competitor_a").is_in(moved_ids).fill_null(False)
              | pl.col("competitor_b").is_in(moved_ids).fill_null(False)
              | pl.col("id").is_in(beaten_by_moved))

    # How far the row got in both builds: only differences at or before that stage can explain it.
    order = lambda c: pl.col(c).replace_strict(STAGE_ORDER, default=0, return_dtype=pl.Int32)  # noqa: E731
    reach = (pl.when(pl.col("change").is_in(["added", "removed"])).then(0)
             .when(pl.col("change") == "text").then(pl.when(pl.col("stage_a") == "kept").then(1).otherwise(0))
             .otherwise(pl.min_horizontal(order("stage_a"), order("stage_b"))))
    first = lambda items: min((STAGE_ORDER[i["stage"]] for i in items if i["stage"]), default=None)  # noqa: E731
    config_from, model_from = first(config), first(models)
    never = pl.lit(False)
    config_cause = (reach >= config_from) if config_from is not None else never
    model_cause = (reach >= model_from) if model_from is not None else never

    own = pl.when(pl.col("file_state").is_in(["added", "removed", "changed"])).then(
        pl.lit("input ") + pl.col("file_state"))
    if changed_sources:  # no file known for the row (kept only in preference, build without lineage)
        own = own.when(pl.col("file_state").is_null() & pl.col("source").is_in(changed_sources)).then(
            pl.lit("input changed in source"))
    parts = pl.concat_str(
        pl.when(linked).then(pl.lit("competition")), pl.when(config_cause).then(pl.lit("config")),
        pl.when(model_cause).then(pl.lit("model")), separator="+", ignore_nulls=True)
    fallback = ("input elsewhere" if inputs_changed else "code" if code_changed else "unexplained")
    cause = own.otherwise(pl.when(parts != "").then(parts).otherwise(pl.lit(fallback)))
    return rows.filter(pl.col("change").is_not_null()).with_columns(cause.alias("cause")).select(
        "id", "source", "source_file", "change", "status_a", "status_b", "stage_a", "stage_b", "cause")


def diff_builds(out_a: str | Path, out_b: str | Path) -> BuildDiff:
    """Rows added, removed and changed from build A to build B, each with its cause."""
    a, b = load_build(out_a), load_build(out_b)
    # An id names the same record in both builds: fill what one build could not say from the other.
    known = pl.concat([a.rows, b.rows]).group_by("id").agg(
        pl.col(c).drop_nulls().first().alias(f"_{c}") for c in ("source", "source_file", "prompt_id"))
    fill = lambda rows: rows.join(known, on="id", how="left").with_columns(  # noqa: E731
        pl.coalesce(c, f"_{c}").alias(c) for c in ("source", "source_file", "prompt_id")).select(list(ROW_COLUMNS))
    rows_a, rows_b = fill(a.rows), fill(b.rows)
    joined = rows_a.rename(lambda c: c if c == "id" else f"{c}_a").join(
        rows_b.rename(lambda c: c if c == "id" else f"{c}_b"), on="id", how="full", coalesce=True)

    files = compare_inputs(a.manifest, b.manifest)
    config = compare_recipes(a.manifest.get("recipe", {}), b.manifest.get("recipe", {}))
    models = compare_models(a.manifest, b.manifest)
    version = lambda m: (m.get("package") or {}).get("version")  # noqa: E731
    code = ({"a": version(a.manifest), "b": version(b.manifest)}
            if version(a.manifest) != version(b.manifest) else None)
    rows = _explain(joined, files, config, models, code is not None)

    counts = {"rows_a": a.rows.height, "rows_b": b.rows.height,
              **{k: int((rows["change"] == k).sum()) for k in ("added", "removed")},
              "changed_status": int((rows["change"] == "status").sum()),
              "changed_text": int((rows["change"] == "text").sum())}
    counts["unchanged"] = a.rows.height - counts["removed"] - counts["changed_status"] - counts["changed_text"]
    quarantine = {}
    for f in files:
        q = quarantine.setdefault(f["source"], {"source": f["source"], "a": 0, "b": 0})
        q["a"] += f["quarantined_a"] or 0
        q["b"] += f["quarantined_b"] or 0
    diff_files = [f for f in files if f["state"] != "unchanged"]
    for f in diff_files:
        path = f["path_b"] or f["path_a"]
        f["rows_in_diff"] = int((rows["source_file"] == path).sum())
    return BuildDiff(a=a, b=b, rows=rows, counts=counts, files=diff_files, config=config, models=models, code=code,
                     quarantine=[q for q in quarantine.values() if q["a"] != q["b"]])


# ---------------------------------------------------------------- text output

def _short(value, width: int = 48) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= width else text[: width - 1] + "…"


def _table(frame: pl.DataFrame, indent: str = "  ") -> list[str]:
    if frame.is_empty():
        return [indent + "(none)"]
    cells = [[str(c) for c in frame.columns]] + [["" if v is None else str(v) for v in row] for row in frame.rows()]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    align = lambda i, v: v.ljust(widths[i]) if i == 0 else v.rjust(widths[i])  # noqa: E731
    return [indent + "  ".join(align(i, v) for i, v in enumerate(row)).rstrip() for row in cells]


def format_diff(diff: BuildDiff, rows: int | None = 5) -> str:
    c = diff.counts
    lines = [f"diff {diff.a.out_dir} ({c['rows_a']:,} rows{', lineage' if diff.a.lineage else ''}) -> "
             f"{diff.b.out_dir} ({c['rows_b']:,} rows{', lineage' if diff.b.lineage else ''})",
             f"  added {c['added']:,}, removed {c['removed']:,}, changed {c['changed_status'] + c['changed_text']:,} "
             f"({c['changed_status']:,} status, {c['changed_text']:,} text), unchanged {c['unchanged']:,}",
             "", "what differs:"]
    if diff.files:
        for f in diff.files:
            count = lambda n: "-" if n is None else str(n)  # noqa: E731
            rows_ab = f"{count(f['rows_a'])} -> {count(f['rows_b'])} rows"
            lines.append(f"  input {f['state']}: {f['path_b'] or f['path_a']} (source {f['source']}, {rows_ab}, "
                         f"{f['rows_in_diff']} in this diff)")
    else:
        lines.append("  inputs: unchanged")
    for item in diff.config:
        lines.append(f"  config {item['key']}: {_short(item['a'])} -> {_short(item['b'])}"
                     f" ({'acts at ' + item['stage'] if item['stage'] else 'changes no row'})")
    if not diff.config:
        lines.append("  config: unchanged")
    for item in diff.models:
        lines.append(f"  model {item['role']}: {item['a']} -> {item['b']}"
                     + (f" ({item['detail']})" if item["detail"] else ""))
    if not diff.models:
        lines.append("  models: unchanged")
    if diff.code:
        lines.append(f"  code: curation {diff.code['a']} -> {diff.code['b']}")
    for q in diff.quarantine:
        lines.append(f"  quarantined in {q['source']}: {q['a']} -> {q['b']}")
    if diff.rows.is_empty():
        return "\n".join(lines + ["", "no row differs"])
    lines += ["", "by cause:", *_table(diff.table("cause")), "", "by source:", *_table(diff.table("source")),
              "", "by stage (added/removed: where the row ended; changed: status in A -> in B):",
              *_table(diff.stage_table())]
    transitions = diff.transitions()
    if transitions.height:
        lines += ["", "status changes (A -> B):",
                  *_table(transitions.head(15).rename({"status_a": "in A", "status_b": "in B", "len": "rows"}))]
        if transitions.height > 15:
            lines.append(f"  ... {transitions.height - 15} more (--json lists all)")
    if rows != 0:
        for kind, items in diff.examples(rows).items():
            if items:
                label = {"status": "changed (status)", "text": "changed (text, same status)"}.get(kind, kind)
                lines += ["", f"example {label} rows (id, source, status in A -> in B, cause):"]
                lines += [f"  {r['id']}  {r['source']}  {r['status_a'] or '-'} -> {r['status_b'] or '-'}  "
                          f"[{r['cause']}]" for r in items]
    return "\n".join(lines)
