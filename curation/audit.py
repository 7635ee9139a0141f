"""``curate audit``: where one row came from and what every stage decided about it.

Reads a finished build: ``lineage/`` (one row per parsed input record, see
``schemas.LINEAGE_SCHEMA``), the outputs and the manifest, each through ``scan_parquet``
with a filter, so only the matching rows and the needed columns are read. The original
record is read back from the input file at the recorded byte offset and length (offsets
count bytes of the decompressed stream, so ``.gz`` inputs work the same), after checking
the file still has the sha256 the build recorded.

Record positions are the ``source_record`` prefix: ``line:N`` is the 1-based physical
line of a JSONL file, ``index:N`` the 0-based element of a JSON array (or value of a
stream of JSON values), ``prompt:N`` the 0-based element of a sampling report's
``prompts`` array, ``row:N`` the 0-based row of a Parquet file.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq

from curation.hashing import file_sha256
from curation.readers.instruct import parquet_raw
from curation.readers.jsonstream import open_binary

FUNNEL = ("normalize", "filter", "dedup", "semantic_dedup", "score", "select")
POSITION = re.compile(r"^(?P<label>[a-z_]+):(?P<number>\d+)(?P<part>.*)$")
TEXT_RAW_LIMIT = 2000  # characters of the raw record shown in the text view


class AuditError(ValueError):
    """The audit cannot answer (unknown id, record or build); the message is one line for people."""


# ------------------------------------------------------------------------------- build access

class Build:
    """A finished build folder: its manifest and lazy scans of its Parquet outputs."""

    def __init__(self, out_dir: str | Path):
        self.out = Path(out_dir)
        manifest = self.out / "manifest.json"
        if not manifest.is_file():
            raise AuditError(f"{self.out} has no manifest.json; give the folder a `curate build --out` wrote")
        self.manifest = json.loads(manifest.read_text(encoding="utf-8"))
        if not self.parts("lineage"):
            raise AuditError(f"{self.out} has no lineage/ (it was built before lineage was recorded); "
                             "rebuild it with `curate build` to audit it")

    def parts(self, name: str) -> list[Path]:
        return sorted((self.out / name).glob("*.parquet"))

    def scan(self, name: str, paths: bool = False) -> pl.LazyFrame | None:
        parts = self.parts(name)
        if not parts:
            return None
        return pl.scan_parquet(parts, include_file_paths="_path" if paths else None)

    def lineage(self, predicate: pl.Expr) -> pl.DataFrame:
        return self.scan("lineage").filter(predicate).collect()

    def relative(self, path: str) -> str:
        try:
            return str(Path(path).relative_to(self.out))
        except ValueError:
            return path

    def stage_order(self) -> list[str]:
        """Funnel stages in the order this build ran them (the score stage runs before dedup when
        dedup keeps the best-scored copy)."""
        order = list(FUNNEL)
        if self.manifest.get("stages", {}).get("score", {}).get("before_dedup"):
            order.remove("score")
            order.insert(order.index("dedup"), "score")
        return order

    def semantic_dedup_enabled(self) -> bool:
        return bool(self.manifest.get("recipe", {}).get("semantic_dedup", {}).get("enabled"))


# ------------------------------------------------------------------------------ raw records

def parse_position(source_record: str) -> tuple[str, int, str]:
    """'index:5:output_2' -> ('index', 5, ':output_2')."""
    match = POSITION.match(source_record)
    if match is None:
        raise AuditError(f"record position {source_record!r} is not 'label:N'")
    return match["label"], int(match["number"]), match["part"]


def read_raw_record(path: str | Path, source_record: str, offset: int | None, length: int | None) -> tuple[bytes, str]:
    """The record as stored, and what it is: 'bytes' (the exact text of a JSON/JSONL record, from the
    decompressed stream) or 'parquet_row' (a Parquet row has no text: its columns as JSON)."""
    path = Path(path)
    if offset is not None and length is not None:
        with open_binary(path) as stream:
            stream.seek(offset)
            data = stream.read(length)
        if len(data) != length:
            raise AuditError(f"{path} ends before byte {offset + length} where the record should end; "
                             "the file changed since the build")
        return data, "bytes"
    label, number, _ = parse_position(source_record)
    if label != "row":
        raise AuditError(f"no byte offset was recorded for {source_record} of {path}")
    parquet = pq.ParquetFile(path)
    start = 0
    for group in range(parquet.num_row_groups):
        rows = parquet.metadata.row_group(group).num_rows
        if number < start + rows:
            value = parquet.read_row_group(group).slice(number - start, 1).to_pylist()[0]
            return parquet_raw(value), "parquet_row"
        start += rows
    raise AuditError(f"{path} has {start} rows, fewer than row {number}; the file changed since the build")


def _source_check(path: str, recorded: str) -> dict:
    check = {"path": path, "exists": Path(path).is_file(), "recorded_sha256": recorded, "sha256": None,
             "matches": False}
    if check["exists"]:
        check["sha256"] = file_sha256(path)
        check["matches"] = check["sha256"] == recorded
    return check


def _raw_fields(row: dict, check: dict) -> tuple[dict, list[str]]:
    """raw_record (text) or raw_record_base64, and the warnings about the source file."""
    warnings = []
    if not check["exists"]:
        return {"raw_record": None, "raw_kind": None}, [f"source file {check['path']} is missing: the raw record "
                                                         "cannot be read back"]
    if not check["matches"]:
        warnings.append(f"source file {check['path']} changed since the build (sha256 {check['sha256'][:12]}… != "
                        f"recorded {check['recorded_sha256'][:12]}…): the raw record may not be the one the build "
                        "read")
    try:
        data, kind = read_raw_record(check["path"], row["source_record"], row["source_offset"], row["source_length"])
    except (AuditError, OSError, EOFError) as exc:
        return {"raw_record": None, "raw_kind": None}, warnings + [f"raw record unreadable: {exc}"]
    try:
        return {"raw_record": data.decode("utf-8"), "raw_kind": kind}, warnings
    except UnicodeDecodeError:
        return {"raw_record": None, "raw_record_base64": base64.b64encode(data).decode(), "raw_kind": kind}, warnings


# ---------------------------------------------------------------------------------- reports

def audit_id(out_dir: str | Path, row_id: str) -> dict:
    """Everything the build knows about row ``row_id``, with its raw record (``curate audit --id``)."""
    build = Build(out_dir)
    found = build.lineage(pl.col("id") == row_id)
    if found.is_empty():
        raise AuditError(f"no row with id {row_id} in {build.out}; ids are in the id columns of lineage/, sft/, "
                         "rejected/ and chosen_id / rejected_id of preference/")
    row = found.row(0, named=True)
    check = _source_check(row["source_file"], row["source_sha256"])
    raw, warnings = _raw_fields(row, check)
    report = _row_report(build, row)
    return {**report, "source_check": check, **raw, "warnings": warnings}


def audit_record(out_dir: str | Path, source_file: str | Path, record: str | int) -> dict:
    """What became of one input record (``curate audit --source FILE --record N``).

    ``record``: N or 'label:N' in the terms of ``source_record`` (see the module docstring).
    ``source_file``: the path as recorded in the manifest, or any path resolving to that file.
    """
    build = Build(out_dir)
    path, entry = _find_input(build, source_file)
    label, number = _record_arg(record)
    position = pl.col("source_record").str.extract(r"^([a-z_]+):(\d+)", 2).cast(pl.Int64)
    predicate = (pl.col("source_file") == path) & (position == number)
    if label is not None:
        predicate &= pl.col("source_record").str.extract(r"^([a-z_]+):", 1) == label
    rows = build.lineage(predicate)
    quarantined = _quarantined(build, path, number)
    if rows.is_empty() and not quarantined:
        what = f"{label}:{number}" if label else f"record {number}"
        hint = (" (the source was capped at max_records: records past the cap were never read)"
                if entry.get("capped") else "")
        raise AuditError(f"no {what} of {path} in {build.out}{hint}; record numbers are those of source_record "
                         "(line:N 1-based lines, index:N / prompt:N / row:N 0-based)")
    report = {"source_file": path, "record": None, "source_check": _source_check(path, entry["sha256"]),
              "raw_record": None, "raw_kind": None, "warnings": [], "rows": [], "quarantined": quarantined}
    if not rows.is_empty():
        rows = rows.sort("source_record")
        first = rows.row(0, named=True)
        found_label, found_number, _ = parse_position(first["source_record"])
        report["record"] = f"{found_label}:{found_number}"
        raw, warnings = _raw_fields(first, report["source_check"])
        report.update(raw)
        report["warnings"] = warnings
        report["rows"] = [_row_report(build, r) for r in rows.iter_rows(named=True)]
    else:
        report["record"] = f"{label}:{number}" if label else str(number)
        report["raw_record"], report["raw_kind"] = quarantined[0]["raw"], "bytes"
    return report


def _find_input(build: Build, source_file: str | Path) -> tuple[str, dict]:
    given = str(source_file)
    inputs = build.manifest.get("inputs", [])
    for entry in inputs:
        if entry["path"] == given:
            return entry["path"], entry
    resolved = Path(given).expanduser().resolve()
    for entry in inputs:
        recorded = Path(entry["path"])
        if recorded == resolved or (recorded.exists() and resolved.exists() and recorded.samefile(resolved)):
            return entry["path"], entry
    raise AuditError(f"{given} is not an input of the build in {build.out}; its inputs are listed under "
                     "'inputs' in manifest.json")


def _record_arg(record: str | int) -> tuple[str | None, int]:
    text = str(record).strip()
    if text.isdigit():
        return None, int(text)
    match = re.fullmatch(r"([a-z_]+):(\d+)", text)
    if match is None:
        raise AuditError(f"--record {text!r}: give the record number N, or 'label:N' as in source_record "
                         "(e.g. line:12, index:0)")
    return match[1], int(match[2])


def _quarantined(build: Build, path: str, number: int) -> list[dict]:
    scan = build.scan("quarantine")
    if scan is None:
        return []
    found = scan.filter((pl.col("source_file") == path) & (pl.col("line") == number)).collect()
    entries = []
    for entry in found.iter_rows(named=True):
        raw = entry["raw"] or b""
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("utf-8", "backslashreplace")
        entries.append({"line": entry["line"], "offset": entry["offset"], "error": entry["error"], "raw": text})
    return entries


def _row_report(build: Build, row: dict) -> dict:
    """Origin, stage trail, duplicates, outputs and pairs of one lineage row (no raw record)."""
    row_id = row["id"]
    label, number, part = parse_position(row["source_record"])
    kept = bool(row["outputs"])
    origin = {key: row[key] for key in ("source", "source_file", "source_record", "source_offset", "source_length",
                                        "source_sha256", "format", "kind", "generator", "prompt_id", "rank_group",
                                        "rank", "source_flags")}
    origin["position"] = {"label": label, "number": number, "part": part or None}
    return {
        "id": row_id,
        "status": "kept" if kept else "rejected",
        "origin": origin,
        "stages": _trail(build, row),
        "duplicates": _duplicates(build, row),
        "outputs": _outputs(build, row_id, row["outputs"]),
        "preference_pairs": _pairs(build, row_id),
        "disposition": {key: row[key] for key in ("stage", "reason", "detail", "duplicate_of")},
    }


def _trail(build: Build, row: dict) -> list[dict]:
    """One entry per stage: passed, rejected, set aside (dropped from the funnel but kept in a
    preference pair), skipped (disabled) or not reached, with the values the stage set."""
    dropped_at = row["stage"] or row["funnel_stage"]
    order = build.stage_order()
    drop_index = order.index(dropped_at) if dropped_at in order else len(order)
    values = {
        "normalize": ("n_turns", "prompt_chars", "answer_chars", "prompt_id", "content_hash"),
        "filter": ("language", "language_score"),
        "dedup": ("content_hash", "dup_cluster"),
        "semantic_dedup": ("dup_cluster",),
        "score": ("score", "scorer"),
        "select": ("outputs",),
    }
    trail = [{"stage": "ingest", "decision": "read",
              "values": {"format": row["format"], "kind": row["kind"], "source_flags": row["source_flags"]}}]
    for index, stage in enumerate(order):
        entry = {"stage": stage, "values": {key: row[key] for key in values[stage]}}
        if index < drop_index:
            entry["decision"] = "passed"
            if stage == "semantic_dedup" and not build.semantic_dedup_enabled():
                entry["decision"] = "skipped"
            elif stage == "score":
                entry["decision"] = "scored" if row["score"] is not None else "not scored"
            elif stage == "select":
                entry["decision"] = "kept"
        elif index == drop_index:
            prefix = "" if row["stage"] else "funnel_"
            entry["decision"] = "rejected" if row["stage"] else "set aside"
            entry["reason"], entry["detail"] = row[f"{prefix}reason"], row[f"{prefix}detail"]
            if row["duplicate_of"] or stage in ("dedup", "semantic_dedup"):
                entry["duplicate_of"] = row["duplicate_of"] or row["dup_cluster"]
        elif stage == "score" and row["score"] is not None:
            entry["decision"] = "scored"  # ranked rows are scored for native preference pairs
        elif stage == "select" and row["outputs"]:
            entry["decision"] = "kept"  # as a side of a preference pair
        else:
            entry["decision"] = "not reached"
        trail.append(entry)
    return trail


def _duplicates(build: Build, row: dict) -> dict:
    """The row this one duplicated (when it was dropped as a copy) and the rows it absorbed."""
    row_id, cluster = row["id"], row["dup_cluster"]
    target = row["duplicate_of"] or (cluster if cluster and cluster != row_id else None)
    columns = ["id", "source", "source_record", "stage", "reason", "detail", "outputs", "dup_cluster",
               "funnel_stage", "funnel_reason", "funnel_detail"]
    predicate = (pl.col("dup_cluster") == row_id) & (pl.col("id") != row_id)
    if target is not None:
        predicate |= pl.col("id") == target
    found = build.scan("lineage").filter(predicate).select(columns).collect()
    summary = lambda r: {"id": r["id"], "source": r["source"], "source_record": r["source_record"],  # noqa: E731
                         "status": "kept" if r["outputs"] else "rejected", "stage": r["stage"], "reason": r["reason"],
                         "detail": r["detail"], "outputs": r["outputs"]}
    absorbed = found.filter(pl.col("dup_cluster") == row_id, pl.col("id") != row_id).sort("id")
    via = {r["id"]: r for r in absorbed.iter_rows(named=True)}
    duplicate_of = None
    if target is not None:
        match = found.filter(pl.col("id") == target)
        duplicate_of = summary(match.row(0, named=True)) if match.height else {"id": target, "status": "unknown"}
        duplicate_of["how"] = _dup_how(row)
    return {
        "content_hash": row["content_hash"],
        "dup_cluster": cluster,
        "duplicate_of": duplicate_of,
        "absorbed": [{**summary(r), "how": _dup_how(via[r["id"]])} for r in absorbed.iter_rows(named=True)],
    }


def _dup_how(row: dict) -> dict:
    """Which stage found the copy, and its evidence (a recovered copy keeps it in funnel_*)."""
    if row["stage"] in ("dedup", "semantic_dedup"):
        return {"stage": row["stage"], "reason": row["reason"], "detail": row["detail"]}
    return {"stage": row.get("funnel_stage"), "reason": row.get("funnel_reason"), "detail": row.get("funnel_detail")}


def _outputs(build: Build, row_id: str, names: list[str]) -> list[dict]:
    found = []
    for name in names:
        scan = build.scan(name, paths=True)
        if scan is None:
            continue
        if name == "preference":
            hits = scan.filter((pl.col("chosen_id") == row_id) | (pl.col("rejected_id") == row_id))
        else:
            hits = scan.filter(pl.col("id") == row_id)
        for path in hits.select("_path").unique().collect()["_path"].sort().to_list():
            found.append({"output": name, "path": build.relative(path)})
    return found


def _pairs(build: Build, row_id: str) -> list[dict]:
    scan = build.scan("preference", paths=True)
    if scan is None:
        return []
    hits = scan.filter((pl.col("chosen_id") == row_id) | (pl.col("rejected_id") == row_id)).select(
        "chosen_id", "rejected_id", "pair_source", "prompt_id", "chosen_score", "rejected_score", "source",
        "_path").collect()
    pairs = []
    for pair in hits.iter_rows(named=True):
        role = "chosen" if pair["chosen_id"] == row_id else "rejected"
        other = pair["rejected_id"] if role == "chosen" else pair["chosen_id"]
        pairs.append({"role": role, "other_id": other, "pair_source": pair["pair_source"],
                      "prompt_id": pair["prompt_id"], "chosen_score": pair["chosen_score"],
                      "rejected_score": pair["rejected_score"], "source": pair["source"],
                      "path": build.relative(pair["_path"])})
    return sorted(pairs, key=lambda p: (p["role"], p["other_id"]))


# ------------------------------------------------------------------------------- text views

def _number(value) -> str:
    return "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def _stage_line(entry: dict, row_id: str) -> str:
    values = entry["values"]
    stage, decision = entry["stage"], entry["decision"]
    notes = []
    if decision in ("rejected", "set aside"):
        notes.append(f"{entry['reason']}: {entry['detail']}" if entry.get("detail") else str(entry["reason"]))
    if decision == "skipped":
        notes.append("disabled in the recipe")
    if stage == "ingest":
        flags = ", ".join(values["source_flags"] or [])
        notes.append(f"format {values['format']}, kind {values['kind']}" + (f", flags {flags}" if flags else ""))
    elif decision not in ("not reached", "skipped"):
        if stage == "normalize":
            notes.append(f"{values['n_turns']} turns, prompt {values['prompt_chars']} chars, answer "
                         f"{_number(values['answer_chars'])} chars, content_hash {values['content_hash']}")
        elif stage == "filter":
            if values["language"]:
                notes.append(f"language {values['language']} (p={values['language_score']:.3f})")
            elif decision == "passed":
                notes.append("language not judged (too few letters or identification off)")
        elif stage in ("dedup", "semantic_dedup") and decision == "passed":
            cluster = values["dup_cluster"]
            notes.append("no duplicate" if cluster is None else "kept for its duplicate cluster"
                         if cluster == row_id else f"cluster {cluster}")
        elif stage == "score" and values["score"] is not None:
            notes.append(f"{values['score']:.4f} by {values['scorer']}")
        elif stage == "select" and values["outputs"]:
            notes.append("in " + ", ".join(values["outputs"]))
    return f"  {stage:<15} {decision:<12} {'; '.join(n for n in notes if n)}".rstrip()


def _raw_block(report: dict) -> list[str]:
    raw = report.get("raw_record")
    if raw is None:
        if report.get("raw_record_base64"):
            return ["raw record (not UTF-8; base64 in --json)"]
        return ["raw record: unavailable"]
    title = "raw record" + (" (a Parquet row, as JSON)" if report.get("raw_kind") == "parquet_row" else "")
    shown = raw if len(raw) <= TEXT_RAW_LIMIT else raw[:TEXT_RAW_LIMIT]
    lines = [title] + ["  " + line for line in shown.splitlines()]
    if len(raw) > TEXT_RAW_LIMIT:
        lines.append(f"  … {len(raw.encode()) - len(shown.encode())} more bytes; --json has the whole record")
    return lines


def _fate(summary: dict) -> str:
    if summary["status"] == "kept":
        return "kept in " + ", ".join(summary["outputs"])
    if summary["status"] == "rejected":
        return f"rejected by {summary['stage']} ({summary['reason']})"
    return summary["status"]


def _row_lines(row: dict, check: dict | None = None) -> list[str]:
    origin = row["origin"]
    status = "KEPT in " + ", ".join(o for o in dict.fromkeys(x["output"] for x in row["outputs"])) \
        if row["status"] == "kept" else f"REJECTED by {row['disposition']['stage']} ({row['disposition']['reason']})"
    lines = [f"row {row['id']}  {status}",
             f"  source          {origin['source']}  {origin['source_record']}  of {origin['source_file']}"]
    if origin["source_offset"] is not None:
        lines.append(f"  bytes           {origin['source_offset']}+{origin['source_length']} of the decompressed file")
    if check is not None:
        lines.append(_check_line(check))
    extra = [f"{key} {origin[key]}" for key in ("generator", "rank_group", "rank", "prompt_id")
             if origin[key] is not None]
    if extra:
        lines.append("  record          " + ", ".join(extra))
    lines.append("stages")
    lines += [_stage_line(entry, row["id"]) for entry in row["stages"]]
    dups = row["duplicates"]
    if dups["duplicate_of"]:
        d = dups["duplicate_of"]
        how = d.get("how") or {}
        lines.append(f"duplicate of {d['id']}  {_fate(d)}" + (f", {d['source']} {d['source_record']}" if d.get("source")
                                                              else ""))
        if how.get("stage"):
            lines.append(f"  found by {how['stage']}: {how['detail'] or how['reason']}")
    if dups["absorbed"]:
        lines.append(f"absorbed {len(dups['absorbed'])} duplicate(s)")
        lines += [f"  {a['id']}  {a['how']['reason'] or '-':<18} {a['source']} {a['source_record']}  {_fate(a)}"
                  for a in dups["absorbed"]]
    if row["outputs"]:
        lines.append("outputs")
        lines += [f"  {o['output']:<11} {o['path']}" for o in row["outputs"]]
    if row["preference_pairs"]:
        lines.append(f"preference pairs ({len(row['preference_pairs'])})")
        lines += [f"  {p['role']:<8} vs {p['other_id']}  {p['pair_source']:<6} scores {_number(p['chosen_score'])} "
                  f"(chosen) vs {_number(p['rejected_score'])} (rejected)" for p in row["preference_pairs"]]
    return lines


def _check_line(check: dict) -> str:
    if not check["exists"]:
        return f"  file            MISSING {check['path']}"
    state = "unchanged since the build" if check["matches"] else "CHANGED since the build"
    return f"  file            sha256 {check['recorded_sha256'][:16]}… {state}"


def format_audit(report: dict) -> str:
    """The compact text view of ``audit_id``."""
    lines = _row_lines(report, report["source_check"])
    lines += [f"warning: {w}" for w in report["warnings"]]
    lines += _raw_block(report)
    return "\n".join(lines)


def format_record_audit(report: dict) -> str:
    """The compact text view of ``audit_record``."""
    lines = [f"record {report['record']} of {report['source_file']}: {len(report['rows'])} row(s)"
             + (f", {len(report['quarantined'])} quarantined" if report["quarantined"] else ""),
             _check_line(report["source_check"])]
    lines += [f"warning: {w}" for w in report["warnings"]]
    for entry in report["quarantined"]:
        lines.append(f"quarantined      {entry['error']}")
    lines += _raw_block(report)
    for row in report["rows"]:
        lines.append("")
        lines += _row_lines(row)
    return "\n".join(lines)
