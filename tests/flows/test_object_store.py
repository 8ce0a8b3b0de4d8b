"""An atlas on S3 (moto's server on loopback, reached through s3fs like a real bucket):
run, query, resume, a rerun that does nothing, a foreign prefix refused with its objects
intact, and one run at a time."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from storage.atlas import Atlas
from tests.flows.test_pipeline import _arrays, _job, _run

pytest.importorskip("moto")
s3fs = pytest.importorskip("s3fs")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server and the environment a user would set (endpoint and credentials)."""
    port = _free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], stdout=log.open("w"), stderr=subprocess.STDOUT)  # fmt: skip
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}  # fmt: skip
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                assert time.time() < deadline, log.read_text()
                time.sleep(0.1)
        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        fs.mkdir("atlases")
        yield fs
    finally:
        proc.kill()
        proc.wait()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def s3_atlas(s3, tiny_model_dir, ray_cluster, prefect_harness) -> str:
    url = "s3://atlases/tiny.zarr"
    _run(_job(url, tiny_model_dir))  # type: ignore[arg-type]
    return url


@pytest.fixture(scope="module")
def s3_arrays(s3_atlas: str) -> dict[str, bytes]:
    """Every array of the S3 atlas as its job left it, read once (~10 s through moto): no test
    here may change them, and the tests that check so compare with this."""
    return _arrays(s3_atlas)  # type: ignore[arg-type]


def test_s3_atlas_equals_the_local_one(tiny_atlas: Path, s3_arrays: dict[str, bytes]) -> None:
    # the same job mapped into a local directory: the session's (tests/conftest.py), which
    # test_pipeline checks against numpy (session-scoped, so made before this module's S3
    # settings are in the environment)
    a, b = _arrays(tiny_atlas), s3_arrays
    assert a.keys() == b.keys() and [k for k in a if a[k] != b[k]] == []


def _read_on_worker(url: str) -> tuple[list, dict]:
    """On a job worker: the first corpus row and who read it (the S3 settings are the ones
    the driver shipped, nothing else in the worker's environment names the endpoint)."""
    import os

    import numpy as np

    return (np.asarray(Atlas.open(url).corpus["tokens"][0]).tolist(),
            {"pid": os.getpid(), "endpoint": os.environ.get("AWS_ENDPOINT_URL")})  # fmt: skip


@pytest.mark.slow
def test_ray_workers_reach_the_atlas_with_the_drivers_credentials(s3, s3_atlas: str,
                                                                 ray_cluster) -> None:  # fmt: skip
    """Ray workers read and write the S3 atlas themselves: the runtime hands the driver's
    object-store settings (endpoint, credentials) to every worker it starts."""
    from flows.config import ResourcesConfig
    from flows.runtime import Runtime

    want = np.asarray(Atlas.open(s3_atlas).corpus["tokens"][0]).tolist()
    with Runtime(ResourcesConfig(backend="ray", workers=2)) as rt:
        outs = [rt.call(_read_on_worker, s3_atlas) for _ in range(2)]
    assert [row for row, _ in outs] == [want, want]
    assert len({who["pid"] for _, who in outs} | {os.getpid()}) == 3  # two workers, not here
    assert {who["endpoint"] for _, who in outs} == {os.environ["AWS_ENDPOINT_URL"]}


def test_query_and_verify_on_s3(s3_atlas: str, capsys: pytest.CaptureFixture[str]) -> None:
    from flows.cli import main

    assert main(["info", s3_atlas, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["complete"] and info["path"] == s3_atlas  # the URL intact
    assert main(["neuron", s3_atlas, "tiny", "1", "3", "--k", "2", "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["index"] == 3 and len(rec["examples"]) == 2
    assert main(["verify", s3_atlas, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"]


def test_rerun_and_resume_do_nothing(s3_atlas: str, s3_arrays: dict[str, bytes],
                                    tiny_model_dir: Path) -> None:  # fmt: skip
    assert _run(_job(s3_atlas, tiny_model_dir))["models"][0]["tokens"] == 0
    assert _run(_job(s3_atlas, tiny_model_dir), resume=True)["models"][0]["tokens"] == 0
    assert _arrays(s3_atlas) == s3_arrays  # type: ignore[arg-type]


def test_overwrite_on_s3_is_refused_and_the_atlas_kept(
    s3_atlas: str, s3_arrays: dict[str, bytes], tiny_model_dir: Path
) -> None:
    """No atomic rename on an object store: --overwrite could not swap a new atlas in safely."""
    from storage.atlas import AtlasError

    with pytest.raises(AtlasError, match="no atomic rename"):
        _run(_job(s3_atlas, tiny_model_dir), overwrite=True)
    assert _arrays(s3_atlas) == s3_arrays  # type: ignore[arg-type]


def test_foreign_prefix_is_refused_and_kept(s3, tiny_model_dir: Path) -> None:
    from storage.atlas import AtlasError

    s3.pipe_file("atlases/photos/cat.jpg", b"not an atlas")
    with pytest.raises(AtlasError, match="not an atlas"):
        _run(_job("s3://atlases/photos", tiny_model_dir))  # type: ignore[arg-type]
    assert s3.cat_file("atlases/photos/cat.jpg") == b"not an atlas"
    assert s3.ls("atlases/photos") == ["atlases/photos/cat.jpg"]


def test_second_run_on_s3_is_refused(s3, s3_atlas: str, tiny_model_dir: Path) -> None:
    from storage.lease import AtlasBusy, Lease, break_lease

    busy = pytest.raises(AtlasBusy, match=r"in use by pid \d+ .*\(job first\)")
    with Lease(s3_atlas, job="first"), busy:
        _run(_job(s3_atlas, tiny_model_dir))  # type: ignore[arg-type]
    assert not s3.exists("atlases/.tiny.zarr.lease.json")  # released
    # a holder killed without releasing: refused as stale until the lease is broken
    s3.pipe_file("atlases/.tiny.zarr.lease.json", json.dumps(
        {"pid": 1, "host": "gone", "started": "2026-01-01T00:00:00+00:00", "expires": 0}).encode())  # fmt: skip
    with pytest.raises(AtlasBusy, match="--break-lease"):
        _run(_job(s3_atlas, tiny_model_dir))  # type: ignore[arg-type]
    assert break_lease(s3_atlas)["host"] == "gone"
    assert _run(_job(s3_atlas, tiny_model_dir))["models"][0]["tokens"] == 0


def test_break_lease_from_the_cli(s3, s3_atlas: str, tiny_model_dir: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    from flows.cli import main

    s3.pipe_file("atlases/.tiny.zarr.lease.json", json.dumps(
        {"pid": 7, "host": "gone", "started": "2026-01-01T00:00:00+00:00", "expires": 0}).encode())  # fmt: skip
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(_job(s3_atlas, tiny_model_dir)))  # type: ignore[arg-type]
    assert main(["run", str(job)]) == 2
    assert "--break-lease" in capsys.readouterr().err
    assert main(["run", str(job), "--break-lease"]) == 0
    out = capsys.readouterr()
    assert "held by pid 7 on gone" in out.err and f"atlas: {s3_atlas}" in out.out
    assert not s3.exists("atlases/.tiny.zarr.lease.json")
