"""A Ray cluster made with the ``ray`` CLI on this machine, as the README shows it (loopback
only: a head with the dashboard and the Jobs API), with Ray 2.60's token authentication on
(the token in a file named by ``RAY_AUTH_TOKEN_PATH``; nothing sets ``RAY_AUTH_MODE``).
``neuronmap submit`` runs the tiny job through the Jobs API; ``RAY_ADDRESS=... neuronmap run``
runs it as a driver of this machine; both give the one-node atlas; a client without the token
gets one clear error at once. (A second node joins only over a non-loopback address: with
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` Ray refuses ``ray start --address``, without it Ray
advertises the machine's network address, whatever ``--node-ip-address`` says. Two nodes on
loopback are ``ray.cluster_utils.Cluster``'s: tests/flows/test_cluster.py.)"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml

from storage.atlas import Atlas
from tests.flows.test_cluster import _job, _same_atlas

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
# The README's commands ("On a Ray cluster"), as this test runs them: the ports are 6379 and
# 8265 there; the test adds --temp-dir (a directory of its own) and a free job agent port to
# `ray start`.
HEAD = ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 ray start --head --port {gcs} --dashboard-host "
        "127.0.0.1 --dashboard-port {dash} --num-cpus 2 --block")  # fmt: skip
SUBMIT = "neuronmap submit {job} --address http://127.0.0.1:{dash} --wait"
RUN = "RAY_ADDRESS=127.0.0.1:{gcs} neuronmap run {job}"

pytestmark = pytest.mark.slow  # a claim about Ray workers, clusters or processes


def test_readme_shows_the_commands_this_test_runs() -> None:
    text = (REPO / "README.md").read_text()
    section = text.split("### On a Ray cluster", 1)[1].split("\n## ", 1)[0]
    for cmd in (HEAD, SUBMIT, RUN):
        assert cmd.format(gcs=6379, dash=8265, job="job.yaml") in section, cmd
    assert "RAY_AUTH_TOKEN" in section and "RAY_AUTH_MODE=token" in section


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _argv(cmd: str, **kw) -> list[str]:
    """The command's argv (its leading VAR=value settings go to :func:`_env`)."""
    argv = cmd.format(**kw).split()
    while "=" in argv[0]:
        argv.pop(0)
    return [str(BIN / argv[0]), *argv[1:]]


def _env(cmd: str, env: dict[str, str], **kw) -> dict[str, str]:
    """``env`` with the command's leading VAR=value settings."""
    out = dict(env)
    for a in cmd.format(**kw).split():
        if "=" not in a or a.startswith("-"):
            break
        k, _, v = a.partition("=")
        out[k] = v
    return out


def _get(url: str, token: str | None = None) -> dict:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.loads(r.read())


def _alive_nodes(dash: int, token: str) -> int:
    nodes = _get(f"http://127.0.0.1:{dash}/nodes?view=summary", token)["data"]["summary"]
    return sum(1 for n in nodes if n.get("raylet", {}).get("state") == "ALIVE")


def _stop(proc: subprocess.Popen) -> None:
    """Stop the node of ``ray start --block`` and every process it started: they are all of
    its session (never ``ray stop``: it would stop every Ray of this machine; a SIGTERM alone
    drains for up to 30 s)."""
    pids = [p.pid for p in psutil.process_iter(["pid"]) if _session(p.pid) == proc.pid]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 10
    while any(psutil.pid_exists(p) and _session(p) == proc.pid for p in pids):
        assert time.time() < deadline, "a Ray process outlived its node"
        time.sleep(0.1)


