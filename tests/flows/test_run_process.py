"""``neuronmap run`` as a process, with its own temporary Prefect server (no PREFECT_API_URL),
as a user starts it: a first run on a busy machine starts; Ctrl-C is exit 130 and one line;
a killed run leaves no Prefect server behind (``flows.local_server``)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from storage.atlas import Atlas

pytestmark = [pytest.mark.slow,  # processes, as a user starts them
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")]


def _job(tmp: Path, model: Path, max_tokens: int = 300, backend: str = "local",
         **record) -> tuple[str, Path]:  # fmt: skip
    atlas = tmp / "a.zarr"
    job = {
        "atlas": str(atlas),
        "corpus": {"source": "bundled", "seq_len": 16, "max_tokens": max_tokens,
                   "shard_sequences": 8},
        "models": [{"name": "tiny", "source": str(model), "dtype": "float32"}],
        "record": {"topk": 4, "hist_bins": 16, "hist_max": 10.0, "properties": False, **record},
        "resources": {"backend": backend, "workers": 1},
    }  # fmt: skip
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return str(path), atlas


def _env(home: Path) -> dict[str, str]:
    """A user's shell: no Prefect server configured, a Prefect home of its own."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PREFECT_HOME": str(home)}
    for k in ("PREFECT_API_URL", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"):
        env.pop(k, None)
    return env


def _terminal_signals() -> None:
    """A terminal's Ctrl-C: SIGINT at its default, whatever this test process inherited (a
    run started in the background by a non-interactive shell, e.g. `make test &`, inherits
    SIGINT ignored, and Python then never raises KeyboardInterrupt)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _run(job: str, home: Path, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flows.cli", "run", job], env=_env(home),
                            start_new_session=True, preexec_fn=_terminal_signals, **kw)  # fmt: skip


def _alive(pid: int) -> bool:
    """Running (a zombie no re-parenting init has reaped yet counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _prefect_server(parent: int, timeout: float) -> int:
    """The pid of the temporary Prefect server ``parent`` started."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for d in Path("/proc").iterdir():
            try:
                if not d.name.isdigit() or int(
                        (d / "stat").read_text().rsplit(")", 1)[1].split()[1]) != parent:
                    continue
                if b"uvicorn" in (d / "cmdline").read_bytes():
                    return int(d.name)
            except (OSError, ValueError, IndexError):
                continue
        time.sleep(0.2)
    pytest.fail(f"no Prefect server started by pid {parent} in {timeout} s")


def _children(parent: int, word: bytes) -> list[int]:
    """Pids of the processes ``parent`` started whose command line holds ``word``."""
    out = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and int(
                    (d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == parent and (
                    word in (d / "cmdline").read_bytes()):  # fmt: skip
                out.append(int(d.name))
        except (OSError, ValueError, IndexError):
            continue
    return out


def _gone_within(pid: int, seconds: float) -> bool:
    deadline = time.time() + seconds
    while _alive(pid) and time.time() < deadline:
        time.sleep(0.2)
    return not _alive(pid)


def _stop(proc: subprocess.Popen, *pids: int) -> None:
    """Whatever a failed test left running: the run's process group, then ``pids``."""
    for kill, pid in ((os.killpg, proc.pid), *((os.kill, p) for p in pids)):
        with contextlib.suppress(ProcessLookupError):
            kill(pid, signal.SIGKILL)
    proc.wait()


def test_first_run_on_a_busy_machine_starts(tmp_path: Path, tiny_model_dir: Path) -> None:
    """A fresh Prefect home (its database made on the first run) while both cores are busy
    until the flow has begun: Prefect's own 20 s start-up timeout failed 2 of 6 such runs."""
    job, atlas = _job(tmp_path, tiny_model_dir)
    log = tmp_path / "stderr.txt"
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        with open(log, "w") as f:
            proc = _run(job, tmp_path / "fresh-prefect-home", stdout=subprocess.DEVNULL,
                        stderr=f)  # fmt: skip
        deadline = time.time() + 300
        while "Beginning flow run" not in log.read_text() and proc.poll() is None:
            assert time.time() < deadline, "the flow did not begin in 300 s"
            time.sleep(0.2)
    finally:
        for b in burners:  # the start-up was the part under test
            b.kill()
            b.wait()
    try:
        rc = proc.wait(timeout=300)
    finally:
        _stop(proc)
    err = log.read_text()
    assert rc == 0, err[-4000:]
    assert "Timed out" not in err
    assert Atlas.open(atlas).model_attrs("tiny")["complete"]


def test_killed_run_leaves_no_prefect_server(tmp_path: Path, tiny_model_dir: Path) -> None:
    """SIGKILL of the driver alone (no process-group kill): its server ends within seconds."""
    job, _ = _job(tmp_path, tiny_model_dir)
    proc = _run(job, tmp_path / "home", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = 0
    try:
        server = _prefect_server(proc.pid, timeout=120)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert _gone_within(server, 15), f"Prefect server {server} outlived its killed driver"
    finally:
        _stop(proc, *([server] if server else []))


def test_ctrl_c_is_one_line_and_exit_130(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Ctrl-C (SIGINT to the terminal's process group) in the middle of a run."""
    # a fixed firing threshold: no probe stage, the interrupt lands in the record stage (where
    # Prefect once logged the interrupted task's traceback before the one line)
    job, _ = _job(tmp_path, tiny_model_dir, max_tokens=12000, backend="ray",
                  taxonomy={"threshold": 0.0})  # fmt: skip
    log = tmp_path / "stderr.txt"
    with open(log, "w") as f:
        proc = _run(job, tmp_path / "home", stdout=subprocess.DEVNULL, stderr=f)
    server = 0
    try:
        server = _prefect_server(proc.pid, timeout=120)
        deadline = time.time() + 180
        # mid-recording: the first shard is done (on a loaded machine "Beginning flow run"
        # can come seconds before the workers start; 12k tokens leave time to interrupt)
        while "record/tiny: shard 1/" not in log.read_text() and time.time() < deadline:
            assert proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.1)
        ray_procs = _children(proc.pid, b"gcs_server") + _children(proc.pid, b"raylet")
        assert ray_procs, "the run started no Ray instance of its own"
        os.killpg(proc.pid, signal.SIGINT)
        rc = proc.wait(timeout=120)
        err = log.read_text()
        assert rc == 130, err[-3000:]
        assert "Traceback" not in err, err[-3000:]
        assert f"neuronmap: interrupted; continue with `neuronmap run {job} --resume`" in err
        assert _gone_within(server, 15)  # the run stopped its server (which ignored Ctrl-C)
        assert all(_gone_within(p, 15) for p in ray_procs)  # and its Ray instance
    finally:
        _stop(proc, *([server] if server else []))
