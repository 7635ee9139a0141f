"""The dataset card: ``OUT_DIR/README.md`` in the Hugging Face format.

Its YAML front matter declares the Parquet outputs as ``datasets`` configs, so
``load_dataset(OUT_DIR, "sft")`` works on the folder as it is and the folder can be pushed to the
Hub unchanged; the body says where the rows came from (sources, licenses, per-stage counts, the
recipe and the models). Everything is read from the manifest and the output files, so the card of
an existing build can be rewritten at any time (``curate report OUT_DIR``).
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
from pathlib import Path

import polars as pl
import yaml

from curation.outputs import output_paths, write_bytes_atomic

CARD_NAME = "README.md"
# Outputs published as `datasets` configs (rejected/ and quarantine/ are audit material, not training data).
CONFIGS = ("sft", "preference", "prompts")
SIZE_CATEGORIES = ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                   (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B"))


def read_manifest(out_dir: str | Path) -> dict:
    path = Path(out_dir) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; pass the output folder of a finished `curate build`")
    return json.loads(path.read_text(encoding="utf-8"))


def output_rows(manifest: dict, name: str) -> int:
    return sum(entry["rows"] for entry in manifest.get("outputs", {}).get(name, []))


def _counts_by_source(paths: list[Path], column: str = "source") -> dict[str, int]:
    if not paths:
        return {}
    counts = pl.scan_parquet(paths).group_by(column).len().collect()
    return {name: n for name, n in counts.iter_rows() if name is not None}


def source_summary(out_dir: str | Path, manifest: dict) -> pl.DataFrame:
    """One row per recipe source: files, records in, quarantined, rejected, kept, SFT rows, pairs, prompts, license.

    Records in = rows parsed + records quarantined; kept = rows in any output (as in the manifest counts).
    """
    out_dir = Path(out_dir)
    inputs = pl.DataFrame(manifest.get("inputs") or [],
                          schema={"source": pl.String, "rows": pl.Int64, "quarantined": pl.Int64})
    per_file = inputs.group_by("source").agg(pl.len().alias("files"), pl.col("rows").sum(),
                                             pl.col("quarantined").sum())
    files = {row["source"]: row for row in per_file.iter_rows(named=True)}
    rejected = _counts_by_source(output_paths(out_dir, manifest, "rejected"))
    sft = _counts_by_source(output_paths(out_dir, manifest, "sft"))
    pairs = _counts_by_source(output_paths(out_dir, manifest, "preference"))
    prompts = _counts_by_source(output_paths(out_dir, manifest, "prompts"))
    rows = []
    for source in manifest["recipe"]["sources"]:
        name = source["name"]
        read = files.get(name, {"files": 0, "rows": 0, "quarantined": 0})
        rows.append({
            "source": name, "files": read["files"], "records_in": read["rows"] + read["quarantined"],
            "quarantined": read["quarantined"], "rejected": rejected.get(name, 0),
            "kept": read["rows"] - rejected.get(name, 0), "sft_rows": sft.get(name, 0),
            "preference_pairs": pairs.get(name, 0), "prompt_rows": prompts.get(name, 0),
            "license": source.get("license"),
        })
    return pl.DataFrame(rows, schema={"source": pl.String, "files": pl.Int64, "records_in": pl.Int64,
                                      "quarantined": pl.Int64, "rejected": pl.Int64, "kept": pl.Int64,
                                      "sft_rows": pl.Int64, "preference_pairs": pl.Int64, "prompt_rows": pl.Int64,
                                      "license": pl.String})


def license_metadata(summary: pl.DataFrame) -> dict:
    """The card's license keys, from the licenses of the sources that contributed kept rows.

    One license for all: that id. Several (or some sources without one): ``other`` with
    ``license_name: mixed`` and the per-source list in ``license_details``. None at all: ``unknown``.
    """
    contributing = summary.filter(pl.col("kept") > 0)
    if contributing.is_empty():
        contributing = summary
    by_license: dict[str, list[str]] = {}
    for name, license_id in contributing.select("source", "license").iter_rows():
        key = license_id.strip().lower() if license_id and license_id.strip() else "unknown"
        by_license.setdefault(key, []).append(name)
    if len(by_license) == 1:
        return {"license": next(iter(by_license))}
    details = "; ".join(f"{key}: {', '.join(names)}" for key, names in sorted(by_license.items()))
    return {"license": "other", "license_name": "mixed",
            "license_details": f"Rows keep the license of their source (column `source`). {details}"}


def size_category(rows: int) -> str:
    for limit, label in SIZE_CATEGORIES:
        if rows < limit:
            return label
    return "n>1B"


def _languages(out_dir: Path, manifest: dict) -> list[str]:
    paths = [p for name in CONFIGS for p in output_paths(out_dir, manifest, name)]
    if not paths:
        return []
    values = pl.concat([pl.scan_parquet(p).select("language") for p in paths]).unique().collect()["language"]
    return sorted(v for v in values.to_list() if v)


def front_matter(out_dir: str | Path, manifest: dict, summary: pl.DataFrame | None = None) -> dict:
    """The YAML metadata block as a dict (Hugging Face dataset card keys)."""
    out_dir = Path(out_dir)
    summary = source_summary(out_dir, manifest) if summary is None else summary
    configs = [name for name in CONFIGS if output_rows(manifest, name) > 0]
    meta: dict = {"pretty_name": manifest["recipe"]["name"], **license_metadata(summary)}
    languages = _languages(out_dir, manifest)
    if languages:
        meta["language"] = languages
    meta["size_categories"] = [size_category(sum(output_rows(manifest, name) for name in configs))]
    meta["task_categories"] = ["text-generation"]
    tags = ["curation"]
    if "sft" in configs:
        tags += ["sft", "instruction-tuning"]
    if "preference" in configs:
        tags += ["preference", "dpo", "rlhf"]
    meta["tags"] = tags + ["trl"]
    if configs:
        meta["configs"] = [
            {"config_name": name, **({"default": True} if index == 0 else {}),
             "data_files": [{"split": "train", "path": f"{name}/*.parquet"}]}
            for index, name in enumerate(configs)
        ]
    return meta


def _cell(value) -> str:
    text = "" if value is None else str(value)
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def model_digest(model: dict) -> str:
    """The model's recorded hash, else a sha256 over its per-file digests (stable, shows any changed file)."""
    if model.get("model_hash"):
        return model["model_hash"]
    files = model.get("files") or {}
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest() if files else ""


