"""Scheduled builds on a Prefect server: serve the build flow as a deployment, list past builds.

``curate deploy`` calls :func:`serve_build`: the deployment is registered on the server named by
PREFECT_API_URL, the server's scheduler creates its runs, and this process polls for the due ones
and runs each in a subprocess (``python -m prefect.engine``), so a crashed build never takes the
server or the serving process down. ``curate runs`` calls :func:`list_builds`, which joins the
server's flow runs with the manifests on disk (``curation.runs.list_runs``).

Overlap: the deployment has a server-side concurrency limit of 1, so one deployment never runs two
builds at once, even when several processes serve it. A run that falls due while a build is
running is cancelled by the server ("Deployment concurrency limit reached.") with
``if_busy="skip"``, or queued (AwaitingConcurrencySlot) with ``if_busy="wait"``. The flow's own
lock on OUT_ROOT is the real guard: it also covers builds started outside the deployment.
"""

from __future__ import annotations

import asyncio
import os
import signal
import urllib.error
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path

from curation.runs import read_json

FLOW_NAME = "build-dataset"
_BANNED = set("/%&><")  # characters Prefect refuses in deployment names


class DeployError(ValueError):
    """A deployment that cannot be served or a server that cannot be used; one line for people."""


# ---------------------------------------------------------------- server

def api_url() -> str | None:
    """The Prefect API to use: $PREFECT_API_URL, else the active Prefect profile's; None means ephemeral mode."""
    url = os.environ.get("PREFECT_API_URL")
    if url is None:
        from prefect.settings import Settings

        url = Settings().api.url  # read now (env and profile), not the snapshot Prefect took at import
    url = (url or "").strip().rstrip("/")
    return url or None


def ui_url(api: str) -> str:
    """The Prefect UI is served by the same host and port as the API, without ``/api``."""
    return api[: -len("/api")] if api.endswith("/api") else api


def server_problem(api: str, timeout: float = 5.0) -> str | None:
    """Why the server at ``api`` cannot be used (None when ``/health`` answers)."""
    try:
        with urllib.request.urlopen(f"{api}/health", timeout=timeout) as response:
            if response.status == 200:
                return None
            return f"{api}/health answered HTTP {response.status}"
    except urllib.error.HTTPError as error:
        return f"{api}/health answered HTTP {error.code}"
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        return f"no Prefect server answers at {api} ({reason})"


def require_server() -> str:
    """The API URL of a reachable server, or a DeployError saying how to get one."""
    api = api_url()
    if api is None:
        raise DeployError("PREFECT_API_URL is not set: start a server with `prefect server start` and "
                          "`export PREFECT_API_URL=http://127.0.0.1:4200/api` (schedules need a server)")
    problem = server_problem(api)
    if problem is not None:
        raise DeployError(f"{problem}: start it with `prefect server start` or fix PREFECT_API_URL")
    return api


def _settings(api: str):
    """Prefect settings pinned to ``api``: the client and the runner's subprocesses use exactly this server."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    return temporary_settings(updates={PREFECT_API_URL: api})


# ---------------------------------------------------------------- deploy

def validate_cron(expression: str) -> str:
    """The cron expression as Prefect's scheduler will read it, or a one-line DeployError."""
    from prefect.client.schemas.schedules import CronSchedule
    from pydantic import ValidationError

    try:
        CronSchedule(cron=expression)
    except ValidationError:
        raise DeployError(f"invalid cron expression {expression!r}: use five fields, minute hour day-of-month month "
                          "day-of-week, e.g. '0 3 * * *' (03:00 UTC daily), or @hourly / @daily") from None
    return expression


def check_name(name: str) -> str:
    bad = sorted(set(name) & _BANNED)
    if bad or not name.strip():
        raise DeployError(f"deployment name {name!r} is empty or contains {' '.join(bad)}; give another with --name")
    return name


def describe_schedule(cron: str | None, interval: float | None) -> str:
    if cron is not None:
        return f"cron '{cron}' (UTC)"
    return f"every {interval:g} s"