def _session(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None


@pytest.fixture(scope="module")
def cli_cluster(tmp_path_factory, prefect_harness):
    from prefect.settings import PREFECT_API_URL

    tmp = tmp_path_factory.mktemp("ray-cli")
    token = secrets.token_hex(32)
    (tmp / "token").write_text(token)
    (tmp / "home").mkdir()
    # a user's shell: no Ray settings but the token's file
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_AUTH_MODE", "RAY_ADDRESS",
                        "RAY_AUTH_TOKEN")}  # fmt: skip
    env |= {"RAY_AUTH_TOKEN_PATH": str(tmp / "token"), "PYTHONUNBUFFERED": "1",
            "PATH": f"{BIN}{os.pathsep}{env['PATH']}", "PREFECT_API_URL": PREFECT_API_URL.value()}  # fmt: skip
    gcs, dash, agent = _free_port(), _free_port(), _free_port()
    # a short path: Ray's sockets live under it (a socket path has at most 107 bytes)
    ray_tmp = tempfile.mkdtemp(prefix="nm-ray-", dir="/tmp")
    procs = []

    def start(cmd: str, log: str) -> subprocess.Popen:
        with open(tmp / log, "wb") as out:
            # the agent's port too: Ray's default (52365) is held by this session's local Ray
            # (tests/conftest.py), and a head whose agent cannot bind it has no Jobs API
            p = subprocess.Popen([*_argv(cmd, gcs=gcs, dash=dash), "--temp-dir", ray_tmp,
                                  "--dashboard-agent-listen-port", str(agent)],
                                 env=_env(cmd, env, gcs=gcs, dash=dash), stdout=out, stderr=subprocess.STDOUT, cwd=tmp,
                                 stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
        procs.append(p)
        return p

    try:
        head = start(HEAD, "head.log")
        deadline = time.time() + 120
        while True:
            assert head.poll() is None, (tmp / "head.log").read_text()[-4000:]
            assert time.time() < deadline, (tmp / "head.log").read_text()[-4000:]
            try:
                mode = _get(f"http://127.0.0.1:{dash}/api/authentication_mode")
                if _alive_nodes(dash, token) == 1:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        yield {"env": env, "gcs": gcs, "dash": dash, "token": token, "tmp": tmp,
               "auth_mode": mode, "ray_tmp": ray_tmp}  # fmt: skip
    finally:
        for p in reversed(procs):
            _stop(p)
        shutil.rmtree(ray_tmp, ignore_errors=True)


# one_node (tests/conftest.py): the job below mapped on the session's one-node Ray, shared
# with test_cluster


def _job_file(cluster: dict, name: str, model: Path) -> tuple[Path, Path]:
    atlas = cluster["tmp"] / f"{name}.zarr"
    path = cluster["tmp"] / f"{name}.yaml"
    path.write_text(yaml.safe_dump(_job(atlas, model)))
    return path, atlas


def _nodes_of_record(atlas: Path) -> set[str]:
    (run,) = Atlas.open(atlas).runs()
    (st,) = [s for s in run["stages"] if s["stage"] == "record/tiny"]
    return {w["node"] for w in st["workers"]}


def test_the_cluster_runs_with_token_auth(cli_cluster: dict) -> None:
    assert cli_cluster["auth_mode"].get("authentication_mode") == "token", cli_cluster["auth_mode"]
    with pytest.raises(urllib.error.HTTPError, match="401"):
        _get(f"http://127.0.0.1:{cli_cluster['dash']}/api/jobs/")


def test_submit_runs_the_job_on_the_cluster(cli_cluster: dict, tiny_model_dir: Path,
                                           one_node: Path) -> None:  # fmt: skip
    job, atlas = _job_file(cli_cluster, "submitted", tiny_model_dir)
    t0 = time.perf_counter()
    p = subprocess.run(_argv(SUBMIT, job=job, dash=cli_cluster["dash"]), env=cli_cluster["env"],
                       capture_output=True, text=True, timeout=400, cwd=cli_cluster["tmp"])  # fmt: skip
    took = time.perf_counter() - t0
    (cli_cluster["tmp"] / "submit.log").write_text(p.stdout + p.stderr)
    assert p.returncode == 0, (p.stdout[-6000:], p.stderr[-3000:])
    assert "submitted raysubmit_" in p.stdout
    assert "ray job logs --follow raysubmit_" in p.stdout  # how to follow it
    assert "map_neurons" in p.stdout or "atlas:" in p.stdout  # the job's log, followed
    assert "SUCCEEDED" in p.stderr
    assert len(_nodes_of_record(atlas)) == 1
    _same_atlas(one_node, atlas)
    print(f"neuronmap submit --wait: {took:.1f} s")


def test_run_with_ray_address_needs_no_auth_setting(cli_cluster: dict, tiny_model_dir: Path,
                                                     one_node: Path) -> None:  # fmt: skip
    """Before: ~45 s of InvalidAuthToken, then failure, unless RAY_AUTH_MODE=token was set."""
    job, atlas = _job_file(cli_cluster, "driven", tiny_model_dir)
    env = _env(RUN, cli_cluster["env"], gcs=cli_cluster["gcs"], job=job)
    assert env["RAY_ADDRESS"] == f"127.0.0.1:{cli_cluster['gcs']}" and "RAY_AUTH_MODE" not in env
    t0 = time.perf_counter()
    p = subprocess.run(_argv(RUN, gcs=cli_cluster["gcs"], job=job), env=env, capture_output=True,
                       text=True, timeout=300, cwd=cli_cluster["tmp"])  # fmt: skip
    took = time.perf_counter() - t0
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-6000:])
    assert "InvalidAuthToken" not in p.stderr
    assert len(_nodes_of_record(atlas)) == 1
    _same_atlas(one_node, atlas)
    print(f"RAY_ADDRESS=... neuronmap run: {took:.1f} s")


