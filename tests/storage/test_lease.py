"""One run per atlas: a second holder is refused with the first one named; a killed holder's
lease ends with it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from storage.lease import AtlasBusy, Lease, lock_path

HOLD = """
import sys, time
from storage.lease import Lease
with Lease(sys.argv[1], job="job-a.yaml"):
    print("held", flush=True)
    time.sleep(60)
"""


def _holder(atlas: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(atlas)], stdout=subprocess.PIPE,
                            text=True, cwd=Path(__file__).parents[2])  # fmt: skip
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_second_run_is_refused_naming_the_holder(tmp_path: Path) -> None:
    atlas = tmp_path / "a.zarr"
    proc = _holder(atlas)
    try:
        with pytest.raises(AtlasBusy, match=rf"pid {proc.pid} on .* \(job job-a.yaml\)"), Lease(atlas):
            pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # the kernel dropped the killed holder's lock: no stale lease, no --break-lease needed
    with Lease(atlas, job="b") as lease:
        assert lease.holder()["pid"] == os.getpid()
    assert not lock_path(atlas).exists()  # released: nothing left beside the atlas


def test_second_lease_in_the_same_process_is_refused(tmp_path: Path) -> None:
    atlas = tmp_path / "a.zarr"
    first = Lease(atlas, job="one")
    with first, pytest.raises(AtlasBusy, match=rf"pid {os.getpid()} .*one"), Lease(atlas):
        pass
    with Lease(atlas):  # released above
        pass


def test_lease_refuses_an_unwritable_place(tmp_path: Path) -> None:
    from storage.errors import AtlasError

    (tmp_path / "file").write_text("x")
    with pytest.raises(AtlasError, match="cannot lease"), Lease(tmp_path / "file" / "a.zarr"):
        pass


def test_holder_released_on_normal_exit(tmp_path: Path) -> None:
    atlas = tmp_path / "a.zarr"
    proc = _holder(atlas)
    proc.terminate()
    proc.wait()
    t0 = time.time()
    with Lease(atlas):
        pass
    assert time.time() - t0 < 5
