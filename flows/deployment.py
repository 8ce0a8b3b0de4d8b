"""Scheduled mapping jobs: Prefect deployments of ``map_neurons`` (``neuronmap deploy`` and
``neuronmap deployments``).

A deployment holds the job itself (validated, every relative path made absolute where it was
deployed) as the flow's ``job`` parameter, with ``resume=True``: a scheduled run continues a
run that was stopped, and a finished job runs again as a fast no-op. Its entrypoint is the
module path of the flow, so a worker imports the flow from the neuronmap package installed
beside it: no source directory to copy, no image (the one pull step only logs which package
runs). Runs of one deployment never overlap: a deployment concurrency limit of 1 cancels a run
that comes due while another runs (``CANCEL_NEW``: no backlog of runs piles up behind a long
one), and the atlas lease that ``map_neurons`` takes refuses any other job on the same atlas.
"""

from __future__ import annotations

import asyncio
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import flows
from flows.config import JobConfig, load_job
from ops.errors import NeuronmapError

FLOW_NAME = "map_neurons"
ENTRYPOINT = "flows.pipeline.map_neurons"
"""A module path (no ``file.py:``): Prefect imports it from the installed package."""
PULL_STEPS = [{"flows.deployment.installed_package": {}}]


class DeployError(NeuronmapError):
    """No Prefect server, or a deployment option Prefect refuses."""


# ------------------------------------------------------------------ the deployment


