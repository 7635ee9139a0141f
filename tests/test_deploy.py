"""Scheduled builds on a real Prefect server: `curate deploy` serves the demo recipe, the server's
scheduler creates runs, one completes with outputs and `latest`, `curate runs` lists it.

The server is a real `prefect server start` subprocess on 127.0.0.1 with its own port and
PREFECT_HOME, stopped (terminate, then kill) when the test ends.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

from curation import runs
from curation.cli import main

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEMO = PROJECT_ROOT / "recipes" / "demo.yaml"
CURATE = [str(Path(sys.executable).with_name("curate"))] if Path(sys.executable).with_name("curate").exists() \
    else [sys.executable, "-m", "curation.cli"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _closed_api() -> str:
    return f"http://127.0.0.1:{_free_port()}/api"  # nothing listens there


def _stop(process: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
    """Signal the process's whole group (it was started in its own session), kill it if it lingers."""
    if process.poll() is None:
        os.killpg(process.pid, sig)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
    try:
        os.killpg(process.pid, signal.SIGKILL)  # children left behind by a clean exit, if any
    except ProcessLookupError:
        pass
    return process.returncode


def _tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def _client_env(tmp_path: Path, api: str | None) -> dict:
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_API_")}
    env.update(PREFECT_HOME=str(tmp_path / "client-home"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1")
    if api is not None:
        env["PREFECT_API_URL"] = api
    return env


@pytest.fixture
def prefect_server(tmp_path):
    """A real Prefect server on a free port of 127.0.0.1, own home and SQLite database; yields its API URL."""
    home = tmp_path / "server-home"
    home.mkdir()
    port = _free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_API_")}
    env.update(PREFECT_HOME=str(home), PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home / 'server.db'}",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1", PREFECT_UI_ENABLED="false")
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        server = subprocess.Popen([str(Path(sys.executable).with_name("prefect")), "server", "start", "--host",
                                   "127.0.0.1", "--port", str(port)], env=env, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    api = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{api}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"prefect server did not start (exit {server.poll()}):\n{_tail(log)}")
            time.sleep(0.5)
        yield api
    finally:
        _stop(server)


@contextmanager
def _client(api: str):
    """Prefect's client pinned to the test server (this process's settings may name another API)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        yield client


def _deployment_runs(api: str, deployment_id):
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    with _client(api) as client:
        return client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
                                     sort=FlowRunSort.EXPECTED_START_TIME_ASC, limit=200)


@pytest.mark.slow
def test_scheduled_build_on_a_real_server(prefect_server, tmp_path):
    """A run created by the server's scheduler completes with outputs and `latest`; runs that fall
    due during a build are cancelled by the deployment's concurrency limit; `curate runs` lists it."""
    from prefect.client.schemas.objects import StateType
    from prefect.exceptions import ObjectNotFound

    api = prefect_server
    out_root = tmp_path / "builds"
    env = _client_env(tmp_path, api)
    env["PREFECT_RUNNER_POLL_FREQUENCY"] = "2"  # the serving process asks for due runs every 2 s, not 10
    log = tmp_path / "deploy.log"
    started = time.monotonic()
    with open(log, "wb") as out:
        serve = subprocess.Popen([*CURATE, "deploy", str(DEMO), "--interval", "15", "--out-root", str(out_root)],
                                 cwd=PROJECT_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    try:
        deployment, completed = None, []
        deadline = time.monotonic() + 300
        while not completed:
            assert serve.poll() is None, f"curate deploy exited ({serve.returncode}):\n{_tail(log)}"
            assert time.monotonic() < deadline, f"no scheduled run completed in 5 minutes:\n{_tail(log)}"
            time.sleep(2)
            if deployment is None:
                with _client(api) as client:
                    try:
                        deployment = client.read_deployment_by_name("build-dataset/demo")
                    except ObjectNotFound:  # not registered yet
                        continue
            before_stop = _deployment_runs(api, deployment.id)
            completed = [run for run in before_stop if run.state_type == StateType.COMPLETED]
        seconds_to_build = time.monotonic() - started
        # Ctrl-C stops serving cleanly (exit 0) before another run can move `latest`; the schedule is paused.
        assert _stop(serve, signal.SIGINT, timeout=60) == 0, _tail(log)
        with _client(api) as client:
            assert client.read_deployment(deployment.id).paused
        assert len(completed) == 1
        build = completed[0]
        assert build.auto_scheduled, "the completed run was not created by the server's scheduler"

        printed = log.read_text()
        assert f"outputs: {out_root.resolve()}/<run_id>/" in printed
        assert f"/deployments/deployment/{deployment.id}" in printed
        assert deployment.parameters["recipe"] == str(DEMO)
        assert deployment.parameters["out_root"] == str(out_root.resolve())

        latest = out_root / "latest"
        assert latest.is_symlink(), f"no {latest} after a completed build:\n{_tail(log)}"
        manifest = json.loads((latest / "manifest.json").read_text())
        assert manifest["status"] == "completed"
        assert manifest["prefect"]["flow_run_id"] == str(build.id)
        assert manifest["prefect"]["deployment_id"] == str(deployment.id)
        assert latest.resolve().name == manifest["run_id"] and latest.resolve().parent == out_root.resolve()

        listed = subprocess.run([*CURATE, "runs", str(DEMO), "--out-root", str(out_root), "--json"], cwd=PROJECT_ROOT,
                                env=env, capture_output=True, text=True, timeout=120)
        assert listed.returncode == 0, listed.stderr
        row = next(b for b in json.loads(listed.stdout) if b["flow_run_id"] == str(build.id))
        counts = row["counts"]
        assert row["status"] == "completed" and row["state"] == "Completed" and row["latest"]
        assert row["deployment"] == "demo" and row["run_id"] == manifest["run_id"]
        assert row["out_dir"] == str(latest.resolve())
        assert counts["input_records"] == counts["kept"] + counts["rejected"] + counts["quarantined"] > 0
        assert row["sft_rows"] == manifest["stages"]["select"]["sft_rows"]

        # One build at a time: no two runs of the deployment were ever running together.
        runs_now = _deployment_runs(api, deployment.id)
        ran = sorted((run for run in runs_now if run.start_time is not None and run.total_run_time.total_seconds() > 0),
                     key=lambda run: run.start_time)
        for earlier, later in zip(ran, ran[1:]):
            assert later.start_time >= earlier.end_time, f"{earlier.name} and {later.name} overlapped"
        refused = [run for run in before_stop if run.state_type == StateType.CANCELLED]  # not by our Ctrl-C
        assert all(run.state.message == "Deployment concurrency limit reached." for run in refused)
        print(f"first scheduled build completed {seconds_to_build:.0f} s after `curate deploy` started; "
              f"{len(refused)} runs due during it were cancelled by the concurrency limit")
    finally:
        _stop(serve)


@pytest.fixture(autouse=True)
def restore_prefect_logging_level(monkeypatch):
    """`curate deploy` sets PREFECT_LOGGING_LEVEL=INFO for the process it serves from; undo that after each
    test, so later in-process `--quiet` builds keep logging at WARNING."""
    monkeypatch.setenv("PREFECT_LOGGING_LEVEL", "WARNING")  # records the value before (unset), restored after
    monkeypatch.delenv("PREFECT_LOGGING_LEVEL")


def test_cron_is_checked_before_the_server_is_contacted(monkeypatch, capsys):
    monkeypatch.setenv("PREFECT_API_URL", _closed_api())
    assert main(["deploy", str(DEMO), "--cron", "61 3 * * *"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("curate deploy: invalid cron expression '61 3 * * *'") and "\n" not in error
    assert main(["deploy", str(DEMO), "--cron", "0 3 * * *", "--name", "nightly/demo"]) == 2
    assert "deployment name 'nightly/demo'" in capsys.readouterr().err


def test_deploy_needs_a_server(monkeypatch, capsys):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    assert main(["deploy", str(DEMO), "--cron", "0 3 * * *"]) == 2
    error = capsys.readouterr().err.strip()
    assert "PREFECT_API_URL is not set" in error and "prefect server start" in error and "\n" not in error

    api = _closed_api()
    monkeypatch.setenv("PREFECT_API_URL", api)
    assert main(["deploy", str(DEMO), "--interval", "60"]) == 2
    error = capsys.readouterr().err.strip()
    assert f"no Prefect server answers at {api}" in error and "\n" not in error


def _versioned_root(root: Path) -> tuple[str, str]:
    """An output root as versioned builds leave it: one completed build (latest) and one skipped run."""
    done, skipped = "20250101T030000Z-0000abcd", "20250101T031500Z-1111abcd"
    folder = runs.new_run_dir(root, done)
    manifest = {"run_id": done, "status": "completed", "out_dir": str(folder), "recipe_path": str(DEMO),
                "prefect": {"flow_run_id": "f0000000-0000-0000-0000-000000000001", "deployment_id": None},
                "counts": {"input_records": 10, "kept": 7, "rejected": 2, "quarantined": 1},
                "stages": {"select": {"sft_rows": 5, "preference_pairs": 2}}, "conservation": {"ok": True},
                "times": {"started": "2025-01-01T03:00:00+00:00", "finished": "2025-01-01T03:00:42+00:00",
                          "total_seconds": 42.0}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    runs.write_run_status(root, done, status="completed", started="2025-01-01T03:00:00+00:00",
                          finished="2025-01-01T03:00:42+00:00", recipe_path=str(DEMO))
    runs.update_latest(root, folder)
    runs.write_run_status(root, skipped, status="skipped", started="2025-01-01T03:15:00+00:00",
                          finished="2025-01-01T03:15:00+00:00", recipe_path=str(DEMO), reason="busy")
    return done, skipped


def test_runs_without_a_server_lists_the_manifests(tmp_path, monkeypatch, capsys):
    root = tmp_path / "builds"
    done, skipped = _versioned_root(root)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)

    assert main(["runs", str(DEMO), "--out-root", str(root), "--json"]) == 0
    captured = capsys.readouterr()
    assert captured.err.strip() == (f"curate runs: PREFECT_API_URL is not set; listing builds from the manifests "
                                    f"under {root.resolve()} only")
    builds = json.loads(captured.out)
    assert [b["run_id"] for b in builds] == [skipped, done]  # newest first; `latest` is not a run of its own
    assert builds[0]["status"] == "skipped" and builds[0]["out_dir"] is None and not builds[0]["latest"]
    assert builds[1]["status"] == "completed" and builds[1]["latest"] and builds[1]["counts"]["kept"] == 7
    assert builds[1]["flow_run_id"] == "f0000000-0000-0000-0000-000000000001" and builds[1]["seconds"] == 42.0

    api = _closed_api()
    monkeypatch.setenv("PREFECT_API_URL", api)
    assert main(["runs", "--out-root", str(root)]) == 0
    captured = capsys.readouterr()
    assert captured.err.startswith(f"curate runs: no Prefect server answers at {api}")
    table = captured.out.splitlines()
    assert table[0].split()[:4] == ["run", "id", "status", "started"]
    latest_row = next(line for line in table if done in line)
    assert latest_row.startswith("*") and "completed" in latest_row and "42.0s" in latest_row
    assert latest_row.split()[6:12] == ["10", "7", "2", "1", "5", "2"]
    assert str(root.resolve() / done) in latest_row

    assert main(["runs"]) == 2  # no server, no root, no recipe: nothing to look at
    assert "pass --out-root DIR or a RECIPE" in capsys.readouterr().err


def test_runs_of_another_recipe_are_left_out(tmp_path, monkeypatch, capsys):
    root = tmp_path / "builds"
    _versioned_root(root)
    other = tmp_path / "other.yaml"
    other.write_text(DEMO.read_text())  # same content, another file: not the recipe these builds ran
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    assert main(["runs", str(other), "--out-root", str(root), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
