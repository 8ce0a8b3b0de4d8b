"""Scheduling end to end, on loopback: a real ``prefect server``, a real ``prefect worker`` on a
process pool, ``neuronmap deploy ... --interval``. Scheduled runs fire and complete; their
atlas equals a direct ``neuronmap run``; a finished job rerun by the schedule is a fast no-op;
flow and task runs, the summary artifact and per-shard progress logs are visible through the
server's API; ``deploy/prefect.yaml`` is accepted by ``prefect deploy`` as is; the Kubernetes
base job template is accepted by the server.

The commands are those of the README's "Schedule with Prefect" section (checked here).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from itertools import pairwise
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from flows.config import parse_job
from tests.flows.test_pipeline import _arrays, _job

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
NAME = "every-5s"
# The README's commands, as this test runs them ({port} is 4200 there, {job} job.yaml).
SERVER = "prefect server start --host 127.0.0.1 --port {port}"
API = "export PREFECT_API_URL=http://127.0.0.1:{port}/api"
DEPLOY = f"neuronmap deploy {{job}} --name {NAME} --interval 5"
WORKER = "prefect worker start --pool neuronmap"
LIST = "neuronmap deployments"
DELETE = f"prefect deployment delete map_neurons/{NAME}"
PREFECT_DEPLOY = "prefect deploy --prefect-file deploy/prefect.yaml --all"
K8S_POOL = "prefect work-pool create neuronmap-k8s --type kubernetes --base-job-template deploy/k8s-work-pool.json"


def test_readme_shows_the_commands_this_test_runs() -> None:
    text = (REPO / "README.md").read_text()
    assert "## Schedule and scale out" in text and "### Schedule with Prefect" in text
    section = text.split("### Schedule with Prefect", 1)[1].split("\n## ", 1)[0]
    for cmd in (SERVER, API, DEPLOY, WORKER, LIST, DELETE, PREFECT_DEPLOY, K8S_POOL):
        assert cmd.format(port=4200, job="job.yaml") in section, cmd


def _argv(cmd: str, **kw) -> list[str]:
    argv = cmd.format(**kw).split()
    return [str(BIN / argv[0]), *argv[1:]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(argv: list[str], log: Path, env: dict, cwd: Path) -> subprocess.Popen:
    with open(log, "ab") as out:  # own session: the whole tree is stopped at the end
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip


def _stop(proc: subprocess.Popen, grace: float = 15) -> None:
    """Stop ``proc`` and everything it started (a worker's flow runs have sessions of their
    own, and those runs' local Ray clusters)."""
    try:
        tree = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = [proc.pid]
    _signal(tree, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(psutil.pid_exists(p) and
                                              psutil.Process(p).status() != "zombie"
                                              for p in tree):  # fmt: skip
        proc.poll()
        time.sleep(0.3)
    _signal(tree, signal.SIGKILL)
    proc.wait(timeout=30)


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(os.getpgid(pid), sig)


def _post(url: str, path: str, body: dict) -> list:
    r = httpx.post(f"{url}{path}", json=body, timeout=30)
    r.raise_for_status()
    return r.json()


def _runs(url: str, dep_id: str) -> list[dict]:
    return _post(url, "/flow_runs/filter",
                 {"deployments": {"id": {"any_": [dep_id]}}, "limit": 200, "offset": 0})  # fmt: skip


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """A real Prefect server on a free loopback port, with its own database."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_UI_ENABLED="false", PREFECT_LOGGING_LEVEL="INFO")  # fmt: skip
    log = home / "server.log"
    server = _start(_argv(SERVER, port=port), log, env, home)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "server not healthy in 120 s"
            time.sleep(0.5)
        yield {"url": url, "env": {**env, "PREFECT_API_URL": url}, "log": log, "home": home}
    finally:
        _stop(server)
    # SQLAlchemy 2.1 broke Prefect 3.8's scheduler on every loop (constraints.txt pins 2.0)
    assert "InvalidRequestError" not in log.read_text()


def _wait(pred, timeout: float, what: str, log: Path | None = None, step: float = 1.0):
    deadline = time.monotonic() + timeout
    while True:
        out = pred()
        if out:
            return out
        if time.monotonic() > deadline:
            tail = log.read_text()[-6000:] if log is not None and log.exists() else ""
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{tail}")
        time.sleep(step)


def _cli(
    argv: list[str], env: dict, cwd: Path, timeout: float = 180
) -> subprocess.CompletedProcess:
    p = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                       stdin=subprocess.DEVNULL)  # fmt: skip
    assert p.returncode == 0, f"{argv} -> {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


@pytest.mark.slow
def test_interval_deployment_runs_on_a_worker_like_a_direct_run(
    prefect_server, tiny_model_dir: Path, tmp_path: Path, request, capsys, monkeypatch
) -> None:
    """The README's commands in order; `prefect deploy` of deploy/prefect.yaml runs while the
    schedule fires a second time (both mostly wait on imports: 2 cores do them at once)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.cli import main

    url, env = prefect_server["url"], dict(prefect_server["env"])
    env["PREFECT_WORKER_QUERY_SECONDS"] = "2"  # poll often: the test waits on it
    # the atlas path is relative: `deploy` makes it absolute; one worker is quickest here, and
    # so is a fixed firing threshold (the default quantile probes shard 0 in a Ray stage of
    # its own first; nothing here looks at the taxonomy)
    job = _job(Path("sched.zarr"), tiny_model_dir, resources={"backend": "ray", "workers": 1},
               record={"taxonomy": {"threshold": 0.0}})  # fmt: skip
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))

    def cli(cmd: str) -> str:  # a neuronmap command of the README, run in this process
        capsys.readouterr()
        with temporary_settings({PREFECT_API_URL: url}):
            assert main(cmd.format(job="job.yaml").split()[1:]) == 0, capsys.readouterr()
        return capsys.readouterr().out

    monkeypatch.chdir(tmp_path)
    out = cli(DEPLOY)
    assert f"map_neurons/{NAME}" in out and "every 5 s" in out and "pool created" in out, out
    dep = httpx.get(f"{url}/deployments/name/map_neurons/{NAME}", timeout=30).json()
    assert dep["entrypoint"] == "flows.pipeline.map_neurons"
    assert dep["parameters"]["job"]["atlas"] == str(tmp_path / "sched.zarr")
    assert dep["parameters"]["resume"] is True
    assert dep["global_concurrency_limit"]["limit"] == 1
    assert dep["concurrency_options"]["collision_strategy"] == "CANCEL_NEW"

    worker_log = tmp_path / "worker.log"
    worker = _start(_argv(WORKER), worker_log, env, tmp_path)
    yaml_deploy = None
    try:
        # meanwhile, the same job run directly: `neuronmap run` in this process (Ray and the
        # Prefect harness of the session, started now if no other test has)
        request.getfixturevalue("ray_cluster")
        request.getfixturevalue("prefect_harness")
        direct = tmp_path / "direct.zarr"
        assert main(["run", str(tmp_path / "job.yaml"), "--atlas", str(direct)]) == 0

        def completed(n: int):
            runs = _runs(url, dep["id"])
            bad = [r for r in runs if r["state_type"] in ("FAILED", "CRASHED")]
            assert not bad, f"{bad[0]['state']}\n{worker_log.read_text()[-6000:]}"
            done = [r for r in runs if r["state_type"] == "COMPLETED"]
            return sorted(done, key=lambda r: r["start_time"]) if len(done) >= n else None

        first = _wait(lambda: completed(1), 240, "a completed scheduled run", worker_log)[0]
        # while the schedule fires again: deploy/prefect.yaml as is (checked at the end)
        yaml_deploy = _prefect_yaml_deploy(env, tmp_path)
        sched, direct_atlas = _arrays(tmp_path / "sched.zarr"), _arrays(direct)
        assert sched.keys() == direct_atlas.keys()
        assert [k for k in sched if sched[k] != direct_atlas[k]] == []

        rid = first["id"]
        tasks = _post(url, "/task_runs/filter", {"flow_runs": {"id": {"any_": [rid]}},
                                                 "limit": 200, "offset": 0})  # fmt: skip
        names = {t["name"].rsplit("-", 1)[0] for t in tasks if t["state_type"] == "COMPLETED"}
        assert {"prepare-corpus", "prepare-model", "record", "properties"} <= names, names
        arts = _post(url, "/artifacts/filter", {"artifacts": {"key": {"any_": ["neuronmap-summary"]},
                     "flow_run_id": {"any_": [rid]}}, "limit": 10, "offset": 0})  # fmt: skip
        assert arts and "tiny" in arts[0]["data"]
        logs = _post(url, "/logs/filter", {"logs": {"flow_run_id": {"any_": [rid]}},
                                            "limit": 200, "offset": 0})  # fmt: skip
        shards = [m for lg in logs if (m := re.search(r"record/tiny: shard (\d+)/(\d+) done",
                                                       lg["message"]))]  # fmt: skip
        n = int(shards[0].group(2)) if shards else 0
        assert n > 1 and sorted(int(m.group(1)) for m in shards) == list(range(1, n + 1)), [
            lg["message"] for lg in logs]  # fmt: skip

        # the schedule fires again: a finished fixed job is a fast no-op, the atlas unchanged
        second = _wait(lambda: completed(2), 180, "a second completed run", worker_log)[1]
        assert second["total_run_time"] < first["total_run_time"] / 2, (first, second)
        assert _arrays(tmp_path / "sched.zarr") == sched
        ran = sorted((r["start_time"], r["end_time"]) for r in _runs(url, dep["id"])
                     if r["state_type"] in ("COMPLETED", "RUNNING"))  # fmt: skip
        assert all(a[1] and a[1] <= b[0] for a, b in pairwise(ran)), ran  # never overlapping

        row = next(r for r in json.loads(cli(LIST + " --json"))
                   if r["name"] == f"map_neurons/{NAME}")  # fmt: skip
        assert row["schedule"] == "every 5 s" and row["pool"] == "neuronmap"
        assert row["last_state"] in ("Completed", "Running", "Pending", "Submitting"), row
        assert row["atlas"] == str(tmp_path / "sched.zarr") and row["next_run"], row
        assert f"map_neurons/{NAME}  [every 5 s]" in cli(LIST)
        _check_prefect_yaml_deployment(url, yaml_deploy, tmp_path)
    finally:
        _stop(worker)
        if yaml_deploy is not None and yaml_deploy.poll() is None:
            _stop(yaml_deploy)
    _cli(_argv(DELETE), env, tmp_path)
    assert httpx.get(f"{url}/deployments/name/map_neurons/{NAME}").status_code == 404