def serve_build(recipe: Path, *, cron: str | None, interval: float | None, name: str | None, out_root: Path,
                if_busy: str = "skip", cache_dir: Path | None = None) -> None:
    """Register a scheduled deployment of the build flow and serve it until SIGINT or SIGTERM.

    Each run builds ``recipe`` into OUT_ROOT/<run_id>/ and moves OUT_ROOT/latest there. On stop, the
    build in progress (if any) is cancelled, the deployment's schedule is paused, and this returns.
    """
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.deployments.runner import EntrypointType
    from prefect.runner import Runner

    if (cron is None) == (interval is None):
        raise DeployError("give exactly one schedule: a cron expression or an interval in seconds")
    if cron is not None:
        validate_cron(cron)
    elif not interval > 0:
        raise DeployError(f"the interval must be a positive number of seconds, not {interval:g}")
    if if_busy not in ("skip", "wait"):
        raise DeployError(f"if_busy must be 'skip' or 'wait', not {if_busy!r}")
    from curation.recipe import load_recipe

    recipe = Path(recipe).resolve()
    parsed, _ = load_recipe(recipe)  # a bad recipe fails now, not at 3 a.m.
    name = check_name(name or parsed.name or recipe.stem)
    api = require_server()
    parameters = {"recipe": str(recipe), "out_root": str(Path(out_root).resolve()), "if_busy": if_busy,
                  "cache_dir": None if cache_dir is None else str(Path(cache_dir).resolve()),
                  "quiet": True}  # no progress bars in a service's log; stage logs still reach the UI
    strategy = ConcurrencyLimitStrategy.CANCEL_NEW if if_busy == "skip" else ConcurrencyLimitStrategy.ENQUEUE

    from flows.build import build_dataset

    with _settings(api):
        deployment = build_dataset.to_deployment(
            name=name, cron=cron, interval=None if interval is None else timedelta(seconds=interval),
            parameters=parameters, concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=strategy),
            description=f"Scheduled build of {recipe} into {parameters['out_root']}",
            tags=["curation"], entrypoint_type=EntrypointType.MODULE_PATH)
        runner = Runner(name=f"curate-deploy-{name}", pause_on_shutdown=True, limit=None)

        async def serve() -> None:
            deployment_id = await runner.aadd_deployment(deployment)
            print(f"deployment {FLOW_NAME}/{name}: {describe_schedule(cron, interval)}, "
                  f"one build at a time (a run due during a build is {'skipped' if if_busy == 'skip' else 'queued'})",
                  flush=True)
            print(f"outputs: {parameters['out_root']}/<run_id>/, latest build: {parameters['out_root']}/latest",
                  flush=True)
            print(f"Prefect UI: {ui_url(api)}/deployments/deployment/{deployment_id}", flush=True)
            print("serving; Ctrl-C or SIGTERM stops (the build in progress is cancelled, the schedule paused)",
                  flush=True)

            def interrupt(*_) -> None:
                # Ctrl-C takes SIGTERM's path (Runner.handle_sigterm): cancel the build in progress, pause, return
                print("curate deploy: interrupted, stopping", flush=True)
                runner.handle_sigterm()

            signal.signal(signal.SIGINT, interrupt)
            await runner.start()

        try:
            asyncio.run(serve())
        except KeyboardInterrupt:  # a second Ctrl-C while stopping
            pass
    print(f"stopped serving {FLOW_NAME}/{name}; its schedule is paused until `curate deploy` runs again", flush=True)


# ---------------------------------------------------------------- runs