def _fence(text: str) -> str:
    """A code fence longer than any backtick run in ``text``."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def card_text(out_dir: str | Path, manifest: dict | None = None) -> str:
    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir) if manifest is None else manifest
    summary = source_summary(out_dir, manifest)
    meta = front_matter(out_dir, manifest, summary)
    recipe = manifest["recipe"]
    counts = manifest.get("counts", {})
    configs = [c["config_name"] for c in meta.get("configs", [])]
    header = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, width=1000)

    parts = [f"---\n{header}---\n", f"# {recipe['name']}\n"]
    if recipe.get("description"):
        parts.append(recipe["description"].strip() + "\n")
    finished = manifest.get("times", {}).get("finished", "")
    parts.append(
        f"Built by `curation` {manifest.get('package', {}).get('version', '')} from the recipe "
        f"`{Path(manifest.get('recipe_path', recipe['name'])).name}`, run `{manifest['run_id']}`"
        + (f", finished {finished}" if finished else "") + ". "
        f"Every input record is accounted for: {counts.get('input_records', 0):,} records in = "
        f"{counts.get('kept', 0):,} kept (in at least one output) + {counts.get('rejected', 0):,} rejected "
        f"with a reason + {counts.get('quarantined', 0):,} quarantined (unparseable)"
        + (" — checked on the files at the end of the build." if manifest.get("conservation", {}).get("ok") else ".")
        + " `report.html` beside this card shows the build visually.\n")

    layouts = {"sft": "TRL conversational: `messages` (list of {role, content}) + provenance, `score`",
               "preference": "TRL preference: `prompt`, `chosen`, `rejected` (message lists) + ids, scores, "
                             "`pair_source` (native ranking or scorer margin)",
               "prompts": "TRL prompt-only: `prompt` (message list) + provenance"}
    parts.append("## Configs\n\n" + (_table(
        ["config", "rows", "files", "layout"],
        [[name, f"{output_rows(manifest, name):,}", f"`{name}/*.parquet`", layouts[name]] for name in configs])
        if configs else "No output has any row: see the sources and stages below for why.") + "\n")

    source_rows = [[r["source"], r["files"], f"{r['records_in']:,}", f"{r['kept']:,}", f"{r['sft_rows']:,}",
                    f"{r['preference_pairs']:,}", f"{r['prompt_rows']:,}", r["license"] or "not stated"]
                   for r in summary.iter_rows(named=True)]
    total = summary.select(pl.exclude("source", "license").sum()).row(0, named=True)
    source_rows.append(["**total**", total["files"], f"{total['records_in']:,}", f"{total['kept']:,}",
                        f"{total['sft_rows']:,}", f"{total['preference_pairs']:,}", f"{total['prompt_rows']:,}", ""])
    parts.append("## Sources\n\nKept = rows that appear in any output (a row can be an SFT answer and a side of "
                 "several pairs). Each row keeps the license of its source: filter on `source` when terms differ.\n\n"
                 + _table(["source", "files", "records in", "kept", "SFT rows", "pairs", "prompts", "license"],
                          source_rows) + "\n")

    stage_rows = []
    for stage, c in manifest.get("stages", {}).items():
        reasons = sorted((c.get("dropped_by_reason") or {}).items(), key=lambda kv: -kv[1])
        stage_rows.append([stage, f"{c.get('in', 0):,}", f"{c.get('out', 0):,}", f"{c.get('dropped', 0):,}",
                           ", ".join(f"{reason} {n:,}" for reason, n in reasons)])
    select = manifest.get("stages", {}).get("select", {})
    parts.append("## Stages\n\nRows entering and leaving each stage of the funnel (a row dropped by the funnel can "
                 "still be kept as one side of a preference pair"
                 + (f": {select['recovered_by_preference']:,} were" if "recovered_by_preference" in select else "")
                 + ").\n\n" + _table(["stage", "in", "out", "dropped", "dropped by reason"], stage_rows) + "\n")

    model_rows = []
    for model in manifest.get("models", []):
        settings = model.get("settings") or {k: model[k] for k in ("threshold", "field") if k in model}
        model_rows.append([model.get("name", ""), model.get("kind", ""), f"`{model.get('model', '')}`",
                           f"`{model_digest(model)}`", ", ".join(f"{k}={v}" for k, v in settings.items())])
    parts.append("## Models\n\n" + (_table(["name", "kind", "model", "sha256 (files + settings)", "settings"],
                                           model_rows) if model_rows else "No model was used.") + "\n")

    recipe_yaml = yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True, width=100, default_flow_style=None)
    fence = _fence(recipe_yaml)
    parts.append("## Recipe\n\nAs validated, with every default filled in (also in `manifest.json`):\n\n"
                 f"{fence}yaml\n{recipe_yaml}{fence}\n")

    folder = shlex.quote(str(out_dir.resolve()))
    load = "\n".join(f'{name} = load_dataset("{out_dir.resolve()}", "{name}", split="train")' for name in configs)
    parts.append(
        "## How to load\n\n```python\nfrom datasets import load_dataset\n\n" + load + "\n```\n\n"
        "Provenance, from the command line:\n\n```sh\n"
        f"curate audit {folder} --id ROW_ID     # where a row came from and what every stage decided\n"
        f"curate verify {folder}               # re-hash outputs and inputs against manifest.json\n"
        f"curate report {folder}               # rewrite this card and report.html\n```\n\n"
        "Also in this folder: `rejected/` (every dropped row with stage, reason and evidence), `quarantine/` "
        "(unparseable raw records), `lineage/` when present (one row per input record), `manifest.json` "
        "(inputs with sha256, stage counts, models, timings, output hashes).\n")
    return "\n".join(parts)


def write_card(out_dir: str | Path, manifest: dict | None = None) -> Path:
    """Write ``OUT_DIR/README.md`` atomically; it is not listed in the manifest (it is derived from it)."""
    out_dir = Path(out_dir)
    path = out_dir / CARD_NAME
    write_bytes_atomic(card_text(out_dir, manifest).encode("utf-8"), path)
    return path