def test_submit_without_the_token_is_one_clear_error(cli_cluster: dict,
                                                     tiny_model_dir: Path) -> None:  # fmt: skip
    job, atlas = _job_file(cli_cluster, "refused", tiny_model_dir)
    home = cli_cluster["tmp"] / "home"  # no ~/.ray/auth_token there
    no_token = {k: v for k, v in cli_cluster["env"].items() if k != "RAY_AUTH_TOKEN_PATH"}
    for env, says in (({**no_token, "HOME": str(home)}, "uses token authentication; give its "
                       "token in RAY_AUTH_TOKEN"),
                      ({**no_token, "HOME": str(home), "RAY_AUTH_TOKEN_PATH": str(home / "nope")},
                       "Ray token: RAY_AUTH_TOKEN_PATH is set but file cannot be opened")):  # fmt: skip
        t0 = time.perf_counter()
        p = subprocess.run(_argv(SUBMIT, job=job, dash=cli_cluster["dash"]), env=env,
                           capture_output=True, text=True, timeout=120)  # fmt: skip
        assert p.returncode == 2, (p.stdout, p.stderr)
        assert p.stderr.startswith("neuronmap: error:") and "Traceback" not in p.stderr
        assert says in p.stderr, p.stderr
        assert len(p.stderr.strip().splitlines()) == 1
        assert time.perf_counter() - t0 < 60
    assert not atlas.exists()


def test_the_job_uploads_the_project_and_a_portable_job(tmp_path: Path, tiny_model_dir: Path,
                                                        monkeypatch) -> None:  # fmt: skip
    """What `neuronmap submit` hands the Jobs API, without a cluster."""
    from flows.config import parse_job
    from flows.submit import JOB_FILE, PACKAGES, entrypoint, runtime_env, stage_working_dir

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("PREFECT_API_URL", "http://prefect:4200/api")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "not-shipped")
    wd = stage_working_dir(parse_job(_job(Path("rel.zarr"), tiny_model_dir)), tmp_path / "wd")
    assert sorted(p.name for p in wd.iterdir()) == sorted([*PACKAGES, JOB_FILE])
    assert not list(wd.rglob("__pycache__")) and (wd / "flows" / "cli" / "__init__.py").is_file()
    job = yaml.safe_load((wd / JOB_FILE).read_text())
    assert job["atlas"] == str(tmp_path / "rel.zarr")  # absolute: the job runs elsewhere
    env = runtime_env(wd)
    assert env["working_dir"] == str(wd)
    assert env["env_vars"]["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9000"
    assert env["env_vars"]["PREFECT_API_URL"] == "http://prefect:4200/api"
    assert "RAY_AUTH_TOKEN" not in env["env_vars"]  # a secret: it would show on the dashboard
    assert entrypoint() == "python -m flows.cli run job.yaml"
    assert entrypoint(resume=True).endswith("run job.yaml --resume")


def test_a_head_without_a_job_agent_is_one_clear_error(monkeypatch, tiny_model_dir: Path,
                                                       tmp_path: Path) -> None:  # fmt: skip
    """A head whose agent never came up (its port held by another Ray on that machine, as this
    module's head would be without ``--dashboard-agent-listen-port``): the error names the port
    and the flag instead of Ray's "please try again later"."""
    from flows import submit
    from flows.config import parse_job

    calls = []

    class NoAgent:  # what JobSubmissionClient.submit_job raises for such a head
        def submit_job(self, **kw):
            calls.append(kw)
            raise RuntimeError("Request failed with status code 500: No available agent to "
                               "submit job, please try again later..")  # fmt: skip

    monkeypatch.setattr(submit, "client", lambda address: NoAgent())
    monkeypatch.setattr(submit, "AGENT_WAIT_S", 1.5)
    job = parse_job(_job(tmp_path / "a.zarr", tiny_model_dir))
    with pytest.raises(submit.SubmitError) as e:
        submit.submit(job, "http://127.0.0.1:1")
    assert "--dashboard-agent-listen-port" in str(e.value) and "52365" in str(e.value)
    assert len(calls) >= 2  # it waited and asked again before giving up
