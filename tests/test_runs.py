"""Versioned builds under one output root: run folders, atomic latest, no-op rebuilds, one build at a time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from curation import runs
from curation.cli import main
from curation.verify import verify_build

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _recipe(folder: Path, shared_data: Path, extra_source: bool = False, hh_cap: int = 300) -> Path:
    """A real but quick recipe: seed tasks, ShareGPT and HH pairs, no reward model."""
    sources = [
        {"name": "seeds", "path": str(shared_data / "alpaca" / "seed_tasks.jsonl")},
        {"name": "hh", "path": str(shared_data / "hh_rlhf" / "harmless_base_1500.jsonl.gz"), "use_for": ["preference"],
         "max_records": hh_cap},
    ]
    if extra_source:
        sources.append({"name": "sharegpt", "path": str(shared_data / "fastchat" / "dummy_conversation.json")})
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump({"name": "runs-test", "sources": sources, "score": None}, sort_keys=False))
    return path


def _build(recipe: Path, root: Path, *extra: str) -> dict:
    return _cli(["build", str(recipe), "--out-root", str(root), "--quiet", *extra])


def _cli(args: list[str]) -> dict:
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert main(args) == 0
    return json.loads(buffer.getvalue().strip().splitlines()[-1])


def _run_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and not p.is_symlink())


def test_versioned_builds_move_latest_and_skip_unchanged_inputs(shared_data, tmp_path):
    root = tmp_path / "builds"
    recipe = _recipe(tmp_path, shared_data)

    first = _build(recipe, root)
    assert first["status"] == "completed"
    assert Path(first["out"]) == root / first["run_id"]
    assert (root / "latest").is_symlink() and os.readlink(root / "latest") == first["run_id"]  # relative link
    assert verify_build(root / "latest").ok

    again = _build(recipe, root)
    assert again == {"status": "no-op", "run_id": first["run_id"], "out_dir": str(root / first["run_id"]),
                     "reason": f"unchanged since build {first['run_id']}"}
    assert len(_run_folders(root)) == 1

    _recipe(tmp_path, shared_data, extra_source=True)  # a new source arrives
    second = _build(recipe, root)
    assert second["status"] == "completed" and second["run_id"] != first["run_id"]
    assert os.readlink(root / "latest") == second["run_id"]
    assert second["input_records"] > first["input_records"]
    assert (root / first["run_id"] / "manifest.json").is_file()  # the earlier build stays as it was
    manifest = json.loads((root / "latest" / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["out_root"] == str(root.resolve())
    assert manifest["fingerprint"]["digest"] != json.loads(
        (root / first["run_id"] / "manifest.json").read_text())["fingerprint"]["digest"]

    listed = runs.list_runs(root)
    by_id = {row["run_id"]: row for row in listed}
    assert [row["run_id"] for row in listed] == sorted(by_id, reverse=True)
    assert by_id[second["run_id"]]["latest"] and not by_id[first["run_id"]]["latest"]
    assert by_id[second["run_id"]]["status"] == by_id[first["run_id"]]["status"] == "completed"
    assert by_id[second["run_id"]]["counts"]["input_records"] == second["input_records"]
    no_ops = [row for row in listed if row["status"] == "no-op"]
    assert len(no_ops) == 1 and no_ops[0]["out_dir"] is None


def test_changed_input_bytes_rebuild_and_say_what_changed(shared_data, tmp_path):
    root = tmp_path / "builds"
    data = tmp_path / "data"
    data.mkdir()
    seeds = (shared_data / "alpaca" / "seed_tasks.jsonl").read_text().splitlines(keepends=True)
    (data / "seeds.jsonl").write_text("".join(seeds[:100]))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"name": "runs-test", "score": None,
                                      "sources": [{"name": "seeds", "path": str(data / "seeds.jsonl")}]}))
    first = _build(recipe, root)
    (data / "seeds.jsonl").write_text("".join(seeds[:120]))  # the file grows by 20 tasks
    fingerprint = runs.build_fingerprint(*__import__("curation.recipe", fromlist=["load_recipe"]).load_recipe(recipe))
    old = json.loads((root / "latest" / "manifest.json").read_text())["fingerprint"]
    assert runs.changed_parts(old, fingerprint.parts) == ["inputs changed: seeds/seeds.jsonl"]
    second = _build(recipe, root)
    assert second["status"] == "completed" and second["input_records"] == first["input_records"] + 20


def test_a_failed_build_leaves_latest_where_it_was(shared_data, tmp_path, monkeypatch):
    import flows.build as build

    root = tmp_path / "builds"
    recipe = _recipe(tmp_path, shared_data)
    first = _build(recipe, root)
    _recipe(tmp_path, shared_data, extra_source=True)

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    index_shards = lambda: sorted((root / ".cache" / "records" / "dedup_index").rglob("part-*.parquet"))  # noqa: E731
    indexed = index_shards()
    assert indexed  # the first build's kept rows

    monkeypatch.setattr(build, "select", broken)
    with pytest.raises(RuntimeError, match="disk on fire"):
        build.build_dataset(recipe=str(recipe), out_root=str(root), quiet=True)
    assert os.readlink(root / "latest") == first["run_id"]
    assert index_shards() == indexed  # a failed build's rows never become anchors for the next one
    failed = [row for row in runs.list_runs(root) if row["status"] == "failed"]
    assert len(failed) == 1 and failed[0]["error"] == "RuntimeError: disk on fire"
    assert not (Path(failed[0]["out_dir"]) / "manifest.json").exists()


def test_update_latest_is_a_rename_over_a_relative_link(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    runs.update_latest(tmp_path, tmp_path / "a")
    runs.update_latest(tmp_path, tmp_path / "b")
    assert os.readlink(tmp_path / "latest") == "b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "latest"]  # no temporary link left behind


def test_a_run_whose_process_died_is_listed_as_failed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    runs.write_run_status(tmp_path, "20260101T000000Z-deadbeef", status="running", pid=int(dead.stdout))
    (tmp_path / "20260101T000000Z-deadbeef").mkdir()
    [row] = runs.list_runs(tmp_path)
    assert row["status"] == "failed" and row["counts"] is None and not row["latest"]


def _spawn(recipe: Path, root: Path, *extra: str, log: Path | None = None) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PREFECT_LOGGING_LEVEL": "INFO"}
    stderr = open(log, "w") if log is not None else subprocess.PIPE  # noqa: SIM115 - closed with the process
    return subprocess.Popen([sys.executable, "-m", "curation.cli", "build", str(recipe), "--out-root", str(root),
                             *extra], stdout=subprocess.PIPE, stderr=stderr, text=True, env=env, cwd=PROJECT_ROOT)


def test_a_run_finding_the_root_busy_is_skipped_or_waits_with_a_clear_log_line(shared_data, tmp_path):
    """Another build holds the root's lock (taken here, as a running build takes it): `skip` writes nothing
    and says who holds it; `wait` queues, then builds once the lock is free."""
    root = tmp_path / "builds"
    recipe = _recipe(tmp_path, shared_data)
    holder = {"run_id": "20260101T000000Z-0badf00d", "pid": os.getpid(), "started": runs.now()}
    log = tmp_path / "waiting.log"
    with runs.build_lock(root, holder, wait=False):
        skipped = _spawn(recipe, root)
        out, err = skipped.communicate(timeout=300)
        assert skipped.returncode == 0, err
        assert json.loads(out.strip().splitlines()[-1])["status"] == "skipped"
        assert (f"skipped: another build of {root.resolve()} is running (run_id 20260101T000000Z-0badf00d, "
                f"pid {os.getpid()}") in err
        assert _run_folders(root) == []

        waiting = _spawn(recipe, root, "--if-busy", "wait", log=log)
        deadline = time.monotonic() + 300
        while "waiting for it to finish" not in log.read_text() and waiting.poll() is None:
            assert time.monotonic() < deadline, "the second build never reported that it waits"
            time.sleep(0.5)
        assert waiting.poll() is None, log.read_text()  # queued behind the lock, not finished
        assert _run_folders(root) == []
    out, _ = waiting.communicate(timeout=300)
    assert waiting.returncode == 0, log.read_text()
    result = json.loads(out.strip().splitlines()[-1])
    assert result["status"] == "completed" and os.readlink(root / "latest") == result["run_id"]


def test_two_builds_started_together_leave_one_complete_build(shared_data, tmp_path):
    root = tmp_path / "builds"
    recipe = _recipe(tmp_path, shared_data, hh_cap=1500)
    procs = [_spawn(recipe, root), _spawn(recipe, root)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
        results.append((json.loads(out.strip().splitlines()[-1]), err))
    statuses = sorted(r["status"] for r, _ in results)
    assert statuses in (["completed", "skipped"], ["completed", "no-op"])
    other_log = next(err for r, err in results if r["status"] != "completed")
    assert "skipped: another build of" in other_log or "no-op: recipe" in other_log
    [folder] = _run_folders(root)  # never two folders, never a half-written one
    assert os.readlink(root / "latest") == folder.name
    assert verify_build(folder).ok