def prefect_flow_runs(api: str, limit: int) -> list[dict]:
    """Up to ``limit`` flow runs of the build flow that have left the Scheduled state, newest first."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (DeploymentFilter, DeploymentFilterId, FlowFilter, FlowFilterName,
                                                FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType)
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    page = 200  # the server's largest page
    with _settings(api), get_client(sync_client=True) as client:
        runs = []
        while len(runs) < limit:
            batch = client.read_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=[FLOW_NAME])),
                flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
                    type=FlowRunFilterStateType(not_any_=[StateType.SCHEDULED]))),
                sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=min(page, limit - len(runs)), offset=len(runs))
            runs.extend(batch)
            if len(batch) < page:
                break
        ids = sorted({run.deployment_id for run in runs if run.deployment_id})
        names = {}
        if ids:
            deployments = client.read_deployments(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=ids)))
            names = {d.id: d.name for d in deployments}
    rows = []
    for run in runs:
        started, finished = run.start_time, run.end_time
        rows.append({
            "flow_run_id": str(run.id),
            "flow_run_name": run.name,
            "deployment": names.get(run.deployment_id),
            "state": run.state.name if run.state else None,
            "state_message": run.state.message if run.state else None,
            "started": _iso(started),
            "finished": _iso(finished),
            "expected_start": _iso(run.expected_start_time),
            "seconds": round((finished - started).total_seconds(), 3) if started and finished else None,
            "parameters": dict(run.parameters or {}),
        })
    return rows


def list_builds(out_roots: list[Path], recipe: Path | None = None, api: str | None = None, limit: int = 20,
                extra_roots: list[Path] = ()) -> list[dict]:
    """Past builds, newest first: the server's flow runs joined by flow run id with the manifests under
    ``out_roots`` (only runs of those roots), else under the roots the flow runs name and ``extra_roots``.
    A run known to one side only is listed too: a skipped or cancelled run has a flow run but no folder,
    a ``curate build`` without a server has a folder but no flow run. With ``recipe``, only builds of
    that recipe file."""
    from curation.runs import list_runs

    wanted = None if recipe is None else Path(recipe).resolve()
    flow_runs = prefect_flow_runs(api, max(limit * 5, 200)) if api is not None else []
    if out_roots:
        roots = {Path(root).resolve() for root in out_roots}
        flow_runs = [run for run in flow_runs if _param_path(run, "out_root") in roots]
    else:
        roots = {_param_path(run, "out_root") for run in flow_runs} - {None}
        roots |= {Path(root).resolve() for root in extra_roots}
    builds = {}
    for root in sorted(roots):
        if root.is_dir():
            for row in list_runs(root):
                builds[("run", row["run_id"], str(root))] = _from_manifest(row, root)
    by_flow_run = {build["flow_run_id"]: key for key, build in builds.items() if build["flow_run_id"]}
    for run in flow_runs:
        key = by_flow_run.get(run["flow_run_id"])
        if key is not None:
            builds[key] = _merge(builds[key], run)
        else:
            builds[("flow_run", run["flow_run_id"])] = _from_flow_run(run)
    rows = [b for b in builds.values() if wanted is None or b["recipe_path"] is None or
            Path(b["recipe_path"]).resolve() == wanted]
    rows.sort(key=lambda b: b["started"] or b.get("expected_start") or "", reverse=True)
    return rows[:limit]


def _from_manifest(row: dict, root: Path) -> dict:
    return {"run_id": row["run_id"], "status": row["status"], "state": None, "flow_run_id": row["flow_run_id"],
            "flow_run_name": None, "deployment": None, "started": _utc(row["started"]),
            "finished": _utc(row["finished"]), "seconds": row["total_seconds"] if row["total_seconds"] is not None
            else _seconds_between(row["started"], row["finished"]), "counts": row["counts"],
            "sft_rows": row.get("sft_rows"), "preference_pairs": row.get("preference_pairs"),
            "out_dir": row["out_dir"], "out_root": str(root), "latest": row["latest"],
            "recipe_path": row["recipe_path"], "message": row.get("error") or row.get("reason"),
            "source": "manifest"}


def _merge(build: dict, run: dict) -> dict:
    return {**build, "state": run["state"], "flow_run_name": run["flow_run_name"], "deployment": run["deployment"],
            "started": build["started"] or run["started"], "finished": build["finished"] or run["finished"],
            "seconds": build["seconds"] if build["seconds"] is not None else run["seconds"],
            "recipe_path": build["recipe_path"] or run["parameters"].get("recipe"),
            "message": build["message"] or (run["state_message"] if run["state"] not in ("Completed",) else None),
            "source": "prefect+manifest"}


def _from_flow_run(run: dict) -> dict:
    """A flow run with no run folder: skipped or cancelled before writing, or an unversioned ``--out`` build
    (whose manifest is read from its folder when it names this flow run)."""
    params = run["parameters"]
    build = {"run_id": None, "status": (run["state"] or "unknown").lower(), "state": run["state"],
             "flow_run_id": run["flow_run_id"], "flow_run_name": run["flow_run_name"],
             "deployment": run["deployment"], "started": run["started"], "finished": run["finished"],
             "expected_start": run["expected_start"], "seconds": run["seconds"], "counts": None, "sft_rows": None,
             "preference_pairs": None, "out_dir": None,
             "out_root": None if params.get("out_root") is None else str(_param_path(run, "out_root")),
             "latest": False, "recipe_path": params.get("recipe"), "message": run["state_message"],
             "source": "prefect"}
    out = _param_path(run, "out")
    manifest = read_json(out / "manifest.json") if out is not None else None
    if manifest and (manifest.get("prefect") or {}).get("flow_run_id") == run["flow_run_id"]:
        select = manifest.get("stages", {}).get("select", {})
        build.update(run_id=manifest.get("run_id"), out_dir=str(out), counts=manifest.get("counts"),
                     sft_rows=select.get("sft_rows"), preference_pairs=select.get("preference_pairs"),
                     seconds=manifest.get("times", {}).get("total_seconds", run["seconds"]),
                     recipe_path=manifest.get("recipe_path") or build["recipe_path"], source="prefect+manifest")
    return build


def _param_path(run: dict, key: str) -> Path | None:
    value = run["parameters"].get(key)
    return None if value is None else Path(value).resolve()


def _iso(value) -> str | None:
    return None if value is None else value.astimezone(timezone.utc).isoformat()


def _seconds_between(started: str | None, finished: str | None) -> float | None:
    try:
        return round((datetime.fromisoformat(finished) - datetime.fromisoformat(started)).total_seconds(), 3)
    except (TypeError, ValueError):
        return None


def _utc(value: str | None) -> str | None:
    """ISO times from manifests and from the API, made comparable (UTC, same format)."""
    if not value:
        return None
    try:
        return datetime.fromisoformat(value).astimezone(timezone.utc).isoformat()
    except ValueError:
        return value
