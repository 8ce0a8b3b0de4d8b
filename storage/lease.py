"""One job per atlas: the lease a run holds on its atlas from before its first write.

Two runs on one atlas would duplicate work, delete each other's partials and lose updates
to the manifest (a read-modify-write document).

- On local disk the lease is an exclusive ``flock`` on ``.<atlas name>.lock`` beside the
  atlas, removed on release: the kernel drops the lock when the holder exits, however it
  exits, so a local lease can never go stale (a killed holder leaves the empty file).
- On an object store it is an object ``.<atlas name>.lease.json`` beside the atlas,
  created with a conditional write (create only if absent), renewed by a heartbeat and
  deleted on release. A holder killed without releasing leaves it behind until it
  expires; ``neuronmap run --break-lease`` removes one whose holder is known to be gone.

The holder records who it is (host, pid, start time, job) so that a refused run can say so.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from storage.errors import AtlasError
from storage.location import is_url


class AtlasBusy(AtlasError):
    """Another run holds the atlas's lease."""


def lock_path(atlas: str | Path) -> Path:
    p = Path(str(atlas).removeprefix("file://")).absolute()
    return p.with_name(f".{p.name}.lock")


def _describe(h: dict[str, Any]) -> str:
    if not h:
        return "another run"
    job = f" (job {h['job']})" if h.get("job") else ""
    return f"pid {h.get('pid')} on {h.get('host')} since {h.get('started')}{job}"


def _holder_info(job: str) -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "job": job,
            "started": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")}  # fmt: skip


def Lease(atlas: str | Path, job: str = "") -> LocalLease | ObjectLease:  # noqa: N802
    """``with Lease(atlas, job="..."):`` holds the atlas for one run: a file lock on local
    disk, a lease object on an object store."""
    return ObjectLease(str(atlas), job) if is_url(atlas) else LocalLease(atlas, job)


def break_lease(atlas: str | Path) -> dict[str, Any]:
    """Remove an object-store lease left by a run that is gone; returns who held it. A local
    lease ends with its process and never needs breaking."""
    if not is_url(atlas):
        raise AtlasError(f"{atlas} is on local disk: its lease ends with the process holding "
                         "it, there is nothing to break")  # fmt: skip
    lease = ObjectLease(str(atlas))
    held = lease.holder()
    if held:
        lease.fs.rm(lease.key)
    return held


class ObjectLease:
    """The lease object of an atlas on an object store (see the module docstring)."""

    TTL = 90.0
    """Seconds a lease stays valid without a heartbeat (renewed every TTL/3)."""

    def __init__(self, atlas: str, job: str = "") -> None:
        import fsspec

        self.atlas, self.job = atlas, job
        self.fs, root = fsspec.core.url_to_fs(atlas)
        root = root.rstrip("/")
        parent, _, name = root.rpartition("/")
        self.key = f"{parent}/.{name}.lease.json"
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def holder(self) -> dict[str, Any]:
        try:
            return json.loads(self.fs.cat_file(self.key))
        except (FileNotFoundError, ValueError):
            return {}

    def _body(self) -> bytes:
        return json.dumps(_holder_info(self.job) | {"token": self.token,
                                                    "expires": time.time() + self.TTL}).encode()  # fmt: skip

    def __enter__(self) -> ObjectLease:
        try:
            with self.fs.open(self.key, "xb") as f:  # create only if absent (conditional PUT)
                f.write(self._body())
        except FileExistsError:
            h = self.holder()
            stale = h and float(h.get("expires", 0)) < time.time()
            hint = ("its lease expired without being released: if that run is gone, rerun "
                    "with --break-lease") if stale else "wait for it to finish or stop it"  # fmt: skip
            raise AtlasBusy(f"{self.atlas} is in use by {_describe(h)}; {hint}") from None
        except OSError as e:
            raise AtlasError(f"cannot lease {self.atlas}: {e}") from None
        self._beat = threading.Thread(target=self._heartbeat, daemon=True, name="atlas-lease")
        self._beat.start()
        return self

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.TTL / 3):
            if self.holder().get("token") != self.token:  # broken and taken by another run
                return
            self.fs.pipe_file(self.key, self._body())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self.holder().get("token") == self.token:
            self.fs.rm(self.key)


class LocalLease:
    """The ``flock`` lease of a local atlas. Not re-entrant: a second lease on the same
    atlas is refused within one process too (flock locks belong to an open file)."""

    def __init__(self, atlas: str | Path, job: str = "") -> None:
        self.path = lock_path(atlas)
        self.atlas = str(atlas)
        self.job = job
        self._fd: int | None = None

    def holder(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def __enter__(self) -> LocalLease:
        for _ in range(100):
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise AtlasBusy(
                    f"{self.atlas} is in use by {_describe(self.holder())}; wait for it to "
                    "finish or stop it (a local lease ends with its process)"
                ) from None
            try:  # the holder we waited on may have removed the file as it released it
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        else:
            raise AtlasError(f"cannot lease {self.atlas}: {self.path} keeps changing")
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_holder_info(self.job)).encode(), 0)
        self._fd = fd
        return self

    def _open(self) -> int:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)  # as writing the atlas would
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise AtlasError(f"cannot lease {self.atlas}: {e.strerror} ({self.path})") from None

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:  # remove, then unlock: a waiter re-checks the inode
            self.path.unlink(missing_ok=True)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
