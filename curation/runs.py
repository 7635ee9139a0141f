"""Versioned builds under one output root: a folder per run, an atomic ``latest``, one build at a time.

Layout::

    OUT_ROOT/<run_id>/          one build's outputs (manifest.json, sft/, ...); never written by two runs
    OUT_ROOT/latest             relative symlink to the newest build that passed conservation
    OUT_ROOT/.build.lock        flock held for the whole build; its text names the holder
    OUT_ROOT/.runs/<run_id>.json  status of every started run (running / completed / failed), for `curate runs`
    OUT_ROOT/.cache/            per-record caches, unless CURATION_CACHE or --cache says otherwise

``latest`` is replaced with ``rename(2)`` over a fresh symlink, so a reader sees the old build or the
new one, never a missing or half-written link. A build that fails keeps its folder for inspection,
and ``latest`` stays where it was.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from curation.hashing import file_sha256
from curation.ingest import source_files
from curation.recipe import Recipe
from curation.score_cache import CACHE_ENV

LATEST = "latest"
LOCK_FILE = ".build.lock"
RUNS_DIR = ".runs"
CACHE_DIR = ".cache"
FINGERPRINT_FORMAT = 1
_CODE_PACKAGES = ("curation", "flows", "schemas")


class BuildBusy(Exception):
    """Another build holds the output root's lock."""

    def __init__(self, out_root: Path, holder: dict):
        self.out_root, self.holder = out_root, holder
        who = ", ".join(f"{k} {holder[k]}" for k in ("run_id", "pid", "started") if holder.get(k)) or "unknown holder"
        super().__init__(f"another build of {out_root} is running ({who})")


def resolve_cache_root(cache_dir: str | Path | None, out_root: str | Path | None) -> Path | None:
    """Where per-record caches live: an explicit folder, else $CURATION_CACHE, else OUT_ROOT/.cache for
    versioned builds, else no cache (a one-off ``--out`` build computes everything)."""
    if cache_dir is not None:
        return Path(os.path.expandvars(os.path.expanduser(str(cache_dir)))).resolve()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser().resolve()
    if out_root is not None:
        return Path(out_root).resolve() / CACHE_DIR
    return None


# ---------------------------------------------------------------- lock

@contextmanager
def build_lock(out_root: Path, holder: dict, wait: bool, log=None, poll_seconds: float = 5.0) -> Iterator[None]:
    """Hold OUT_ROOT's build lock; raise BuildBusy when taken and ``wait`` is false.

    flock is released by the kernel when the process dies, so a crashed build never leaves the
    root locked; the holder text is only for the log line of whoever finds it taken."""
    out_root.mkdir(parents=True, exist_ok=True)
    path = out_root / LOCK_FILE
    handle = open(path, "a+", encoding="utf-8")
    try:
        announced = False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as error:
                if error.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                busy = BuildBusy(out_root, _read_holder(path))
                if not wait:
                    raise busy from None
                if not announced and log is not None:
                    log(f"{busy}; waiting for it to finish")
                    announced = True
                time.sleep(poll_seconds)
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(holder))
        handle.flush()
        yield
    finally:
        handle.close()  # closing releases the flock


def _read_holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}


# ---------------------------------------------------------------- run folders and latest

def new_run_dir(out_root: Path, run_id: str) -> Path:
    """The run's own folder; an existing one is an error (two runs never share a folder)."""
    folder = out_root / run_id
    folder.mkdir(parents=True, exist_ok=False)
    return folder


def update_latest(out_root: Path, run_dir: Path) -> Path:
    """Point OUT_ROOT/latest at ``run_dir`` atomically (a new relative symlink renamed over the old one)."""
    link = out_root / LATEST
    temp = out_root / f".{LATEST}.{os.getpid()}.{time.monotonic_ns()}"
    os.symlink(run_dir.name, temp)
    try:
        os.replace(temp, link)
    finally:
        if temp.is_symlink():
            temp.unlink()
    return link


def latest_run(out_root: Path) -> Path | None:
    link = Path(out_root) / LATEST
    if not link.is_symlink() and not link.is_dir():
        return None
    target = link.resolve()
    return target if (target / "manifest.json").is_file() else None


def write_run_status(out_root: Path, run_id: str, /, **fields) -> None:
    """OUT_ROOT/.runs/<run_id>.json, merged with what it already says, replaced atomically."""
    folder = out_root / RUNS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{run_id}.json"
    status = read_json(path) or {"run_id": run_id}
    status.update(fields)
    temp = folder / f".{run_id}.{os.getpid()}.tmp"
    temp.write_text(json.dumps(status, indent=2, default=str), encoding="utf-8")
    os.replace(temp, path)


