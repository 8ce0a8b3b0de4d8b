"""The temporary local Prefect API server of a laptop run, started so that it fits one.

With no ``PREFECT_API_URL``, Prefect starts a temporary API server in a subprocess
(``SubprocessASGIServer``). Started Prefect's way, it fails a laptop run three ways:

- its start-up timeout (20 s) is shorter than creating a fresh database takes on a busy
  2-core machine, so first runs died with "Timed out while attempting to connect to
  ephemeral Prefect API server";
- it shares the terminal's process group, so Ctrl-C stops it as well as the run, and the
  interrupted run then spends minutes trying to report itself to a server that is gone;
- only an ``atexit`` hook stops it, so it lives on after a driver killed with SIGKILL.

:func:`install` registers a :class:`GuardedServer` as the instance Prefect uses (the hook
``prefect_test_harness`` uses for its own server). It waits up to :func:`startup_timeout`
seconds, runs in a session of its own (terminal signals reach the run only, which then
stops it), and a watchdog thread inside it shuts it down once its parent process is gone.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Any

STARTUP_ENV = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
STARTUP_TIMEOUT = 180
"""Seconds allowed for the server to start: a fresh database on a busy 2-core machine took
longer than Prefect's 20 s; an unreachable server still fails, only later."""

GUARD = r"""
import os, runpy, signal, sys, threading, time

parent, module = int(sys.argv[1]), sys.argv[2]


def watch():
    while os.getppid() == parent:  # re-parented once the parent is gone, however it died
        time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGTERM)  # uvicorn's clean shutdown (< 1 s when idle)
    time.sleep(5)
    os._exit(1)  # still starting up, say: SQLite keeps the database consistent


threading.Thread(target=watch, daemon=True).start()
sys.argv = [module, *sys.argv[3:]]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""
"""Runs ``python -m MODULE ARGS`` (``-c GUARD PARENT_PID MODULE ARGS``) with the watchdog."""


def startup_timeout() -> int:
    """The user's ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS`` when set, else 180 s."""
    try:
        return int(os.environ[STARTUP_ENV])
    except (KeyError, ValueError):
        return STARTUP_TIMEOUT


class _GuardedSubprocess:
    """``subprocess`` as Prefect's server module sees it while it launches the server: the
    module itself, except that ``python -m ...`` runs under :data:`GUARD`, in a session of
    its own."""

    def __init__(self, real: Any) -> None:
        self._real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def Popen(self, args: list[str], **kwargs: Any) -> Any:  # noqa: N802 - subprocess's name
        if list(args[:2]) == [sys.executable, "-m"]:
            args = [sys.executable, "-c", GUARD, str(os.getpid()), *args[2:]]
            kwargs["start_new_session"] = True
        return self._real.Popen(args, **kwargs)


@functools.cache
def _guarded_class() -> type:
    from prefect.server.api import server as api

    class GuardedServer(api.SubprocessASGIServer):
        """Prefect's temporary server, with a start-up timeout sized for a busy machine, in
        its own session, and ending with its parent (see the module docstring)."""

        def start(self, timeout: int | None = None) -> None:
            super().start(timeout or startup_timeout())

        def _run_uvicorn_command(self) -> Any:
            # Prefect builds the command and environment; only how it is spawned changes
            real = api.subprocess
            api.subprocess = _GuardedSubprocess(real)
            try:
                return super()._run_uvicorn_command()
            finally:
                api.subprocess = real

    return GuardedServer


def install() -> None:
    """Make the temporary server Prefect starts when no API URL is set a guarded one.
    Idempotent; leaves alone a server already registered (running, or a test harness's)."""
    from prefect.server.api.server import SubprocessASGIServer

    if None not in SubprocessASGIServer._instances:
        _guarded_class()()  # SubprocessASGIServer.__new__ registers it under None
