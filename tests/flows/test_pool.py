"""The bounded pool (flows.engine.bounded) when workers die: a lost worker's items go to the
workers that are up, a worker that Ray restarts takes work again, and only a pool whose every
worker is gone fails (WorkersLost), on the session's real Ray."""

from __future__ import annotations

import os
import time

import pytest


def _worker_class(ray):
    @ray.remote(num_cpus=0)
    class Worker:
        """Dies (its process exits) on its ``crash_on``-th call of ``run`` in its first life."""

        def __init__(self, crash_on: int, marker: str, delay: float = 0.0):
            self.calls, self.crash_on, self.marker, self.delay = 0, crash_on, marker, delay

        def ready(self) -> int:
            return os.getpid()

        def run(self, x: int) -> tuple[int, int]:
            self.calls += 1
            if self.calls == self.crash_on and not os.path.exists(self.marker):
                open(self.marker, "w").close()
                os._exit(1)
            time.sleep(self.delay)
            return x * x, os.getpid()

    return Worker


@pytest.mark.parametrize("ordered", [False, True])
@pytest.mark.parametrize("restarts", [0, 1])
def test_a_lost_worker_costs_no_item(ray_cluster, tmp_path, ordered: bool, restarts: int) -> None:
    from flows.engine import bounded

    ray = ray_cluster
    W = _worker_class(ray).options(max_restarts=restarts, max_task_retries=0)
    # restarted, the worker is back in ~1-3 s: the others are still busy then
    delay, n = (0.25, 36) if restarts else (0.0, 24)
    actors = [W.remote(3, str(tmp_path / "crashed"), delay),
              W.remote(0, str(tmp_path / "never"), delay)]  # fmt: skip
    first = {ray.get(a.ready.remote()) for a in actors}
    items = list(range(n))
    got = list(bounded(items, lambda s, x: actors[s].run.remote(x), 2, per_slot=2,
                       ordered=ordered, revive=lambda s: actors[s].ready.remote()))  # fmt: skip
    try:
        assert (tmp_path / "crashed").exists()  # the first worker did die mid-run
        assert sorted(x for x, _ in got) == items  # every item once
        assert all(sq == x * x for x, (sq, _) in got)
        if ordered:
            assert [x for x, _ in got] == items
        pids = {pid for _, (_, pid) in got}
        if restarts:  # the restarted worker (a new process) took work again
            assert len(pids - first) == 1, (pids, first)
        else:
            assert len(pids) == 2 and pids <= first
    finally:
        for a in actors:
            ray.kill(a)


def test_a_pool_with_no_worker_left_fails(ray_cluster, tmp_path) -> None:
    from flows.engine import WorkersLost, bounded

    ray = ray_cluster
    W = _worker_class(ray).options(max_restarts=0, max_task_retries=0)
    actors = [W.remote(1, str(tmp_path / f"crashed-{i}")) for i in range(2)]
    try:
        with pytest.raises(WorkersLost, match="every worker was lost"):
            list(bounded(list(range(6)), lambda s, x: actors[s].run.remote(x), 2,
                         revive=lambda s: actors[s].ready.remote()))  # fmt: skip
    finally:
        for a in actors:
            ray.kill(a)


def test_without_revive_a_lost_worker_fails_the_run(ray_cluster, tmp_path) -> None:
    """Ray tasks (seed training) keep Ray's own retries: the pool does not catch the loss."""
    from flows.engine import bounded

    ray = ray_cluster
    W = _worker_class(ray).options(max_restarts=0, max_task_retries=0)
    a = W.remote(1, str(tmp_path / "crashed"))
    try:
        with pytest.raises(ray.exceptions.RayActorError):
            list(bounded([1, 2], lambda s, x: a.run.remote(x), 1))
    finally:
        ray.kill(a)
