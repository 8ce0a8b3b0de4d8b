"""``neuronmap submit``: a job on a Ray cluster through the Ray Jobs API.

The job runs as ``python -m flows.cli run job.yaml`` (``neuronmap run``) in a Ray job on the
cluster's head node, with this project as its runtime environment: a ``working_dir`` holding
the project's packages (``flows``, ``ops``, ``storage``, ``viewer``) and the job file (made
portable: relative paths absolute), and ``env_vars`` with this process's object-store
settings (``storage.location.STORAGE_ENV``) and ``PREFECT_API_URL`` when set. The cluster's
Python needs the project's dependencies (``deploy/Dockerfile``); the code is what is
uploaded. Ray sets ``RAY_ADDRESS`` for the job, so its workers run on the cluster.

Token authentication (Ray 2.60): the client sends the token found in ``$RAY_AUTH_TOKEN``,
``$RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token`` (``flows.engine.token_auth``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from ray.exceptions import AuthenticationError

import flows
from flows.config import JobConfig
from flows.deployment import portable_job
from ops.errors import NeuronmapError

PACKAGES = ("flows", "ops", "storage", "viewer")
JOB_FILE = "job.yaml"
PASSED_ENV = ("PREFECT_API_URL",)
"""Settings handed to the job besides the object-store ones (secrets such as the Ray token
are not: they would show in the job's details on the dashboard)."""


AGENT_WAIT_S = 120.0
"""How long a submission waits for the head's job agent (missing for a few seconds after the
head starts: "No available agent to submit job"). An agent that never comes is usually one that
could not bind its port (52365 unless ``--dashboard-agent-listen-port``): another Ray on the
head's machine holds it; the error then says so."""

NO_AGENT_HINT = (
    "the head has no job agent: when another Ray runs on the head's machine it may hold the "
    "agent's port (52365); start the head with --dashboard-agent-listen-port PORT, and see "
    "dashboard_agent.log in the head's session logs (/tmp/ray/session_latest/logs)"
)


class SubmitError(NeuronmapError):
    """The Jobs API cannot be reached or refused the job."""


def project_root() -> Path:
    """The directory holding this project's packages (``flows``, ``ops``, ``storage``)."""
    return Path(flows.__file__).resolve().parent.parent


def stage_working_dir(job: JobConfig, dest: Path) -> Path:
    """Fill ``dest`` with what the job's ``working_dir`` uploads: the packages and the job."""
    root = project_root()
    for pkg in PACKAGES:
        shutil.copytree(root / pkg, dest / pkg,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))  # fmt: skip
    data = portable_job(job).model_dump(mode="json", exclude_unset=True)
    (dest / JOB_FILE).write_text(yaml.safe_dump(data, sort_keys=False))
    return dest


def runtime_env(working_dir: Path) -> dict[str, Any]:
    from storage.location import storage_env

    env = storage_env() | {k: os.environ[k] for k in PASSED_ENV if os.environ.get(k)}
    return {"working_dir": str(working_dir), "env_vars": env}


def entrypoint(resume: bool = False, overwrite: bool = False) -> str:
    cmd = ["python", "-m", "flows.cli", "run", JOB_FILE]
    return shlex.join(cmd + ["--resume"] * resume + ["--overwrite"] * overwrite)


def client(address: str):
    """A Jobs API client of the dashboard at ``address`` (``http://HEAD:8265``), sending the
    Ray token when this machine has one."""
    from ray.job_submission import JobSubmissionClient

    from flows.engine import token_auth

    token_auth()
    try:
        return JobSubmissionClient(address)
    except AuthenticationError as e:
        raise _auth_error(address, e) from None
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise SubmitError(f"no Ray Jobs API at {address} (the head's dashboard, port 8265 by "
                          f"default): {e}") from None  # fmt: skip


def _auth_error(address: str, e: Exception) -> SubmitError:
    first = str(e).strip().splitlines()[0]
    return SubmitError(
        f"the Ray cluster at {address} refused this client ({first}): it uses token "
        "authentication; give its token in RAY_AUTH_TOKEN, or a file in RAY_AUTH_TOKEN_PATH "
        "(default ~/.ray/auth_token)"
    )


def submit(job: JobConfig, address: str, resume: bool = False, overwrite: bool = False,
           submission_id: str | None = None) -> str:  # fmt: skip
    """Submit ``job``; returns the submission id."""
    c = client(address)
    deadline = time.monotonic() + AGENT_WAIT_S
    with tempfile.TemporaryDirectory(prefix="neuronmap-submit-") as tmp:
        wd = stage_working_dir(job, Path(tmp))
        while True:
            try:
                return c.submit_job(entrypoint=entrypoint(resume, overwrite),
                                    runtime_env=runtime_env(wd), submission_id=submission_id,
                                    metadata={"neuronmap": flows.__version__,
                                              "atlas": job.atlas})  # fmt: skip
            except AuthenticationError as e:
                raise _auth_error(address, e) from None
            except RuntimeError as e:
                # a head that has just started has no job agent for a few seconds
                if "No available agent" in str(e):
                    if time.monotonic() < deadline:
                        time.sleep(1)
                        continue
                    raise SubmitError(f"the Ray Jobs API at {address} refused the job after "
                                      f"{AGENT_WAIT_S:.0f} s: {NO_AGENT_HINT}") from None  # fmt: skip
                raise SubmitError(f"the Ray Jobs API at {address} refused the job: "
                                  f"{str(e).strip()}") from None  # fmt: skip


def follow(address: str, submission_id: str, out=sys.stdout) -> tuple[str, int | None]:
    """Print the job's log as it runs until it ends; returns its final status and the exit
    status of ``neuronmap run`` (None when it never ran)."""
    c = client(address)

    async def tail() -> None:
        async for lines in c.tail_job_logs(submission_id):
            out.write(lines)
            out.flush()

    with contextlib.suppress(RuntimeError):  # the stream closed early: the status says how
        asyncio.run(tail())
    info = c.get_job_info(submission_id)
    while not info.status.is_terminal():
        time.sleep(1)
        info = c.get_job_info(submission_id)
    return str(info.status.value), info.driver_exit_code