def test_deploy_schema_is_the_flows() -> None:
    """`neuronmap deploy` builds map_neurons' parameter schema without importing the flow."""
    from prefect.utilities.callables import parameter_schema

    from flows.deployment import flow_parameters
    from flows.pipeline import map_neurons

    assert parameter_schema(flow_parameters) == parameter_schema(map_neurons)


def _prefect_yaml_deploy(env: dict, tmp_path: Path) -> subprocess.Popen:
    """`prefect deploy` of deploy/prefect.yaml as is, from the repository root (its example
    atlas lives under $HOME: here a temporary one)."""
    (tmp_path / "home").mkdir()
    return subprocess.Popen(_argv(PREFECT_DEPLOY), env={**env, "HOME": str(tmp_path / "home")},
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, text=True, start_new_session=True)  # fmt: skip


def _check_prefect_yaml_deployment(url: str, proc: subprocess.Popen, tmp_path: Path) -> None:
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out[-4000:]
    r = httpx.get(f"{url}/deployments/name/map_neurons/smollm2-nightly", timeout=30)
    assert r.status_code == 200, r.text
    dep = r.json()
    httpx.delete(f"{url}/deployments/{dep['id']}", timeout=30)  # its cron must not fire here
    assert dep["entrypoint"] == "flows.pipeline.map_neurons"
    assert dep["pull_steps"] == [{"flows.deployment.installed_package": {}}]
    assert dep["work_pool_name"] == "neuronmap"
    assert dep["global_concurrency_limit"]["limit"] == 1
    assert dep["concurrency_options"]["collision_strategy"] == "CANCEL_NEW"
    assert [s["schedule"]["cron"] for s in dep["schedules"]] == ["0 2 * * *"]
    job = parse_job(dep["parameters"]["job"])
    assert job.atlas == f"{tmp_path}/home/neuronmap/smollm2-nightly.zarr"
    assert dep["parameters"]["resume"] is True


