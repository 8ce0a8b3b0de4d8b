"""The driver of tests/flows/test_cluster.py, run as a process of its own (the test session's
process is already connected to its one-node Ray; a driver joins one cluster only).

It starts a real two-node Ray cluster on this machine (one GCS, two raylets, loopback only:
``ray.cluster_utils.Cluster``, as Ray's own tests do), points ``map_neurons`` at it through
``resources.ray_address`` and runs, in order:

1. ``two_nodes``: the tiny job with two workers;
2. ``too_many``: more workers than the cluster can place (the error is kept);
3. ``flaky``: a late shard (5: two have landed before it is sent) fails once with an error that is no user error, so Prefect retries the
   record task, which resumes from the manifest;
4. ``lose_node``: the second node is removed (its processes killed) once a shard is recorded.

Usage: ``python two_node_driver.py SPEC.json`` (``SPEC``: ``{"out": path, "jobs": {name:
job dict}, "flaky_marker": path}``); it writes what the test checks to ``out``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import threading
import time
from pathlib import Path

# Seconds added to every shard of the runs that must still be running when something happens
# to them (the tiny model records a shard in milliseconds).
SLOW_S = 0.6


def _slow(persist, seconds: float, flaky_marker: str | None = None, flaky_shard: int = 5):
    """``persist`` behind a delay (and, with ``flaky_marker``, failing once on ``flaky_shard``).
    Defined in ``__main__``: Ray ships it to the workers by value."""

    def persist_slowly(shard, consumers):
        time.sleep(seconds)
        if flaky_marker is not None and shard.index == flaky_shard:
            marker = Path(flaky_marker)
            if not marker.exists():
                marker.write_text("failed once")
                raise RuntimeError(f"injected failure on shard {shard.index}")
        return persist(shard, consumers)

    return persist_slowly


def _patch_record(seconds: float, flaky_marker: str | None = None) -> None:
    import flows.record as record

    original = getattr(record.record_stage, "__wrapped__", record.record_stage)

    def record_stage(*args, **kwargs):
        st = original(*args, **kwargs)
        return dataclasses.replace(st, persist=_slow(st.persist, seconds, flaky_marker))

    record_stage.__wrapped__ = original  # type: ignore[attr-defined]
    record.record_stage = record_stage


def _shards_recorded(atlas: Path, stage: str) -> int:
    manifest = atlas / "_manifest" / "zarr.json"
    try:
        entry = json.loads(manifest.read_text())["attributes"].get(stage, {})
    except (OSError, ValueError, KeyError):
        return 0
    return len(entry.get("shards", []))


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    from ray.cluster_utils import Cluster

    out: dict = {"timings": {}}
    t0 = time.perf_counter()
    # a node that dies is noticed in ~1 s (default: ~5-30 s)
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1,
        "_system_config": {"health_check_period_ms": 500, "health_check_timeout_ms": 500,
                           "health_check_failure_threshold": 2},
    })  # fmt: skip
    second = cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    out["head"], out["second"] = cluster.head_node.node_id, second.node_id
    out["address"] = cluster.address
    out["timings"]["cluster"] = time.perf_counter() - t0

    from flows.config import parse_job
    from flows.pipeline import map_neurons
    from ops.errors import ConfigError

    def job(name: str, **resources) -> object:
        j = spec["jobs"][name]
        j["resources"] = {**j.get("resources", {}), "ray_address": cluster.address, **resources}
        return parse_job(j)

    t = time.perf_counter()
    map_neurons(job("two_nodes"))
    out["timings"]["two_nodes"] = time.perf_counter() - t

    import ray

    out["cluster_cpus"] = ray.cluster_resources().get("CPU")
    t = time.perf_counter()
    try:
        map_neurons(job("too_many", workers=4))
        out["too_many"] = None
    except ConfigError as e:
        out["too_many"] = str(e)
    out["timings"]["too_many"] = time.perf_counter() - t

    t = time.perf_counter()
    _patch_record(0.05, spec["flaky_marker"])
    map_neurons(job("flaky"))
    out["timings"]["flaky"] = time.perf_counter() - t

    _patch_record(SLOW_S)
    atlas = Path(spec["jobs"]["lose_node"]["atlas"])
    removed: dict = {}

    def remove_when_recording() -> None:
        deadline = time.time() + 300
        while _shards_recorded(atlas, "record/tiny") < 1 and time.time() < deadline:
            time.sleep(0.02)
        removed["shards_recorded"] = _shards_recorded(atlas, "record/tiny")
        cluster.remove_node(second, allow_graceful=False)
        removed["at"] = time.perf_counter()

    t = time.perf_counter()
    remover = threading.Thread(target=remove_when_recording, daemon=True)
    remover.start()
    map_neurons(job("lose_node"))
    out["lose_node_finished"] = time.perf_counter()
    remover.join(timeout=60)
    out["removed"] = removed
    out["alive_nodes"] = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
    out["timings"]["lose_node"] = time.perf_counter() - t
    out["timings"]["total"] = time.perf_counter() - t0
    Path(spec["out"]).write_text(json.dumps(out, indent=1))
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main()
