"""The scheduler (flows.runtime.bounded) and the unit runner (flows.engine.run_units) when
workers die: a lost worker's items go to the workers that are up, a worker that Ray restarts
takes work again, the others never wait for it, and only a pool whose every worker is gone
fails (WorkersLost), on the session's real Ray."""

from __future__ import annotations

import os
import time

import pytest

pytestmark = pytest.mark.slow  # a claim about Ray workers, clusters or processes


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


# ------------------------------------------------------------------ units (state across shards)


class _Seen:
    """A unit's state on its worker: the shards it saw and when (no consumers)."""

    def __init__(self) -> None:
        self.consumers: list = []
        self.shards: list[int] = []


def _no_consumers(marker: str, crash_shard: int, delay: float, shard) -> list:
    """Per shard: the worker that runs ``crash_shard`` first dies (its process exits)."""
    if shard.index == crash_shard and not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(1)
    time.sleep(delay)
    return []


def _open(shard, unit) -> _Seen:
    return _Seen()


def _restore(shard, unit, state) -> int:
    return 0


def _save(shard, unit, state, cursor) -> None:
    return None


def _close(shard, unit, state) -> dict:
    return {"unit": unit.key, "t": time.time()}


def test_a_lost_worker_never_stalls_the_other_units(ray_cluster, tmp_path, tiny_atlas,
                                                    tiny_model_dir) -> None:  # fmt: skip
    """Four units of three shards on two Ray workers; one worker dies in its first unit and
    Ray's restart of it takes 30 s (a plugin sleeps on import in its second life). The other
    worker runs the whole queue meanwhile, the lost unit again from its start: the stage ends
    long before the restart would have, every unit once."""
    import json
    import shutil
    from functools import partial

    from flows.config import ModelConfig, ResourcesConfig
    from flows.engine import run_units
    from flows.stage import Span, Stage, Unit
    from ops.models import ARCHS
    from storage.atlas import Atlas
    from tests.flows.plugin_slow_restart import SLOW_RESTART

    path = tmp_path / "a.zarr"
    shutil.copytree(tiny_atlas, path)
    n = len(Atlas.open(path).shard_ranges())
    assert n >= 6
    marker = tmp_path / "crashed"
    SLOW_RESTART.write_text(json.dumps({"marker": str(marker), "seconds": 30}))
    tiny = ModelConfig(name="tiny", source=str(tiny_model_dir), dtype="float32")
    stage = Stage(name="test/units", key="k", models=[tiny],
                  build=partial(_no_consumers, str(marker), 1, 0.2),
                  persist=lambda shard, consumers: {}, batch_size=4,
                  span=Span(open=_open, restore=_restore, save=_save, close=_close,
                            every_s=None))  # fmt: skip
    units = [Unit(f"u{i}", tuple(s % n for s in range(3 * i, 3 * i + 3))) for i in range(4)]
    res = ResourcesConfig(backend="ray", workers=2, max_restarts=1,
                          plugins=["tests.flows.plugin_slow_restart"])  # fmt: skip
    try:
        t0 = time.monotonic()
        out = run_units(stage, str(path), units, res)
        took = time.monotonic() - t0
    finally:
        SLOW_RESTART.unlink(missing_ok=True)
        ARCHS.unregister("slow_restart_test")
    assert marker.exists()  # a worker did die in unit u0 (at shard 1)
    assert sorted(out.units) == [0, 1, 2, 3]
    assert [out.units[i]["unit"] for i in range(4)] == ["u0", "u1", "u2", "u3"]
    assert sorted(Atlas.open(path).done("test/units")["shards"]) == [0, 1, 2, 3]
    assert len({r["pid"] for r in out.units.values()}) == 1  # the one that stayed up
    assert took < 25, took  # not held up by the 30 s restart