def test_kubernetes_base_job_template(prefect_server) -> None:
    """deploy/k8s-work-pool.json makes a Kubernetes work pool (the server checks that every
    placeholder is a variable), and its defaults render to a Job manifest with nothing left
    unresolved."""
    from prefect.utilities.templating import apply_values

    url = prefect_server["url"]
    _cli(_argv(K8S_POOL), prefect_server["env"], REPO)
    pool = httpx.get(f"{url}/work_pools/neuronmap-k8s", timeout=30).json()
    httpx.delete(f"{url}/work_pools/neuronmap-k8s", timeout=30)
    tpl = json.loads((REPO / "deploy" / "k8s-work-pool.json").read_text())
    assert pool["type"] == "kubernetes" and pool["base_job_template"] == tpl
    defaults = {k: v.get("default") for k, v in tpl["variables"]["properties"].items()}
    job = apply_values(tpl["job_configuration"], {**defaults, "name": "run", "command": "x"})
    assert "{{" not in json.dumps(job)
    pod = job["job_manifest"]["spec"]["template"]["spec"]
    assert pod["containers"][0]["image"] == defaults["image"]
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == defaults["atlas_claim"]
    assert pod["containers"][0]["volumeMounts"][0]["mountPath"] == defaults["atlas_mount"]


