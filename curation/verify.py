"""Check a finished build against its manifest before anyone trains on it.

The manifest says what the build read and wrote; ``verify_build`` re-derives all of it from
the files on disk: every output's sha256 and row count, conservation (every row the readers
produced is kept or rejected exactly once, every quarantined record is in quarantine/),
the lineage table when the build wrote one, and the sha256 of every input file. A build
edited by hand, truncated, mixed with another build's shards or moved away from its inputs
fails with one line naming the file and what to do.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq

from curation.hashing import file_sha256

# Output folders whose rows are input rows, and the id columns that name them.
KEPT_COLUMNS = {"sft": ["id"], "preference": ["chosen_id", "rejected_id"], "prompts": ["id"]}
REBUILD = "rebuild into an empty folder"


class VerifyError(ValueError):
    """The folder is not a finished build, so there is nothing to verify against."""


@dataclass
class Problem:
    check: str    # manifest | output | stray | conservation | lineage | input
    path: str     # output path relative to the build, input path as recorded, or a folder
    message: str  # what is wrong
    action: str   # what to do about it

    @property
    def line(self) -> str:
        return f"{self.path}: {self.message}; {self.action}"


@dataclass
class Verification:
    out_dir: Path
    files: int = 0                 # output files listed in the manifest
    rows: int = 0                  # rows in them, as read from the Parquet footers
    inputs: int = 0                # input files recorded in the manifest
    inputs_unchanged: int = 0
    inputs_checked: bool = True
    lineage: bool = False          # the build has a lineage table (and it was checked)
    conservation: dict = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, check: str, path: str, message: str, action: str) -> None:
        self.problems.append(Problem(check, path, message, action))

    def summary(self) -> str:
        """One line: what was verified, or the first problem (and how many more there are)."""
        if self.problems:
            more = len(self.problems) - 1
            return self.problems[0].line + (f" (+{more} more problem{'s' * (more > 1)}; --json lists all)"
                                            if more else "")
        c = self.conservation
        inputs = (f"{self.inputs_unchanged} inputs unchanged" if self.inputs_checked
                  else f"{self.inputs} inputs not checked")
        return (f"verified: {self.files} files, {self.rows:,} rows, conservation ok ({c['input_records']:,} records = "
                f"{c['kept']:,} kept + {c['rejected']:,} rejected + {c['quarantined']:,} quarantined)"
                f"{', lineage ok' if self.lineage else ''}, {inputs}")

    def to_json(self) -> dict:
        return {"ok": self.ok, "out_dir": str(self.out_dir), "files": self.files, "rows": self.rows,
                "inputs": self.inputs, "inputs_checked": self.inputs_checked,
                "inputs_unchanged": self.inputs_unchanged, "lineage": self.lineage,
                "conservation": self.conservation,
                "problems": [{**vars(p), "line": p.line} for p in self.problems]}


def load_manifest(out_dir: Path) -> dict:
    path = Path(out_dir) / "manifest.json"
    if not path.is_file():
        raise VerifyError(f"{out_dir} has no manifest.json, so it is not a finished build; "
                          "point at a `curate build --out` folder or rebuild")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise VerifyError(f"{path} is not valid JSON ({error}); restore it or rebuild") from None
    missing = [key for key in ("inputs", "outputs") if not isinstance(manifest.get(key), (list, dict))]
    if missing:
        raise VerifyError(f"{path} has no {' or '.join(missing)}: the build did not finish; rebuild")
    return manifest


def _check_outputs(out_dir: Path, manifest: dict, result: Verification) -> dict[str, list[Path]]:
    """Hash and count every listed output; returns the readable files per output name."""
    readable: dict[str, list[Path]] = {}
    for name, entries in manifest["outputs"].items():
        readable[name] = []
        for entry in entries:
            rel, path = entry["path"], out_dir / entry["path"]
            result.files += 1
            if not path.is_file():
                result.add("output", rel, f"missing ({name} file listed in the manifest)",
                           "restore it or rebuild")
                continue
            try:
                rows = pq.read_metadata(path).num_rows
            except Exception as error:  # noqa: BLE001 - any unreadable footer means the same thing here
                result.add("output", rel, f"not a readable Parquet file ({type(error).__name__})",
                           "restore it or rebuild")
                continue
            result.rows += rows
            readable[name].append(path)
            changed = file_sha256(path) != entry["sha256"]
            if changed or rows != entry["rows"]:
                facts = ["sha256 differs from the manifest"] if changed else []
                if rows != entry["rows"]:
                    facts.append(f"it holds {rows} rows, the manifest says {entry['rows']}")
                result.add("output", rel, " and ".join(facts) + " (modified after the build)",
                           "rebuild or restore it")
    listed = {entry["path"] for entries in manifest["outputs"].values() for entry in entries}
    for path in sorted(out_dir.rglob("*.parquet")):
        rel = path.relative_to(out_dir).as_posix()
        if rel not in listed and not any(part.startswith(".") for part in Path(rel).parts):
            result.add("stray", rel, "Parquet file not listed in the manifest (anything loading the folder "
                       "would read it)", f"delete it or {REBUILD}")
    return readable


def _ids(paths: list[Path], columns: list[str]) -> pl.Series:
    if not paths:
        return pl.Series("id", [], dtype=pl.String)
    frame = pl.read_parquet(paths, columns=columns)
    return pl.concat([frame[c].rename("id") for c in columns])


def _check_conservation(manifest: dict, files: dict[str, list[Path]],
                        result: Verification) -> tuple[pl.Series, pl.Series]:
    """Every row the readers produced is kept or rejected exactly once, every quarantined record is kept aside.

    The reference is what the readers produced per input file (manifest inputs, which the input
    check ties to the files' sha256); kept, rejected and quarantined are counted from the outputs.
    """
    kept = pl.concat([_ids(files.get(name, []), columns) for name, columns in KEPT_COLUMNS.items()]).unique()
    rejected = _ids(files.get("rejected", []), ["id"])
    quarantined = sum(pq.read_metadata(p).num_rows for p in files.get("quarantine", []))
    rows_read = sum(int(f.get("rows", 0)) for f in manifest["inputs"])
    quarantine_read = sum(int(f.get("quarantined", 0)) for f in manifest["inputs"])
    n_rejected = rejected.n_unique()
    derived = {"input_records": rows_read + quarantine_read, "kept": kept.len(), "rejected": n_rejected,
               "quarantined": quarantined}
    before = len(result.problems)

    twice = rejected.len() - n_rejected
    if twice:
        result.add("conservation", "rejected/", f"{twice} rejected rows appear twice", REBUILD)
    both = int(kept.is_in(rejected.implode()).sum())
    if both:
        result.add("conservation", "rejected/", f"{both} rows are both kept and rejected", REBUILD)
    if kept.len() + n_rejected != rows_read:
        missing = rows_read - kept.len() - n_rejected
        what = (f"{missing} rows the readers produced are in no output (rows were deleted)" if missing > 0
                else f"{-missing} more rows than the readers produced (rows were added)")
        result.add("conservation", "outputs", f"kept {kept.len()} + rejected {n_rejected} != {rows_read} rows read: "
                   f"{what}", "restore the modified file or rebuild")
    if quarantined != quarantine_read:
        result.add("conservation", "quarantine/", f"holds {quarantined} records, the readers quarantined "
                   f"{quarantine_read}", "restore it or rebuild")
    counts = manifest.get("counts") or {}
    recorded = {key: counts.get(key) for key in derived}
    if counts and recorded != derived:
        differ = ", ".join(f"{k} {recorded[k]} vs {v} on disk" for k, v in derived.items() if recorded[k] != v)
        result.add("conservation", "manifest.json", f"counts differ from the files on disk ({differ})",
                   "rebuild or restore the outputs")
    result.conservation = {"ok": len(result.problems) == before, **derived}
    return kept, rejected


def _check_lineage(manifest: dict, paths: list[Path], kept: pl.Series, rejected: pl.Series,
                   result: Verification) -> None:
    """One lineage row per parsed input record, kept exactly when no stage dropped it, per input file."""
    schema = pq.read_schema(paths[0])
    needed = ["id", "source_file", "stage"]
    missing = [c for c in needed if c not in schema.names]
    if missing:
        result.add("lineage", "lineage/", f"has no {', '.join(missing)} column", REBUILD)
        return
    extra = [c for c in ("outputs",) if c in schema.names]
    lineage = pl.read_parquet(paths, columns=needed + extra)
    rows_read = sum(int(f.get("rows", 0)) for f in manifest["inputs"])
    problems = []
    if lineage.height != rows_read:
        problems.append(f"{lineage.height} rows, but the readers produced {rows_read} "
                        "(input records minus quarantined)")
    if lineage["id"].is_duplicated().any():
        problems.append(f"{int(lineage['id'].is_duplicated().sum())} rows share an id")
    lineage_kept = lineage.filter(pl.col("stage").is_null())["id"]
    lineage_dropped = lineage.filter(pl.col("stage").is_not_null())["id"]
    absent = int((~rejected.is_in(lineage["id"].implode())).sum())
    if absent:
        problems.append(f"{absent} rejected ids are not in it")
    absent = int((~kept.is_in(lineage["id"].implode())).sum())
    if absent:
        problems.append(f"{absent} output ids are not in it")
    disagree = (int((~lineage_kept.is_in(kept.implode())).sum())
                + int((~lineage_dropped.is_in(rejected.implode())).sum()))
    if disagree:
        problems.append(f"{disagree} rows disagree with the outputs on kept vs rejected")
    per_file = lineage.group_by("source_file").len()
    read = pl.DataFrame({"source_file": [f["path"] for f in manifest["inputs"]],
                         "rows": [int(f.get("rows", 0)) for f in manifest["inputs"]]},
                        schema={"source_file": pl.String, "rows": pl.Int64})
    off = read.join(per_file, on="source_file", how="full", coalesce=True).filter(
        pl.col("rows").fill_null(0) != pl.col("len").fill_null(0))
    if off.height:
        first = off.row(0, named=True)
        problems.append(f"{off.height} input files have a different number of lineage rows than were read, e.g. "
                        f"{first['source_file']} ({first['len'] or 0} vs {first['rows'] or 0})")
    if problems:
        result.add("lineage", "lineage/", "; ".join(problems), REBUILD)
    result.lineage = True


def _check_inputs(manifest: dict, result: Verification) -> None:
    for entry in manifest["inputs"]:
        result.inputs += 1
        if not result.inputs_checked:
            continue
        path = Path(entry["path"])
        if not path.is_file():
            result.add("input", entry["path"], "input file is missing", "restore it, or rebuild if it was removed "
                       "on purpose")
        elif file_sha256(path) != entry["sha256"]:
            result.add("input", entry["path"], "input file changed since the build (sha256 differs)",
                       "rebuild to use the new content, or restore the original file")
        else:
            result.inputs_unchanged += 1


def verify_build(out_dir: str | Path, check_inputs: bool = True) -> Verification:
    """Re-derive a build's manifest from its files; ``result.problems`` lists every mismatch."""
    out_dir = Path(out_dir)
    manifest = load_manifest(out_dir)
    result = Verification(out_dir=out_dir, inputs_checked=check_inputs)
    files = _check_outputs(out_dir, manifest, result)
    try:
        kept, rejected = _check_conservation(manifest, files, result)
        if files.get("lineage"):
            _check_lineage(manifest, files["lineage"], kept, rejected, result)
    except (pl.exceptions.PolarsError, OSError, KeyError) as error:
        # An output that hashes wrong may also lack a column; the output problem above already names it.
        result.add("conservation", "outputs", f"cannot be re-derived ({type(error).__name__}: "
                   f"{str(error).splitlines()[0]})", "restore the modified files or rebuild")
    _check_inputs(manifest, result)
    return result