def installed_package() -> dict[str, str]:
    """The pull step of neuronmap deployments. There is nothing to pull: the flow is imported
    from the neuronmap package installed beside the worker. It says which one (a step, unlike
    none at all, also keeps Prefect from copying the run's working directory)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(flows.__file__)))
    print(f"neuronmap {flows.__version__} from {root}")
    return {"neuronmap_version": flows.__version__, "neuronmap_package": root}


def _absolute(path: str) -> str:
    return path if "://" in path else os.path.abspath(os.path.expanduser(path))


def flow_parameters(job: JobConfig, resume: bool = False, overwrite: bool = False) -> None:
    """The parameters of ``flows.pipeline.map_neurons``, for their schema: importing the flow
    (torch, Ray) would make ``neuronmap deploy`` take seconds more (a test keeps them equal)."""


def portable_job(job: JobConfig) -> JobConfig:
    """``job`` with its atlas, corpus files and local model directories as absolute paths, so
    that a worker running in another directory reads and writes the same places as
    ``neuronmap run`` started here would."""
    c = job.corpus

    def src(s: str) -> str:
        return s if s == "bundled" or s.startswith("hf:") or not Path(s).exists() else _absolute(s)

    sources = [src(s) for s in c.source] if isinstance(c.source, list) else src(c.source)
    models = [m.model_copy(update={"source": _absolute(m.source)}) if Path(m.source).exists()
              else m for m in job.models]  # fmt: skip
    return job.model_copy(update={"atlas": _absolute(job.atlas), "models": models,
                                  "corpus": c.model_copy(update={"source": sources})})  # fmt: skip


def job_parameters(job_file: str) -> dict[str, Any]:
    """The flow parameters of a deployment of ``job_file``."""
    job = portable_job(load_job(job_file))
    return {"job": job.model_dump(mode="json", exclude_unset=True), "resume": True}


def _schedule(cron: str | None, interval: float | None, timezone: str | None) -> Any:
    from prefect.client.schemas.schedules import CronSchedule, IntervalSchedule
    from pydantic import ValidationError

    try:
        if cron is not None:
            return CronSchedule(cron=cron, timezone=timezone or "UTC")
        if interval is not None:
            if interval <= 0:
                raise DeployError(
                    f"--interval must be a positive number of seconds, not {interval}"
                )
            return IntervalSchedule(interval=timedelta(seconds=interval),
                                    timezone=timezone or "UTC")  # fmt: skip
    except ValidationError as e:
        what = f"cron {cron!r}" if cron is not None else f"interval {interval}"
        msgs = "; ".join(err["msg"] for err in e.errors())
        raise DeployError(f"invalid schedule ({what}, timezone {timezone!r}): {msgs}") from None
    if timezone is not None:
        raise DeployError("--timezone needs --cron or --interval")
    return None


def parse_env(pairs: list[str] | None) -> dict[str, str]:
    env = {}
    for p in pairs or []:
        key, sep, value = p.partition("=")
        if not sep or not key:
            raise DeployError(f"--env takes KEY=VALUE, not {p!r}")
        env[key] = value
    return env


def _api_url() -> str:
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise DeployError(
            "no Prefect server: start one (`prefect server start`) and set PREFECT_API_URL "
            "(e.g. http://127.0.0.1:4200/api); schedules fire only on a server"
        )
    return url


async def _client():
    from prefect.client.orchestration import get_client

    url = _api_url()
    client = get_client()
    await client.__aenter__()
    if (err := await client.api_healthcheck()) is not None:
        await client.__aexit__(None, None, None)
        raise DeployError(f"Prefect server at {url} does not answer: {err}")
    return client


async def ensure_pool(client: Any, pool: str) -> bool:
    """Create a process work pool named ``pool`` unless one exists; True when created."""
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.workers.process import ProcessWorker

    try:
        await client.read_work_pool(pool)
        return False
    except ObjectNotFound:
        pass
    template = ProcessWorker.get_default_base_job_template()
    try:
        await client.create_work_pool(
            WorkPoolCreate(name=pool, type="process", base_job_template=template)
        )
    except ObjectAlreadyExists:  # created meanwhile by someone else
        return False
    return True


async def _deploy(job_file: str, name: str, schedule: Any, pool: str, env: dict[str, str]
                  ) -> dict[str, Any]:  # fmt: skip
    from prefect.client.schemas.actions import DeploymentScheduleCreate
    from prefect.client.schemas.objects import ConcurrencyLimitStrategy, ConcurrencyOptions
    from prefect.utilities.callables import parameter_schema

    params = job_parameters(job_file)
    client = await _client()
    try:
        created = await ensure_pool(client, pool)
        flow_id = await client.create_flow_from_name(FLOW_NAME)
        dep_id = await client.create_deployment(
            flow_id=flow_id,
            name=name,
            version=flows.__version__,
            description=f"neuronmap job {os.path.abspath(job_file)} into {params['job']['atlas']}",
            schedules=[DeploymentScheduleCreate(schedule=schedule, active=True)] if schedule else [],
            concurrency_limit=1,
            concurrency_options=ConcurrencyOptions(
                collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW),
            parameters=params,
            work_pool_name=pool,
            entrypoint=ENTRYPOINT,
            pull_steps=PULL_STEPS,
            parameter_openapi_schema=parameter_schema(flow_parameters).model_dump_for_openapi(),
            enforce_parameter_schema=True,
            job_variables={"env": env} if env else {},
            tags=["neuronmap"],
            paused=False,
        )  # fmt: skip
    finally:
        await client.__aexit__(None, None, None)
    return {"id": str(dep_id), "name": f"{FLOW_NAME}/{name}", "pool": pool,
            "pool_created": created, "schedule": describe_schedule(schedule),
            "atlas": params["job"]["atlas"]}  # fmt: skip


def deploy(job_file: str, name: str, cron: str | None = None, interval: float | None = None,
           pool: str = "neuronmap", timezone: str | None = None,
           env: dict[str, str] | None = None) -> dict[str, Any]:  # fmt: skip
    """Register (or update) the deployment ``map_neurons/<name>`` of ``job_file`` on the
    Prefect server of ``PREFECT_API_URL``, on work pool ``pool`` (a process pool is created
    when there is none of that name)."""
    if cron is not None and interval is not None:
        raise DeployError("--cron and --interval exclude each other; pick one")
    schedule = _schedule(cron, interval, timezone)
    return asyncio.run(_deploy(job_file, name, schedule, pool, env or {}))


# ------------------------------------------------------------------ listing


def describe_schedule(s: Any) -> str:
    if s is None:
        return "none (run on demand)"
    tz = getattr(s, "timezone", None) or "UTC"
    if hasattr(s, "interval"):
        sec = s.interval.total_seconds()
        for unit, n in (("d", 86400), ("h", 3600), ("min", 60)):
            if sec >= n and sec % n == 0:
                return f"every {sec / n:g} {unit}"
        return f"every {sec:g} s"
    if hasattr(s, "cron"):
        return f"cron '{s.cron}' ({tz})"
    return f"rrule '{s.rrule}' ({tz})"


def _iso(t: datetime | None) -> str | None:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if t else None


async def _list() -> list[dict[str, Any]]:
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import DeploymentSort, FlowRunSort

    client = await _client()
    try:
        deps = await client.read_deployments(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[FLOW_NAME])),
            sort=DeploymentSort.NAME_ASC, limit=200,
        )  # fmt: skip
        out = []
        for d in deps:
            by_dep = DeploymentFilter(id={"any_": [d.id]})

            def states(types: list[StateType]) -> FlowRunFilter:
                return FlowRunFilter(
                    state=FlowRunFilterState(type=FlowRunFilterStateType(any_=types))
                )

            nxt = await client.read_flow_runs(
                deployment_filter=by_dep, flow_run_filter=states([StateType.SCHEDULED]),
                sort=FlowRunSort.EXPECTED_START_TIME_ASC, limit=1,
            )  # fmt: skip
            # the last run, not counting the runs cancelled before they started because
            # another was running (the concurrency limit): a finished, failed or running one
            ran = [StateType.PENDING, StateType.RUNNING, StateType.COMPLETED, StateType.FAILED,
                   StateType.CRASHED, StateType.CANCELLING, StateType.PAUSED]  # fmt: skip
            last = await client.read_flow_runs(
                deployment_filter=by_dep, flow_run_filter=states(ran),
                sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=1,
            )  # fmt: skip
            cancelled = await client.read_flow_runs(
                deployment_filter=by_dep, flow_run_filter=states([StateType.CANCELLED]),
                sort=FlowRunSort.START_TIME_DESC, limit=50,
            )  # fmt: skip
            last += [r for r in cancelled if r.run_count > 0][:1]  # cancelled while running
            lr = max(last, key=lambda r: r.start_time or r.expected_start_time, default=None)
            scheds = [describe_schedule(s.schedule) + ("" if s.active else " (inactive)")
                      for s in d.schedules]  # fmt: skip
            out.append({
                "name": f"{FLOW_NAME}/{d.name}", "id": str(d.id), "paused": bool(d.paused),
                "schedule": "; ".join(scheds) or describe_schedule(None),
                "next_run": _iso(nxt[0].expected_start_time) if nxt and not d.paused else None,
                "next_state": nxt[0].state.name if nxt and nxt[0].state else None,  # or Late
                "last_run": lr.name if lr else None,
                "last_state": lr.state.name if lr and lr.state else None,
                "last_start": _iso(lr.start_time or lr.expected_start_time) if lr else None,
                "pool": d.work_pool_name, "atlas": (d.parameters.get("job") or {}).get("atlas"),
            })  # fmt: skip
        return out
    finally:
        await client.__aexit__(None, None, None)


def list_deployments() -> list[dict[str, Any]]:
    """Every deployment of ``map_neurons`` with its schedule, next run and last run."""
    return asyncio.run(_list())