def test_deploy_refuses_bad_options_before_any_server(tmp_path: Path, tiny_model_dir: Path,
                                                      capsys, monkeypatch) -> None:  # fmt: skip
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.cli import main

    (tmp_path / "job.yaml").write_text(yaml.safe_dump(_job(Path("a.zarr"), tiny_model_dir)))
    job = str(tmp_path / "job.yaml")
    for argv, msg in (
        (["--cron", "every day"], "invalid schedule"),
        (["--interval", "0"], "positive number of seconds"),
        (["--cron", "0 2 * * *", "--timezone", "Mars/Olympus"], "invalid schedule"),
        (["--timezone", "UTC"], "--timezone needs --cron or --interval"),
        (["--env", "NOEQUALS"], "KEY=VALUE"),
    ):
        capsys.readouterr()
        assert main(["deploy", job, "--name", "x", *argv]) == 2, argv
        assert msg in capsys.readouterr().err, argv
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert main(["deploy", job, "--name", "x", "--interval", "60"]) == 2
        assert "no Prefect server" in capsys.readouterr().err
        assert main(["deployments"]) == 2
        assert "no Prefect server" in capsys.readouterr().err
    assert not (tmp_path / "a.zarr").exists()


def test_portable_job_makes_local_paths_absolute(tmp_path: Path, monkeypatch) -> None:
    from flows.deployment import portable_job

    monkeypatch.chdir(tmp_path)
    (tmp_path / "model").mkdir()
    (tmp_path / "docs.txt").write_text("hello")
    job = parse_job({"atlas": "out/a.zarr", "corpus": {"source": ["docs.txt", "bundled"]},
                     "models": [{"name": "m", "source": "model"}, {"name": "g", "source": "gpt2"}]})  # fmt: skip
    p = portable_job(job)
    assert p.atlas == str(tmp_path / "out/a.zarr")
    assert p.corpus.source == [str(tmp_path / "docs.txt"), "bundled"]
    assert [m.source for m in p.models] == [str(tmp_path / "model"), "gpt2"]
    remote = parse_job({"atlas": "s3://bucket/a.zarr", "corpus": {"source": "hf:wikitext"},
                        "models": [{"name": "g", "source": "gpt2"}]})  # fmt: skip
    assert portable_job(remote) == remote


def test_progress_lines_need_a_prefect_run() -> None:
    """Outside a flow or task run (a bench, a notebook) the runner logs nothing to Prefect."""
    from flows.engine import run_logger

    assert run_logger() is None