def list_runs(out_root: Path) -> list[dict]:
    """Every run started under ``out_root``, newest first: status from .runs/, counts from the manifest."""
    out_root = Path(out_root)
    latest = latest_run(out_root)
    runs: dict[str, dict] = {}
    for path in (out_root / RUNS_DIR).glob("*.json"):
        status = read_json(path)
        if status and status.get("run_id"):
            runs[status["run_id"]] = status
    for manifest_path in out_root.glob("*/manifest.json"):
        if not manifest_path.parent.is_symlink():  # latest is a link to a run, not a run
            runs.setdefault(manifest_path.parent.name, {"run_id": manifest_path.parent.name})
    rows = []
    for run_id, status in runs.items():
        folder = out_root / run_id
        manifest = read_json(folder / "manifest.json") or {}
        state = status.get("status") or ("completed" if manifest.get("conservation") else "failed")
        if state == "running" and not _alive(status.get("pid")):
            state = "failed"  # the process died without saying so
        times = manifest.get("times", {})
        rows.append({
            "run_id": run_id,
            "status": state,
            "started": status.get("started") or times.get("started"),
            "finished": status.get("finished") or times.get("finished"),
            "total_seconds": times.get("total_seconds"),
            "counts": manifest.get("counts"),
            "sft_rows": manifest.get("stages", {}).get("select", {}).get("sft_rows"),
            "preference_pairs": manifest.get("stages", {}).get("select", {}).get("preference_pairs"),
            "out_dir": str(folder.resolve()) if folder.is_dir() else None,
            "latest": latest is not None and folder.resolve() == latest,
            "flow_run_id": (manifest.get("prefect") or {}).get("flow_run_id") or status.get("flow_run_id"),
            "recipe_path": manifest.get("recipe_path") or status.get("recipe_path"),
            "error": status.get("error"),
            "reason": status.get("reason") or (f"unchanged since build {status['same_as']}"
                                               if status.get("same_as") else None),
        })
    rows.sort(key=lambda row: row["run_id"], reverse=True)
    return rows


def _alive(pid) -> bool:
    if not isinstance(pid, int):
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_json(path: Path) -> dict | None:
    """A JSON file's object, or None when it is missing or unreadable (a run folder mid-write, a damaged file)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------- no-op detection

@dataclass
class Fingerprint:
    digest: str
    parts: dict  # what the digest covers, for the manifest and for saying what changed


def build_fingerprint(recipe: Recipe, base_dir: Path) -> Fingerprint:
    """A digest of everything a build's outputs depend on: the recipe as parsed, the bytes of every input
    file, the models' files and the pipeline's own code. Equal digests mean a rebuild would write the
    same datasets, so it can be skipped."""
    inputs = {}
    for source in recipe.sources:
        for path, key in source_files(source, base_dir):
            inputs[f"{source.name}/{key}"] = file_sha256(path)
    parts = {
        "format": FINGERPRINT_FORMAT,
        "recipe": _digest(json.dumps(recipe.model_dump(mode="json"), sort_keys=True, default=str).encode()),
        "base_dir": str(Path(base_dir).resolve()),
        "inputs": inputs,
        "models": _model_digests(recipe),
        "code": code_digest(),
    }
    return Fingerprint(_digest(json.dumps(parts, sort_keys=True).encode()), parts)


def changed_parts(old: dict | None, new: dict) -> list[str]:
    """Which parts of two fingerprints differ (inputs named one by one, up to a few)."""
    if not old:
        return ["no earlier fingerprint"]
    changed = [key for key in ("format", "recipe", "base_dir", "models", "code") if old.get(key) != new.get(key)]
    old_inputs, new_inputs = old.get("inputs", {}), new.get("inputs", {})
    added = sorted(set(new_inputs) - set(old_inputs))
    removed = sorted(set(old_inputs) - set(new_inputs))
    modified = sorted(k for k in set(old_inputs) & set(new_inputs) if old_inputs[k] != new_inputs[k])
    for label, names in (("added", added), ("removed", removed), ("changed", modified)):
        if names:
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            changed.append(f"inputs {label}: {shown}")
    return changed


def code_digest() -> str:
    """sha256 over the pipeline's Python sources: a code change is a reason to rebuild."""
    digest = hashlib.sha256()
    for package in _CODE_PACKAGES:
        root = Path(__import__(package).__file__).parent
        for path in sorted(root.rglob("*.py")):
            digest.update(path.relative_to(root.parent).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _model_digests(recipe: Recipe) -> dict:
    """The files of local models (and of models shipped in packages); hub ids count by name."""
    from curation.score import model_folder, scorer_files

    models = {}
    named = []
    if recipe.score is not None:
        named.append(("score", recipe.score.model))
    if recipe.semantic_dedup.enabled:
        named.append(("semantic_dedup", recipe.semantic_dedup.model))
    for role, model in named:
        try:
            models[role] = _digest(json.dumps(scorer_files(model_folder(model)), sort_keys=True).encode())
        except (OSError, ValueError):
            models[role] = model  # not resolvable here: the build itself will say why
    return models


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def now() -> str:
    return datetime.now(timezone.utc).isoformat()
