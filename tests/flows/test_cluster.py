"""The job on a real two-node Ray cluster on this machine (one GCS, two raylets, loopback):
both nodes work and the run accounting says so; the atlas is the one-node atlas bit for bit;
losing the second node mid-run, or a Prefect retry of the record task, still finishes with
that atlas and counts every shard once; more workers than the cluster can place is a clear
error. The cluster runs in a process of its own (``two_node_driver.py``): this session's
process is already the driver of the session's one-node Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from storage.atlas import Atlas
from tests.flows.test_pipeline import _arrays
from tests.flows.test_pipeline import _job as _pipeline_job

DRIVER = Path(__file__).with_name("two_node_driver.py")
ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow  # a claim about Ray workers, clusters or processes


def _record_entries(path: Path) -> list[dict]:
    (run,) = Atlas.open(path).runs()
    return [st for st in run["stages"] if st["stage"] == "record/tiny"]


def _shards_once(entries: list[dict], n_shards: int) -> None:
    """Every shard in the run accounting exactly once, over all of the stage's entries."""
    done = Counter(s for st in entries for w in st["workers"] for s in w["shards"])
    assert sorted(done) == list(range(n_shards)) and set(done.values()) == {1}, done


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory, tiny_model_dir, prefect_harness) -> dict:
    from prefect.settings import PREFECT_API_URL

    tmp = tmp_path_factory.mktemp("two-nodes")
    jobs = {name: _job(tmp / f"{name}.zarr", tiny_model_dir)
            for name in ("two_nodes", "too_many", "flaky", "lose_node")}  # fmt: skip
    spec = {"out": str(tmp / "out.json"), "jobs": jobs, "flaky_marker": str(tmp / "flaky")}
    (tmp / "spec.json").write_text(json.dumps(spec))
    # the driver makes its cluster without token auth: a token this machine keeps from another
    # cluster (~/.ray/auth_token, written by test_ray_jobs' `ray start`) must not be sent to it
    # (actor creation is then refused: "cancelled before it started running")
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONUNBUFFERED": "1",
           "RAY_AUTH_MODE": "disabled",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    log = tmp / "driver.log"
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, str(DRIVER), str(tmp / "spec.json")], env=env,
                              stdout=f, stderr=subprocess.STDOUT, timeout=600, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, log.read_text()[-6000:]
    out = json.loads((tmp / "out.json").read_text())
    out["seconds"] = time.perf_counter() - t0
    out["atlases"] = {name: Path(j["atlas"]) for name, j in jobs.items()}
    return out


# one_node (tests/conftest.py): this job mapped on the session's one-node Ray, shared with
# test_ray_jobs


def _job(atlas: Path, model: Path) -> dict:
    """test_pipeline's tiny job, without the weight properties (a Ray task of ~8 s here that
    no placement question touches) and with a fixed firing threshold: the default for this
    SwiGLU model, a per-neuron quantile, probes shard 0 in a Ray stage of its own (~10 s of
    worker start-up per run) first. The taxonomy counters are still recorded and compared
    bit for bit with the rest of the atlas."""
    return _pipeline_job(atlas, model, resources={"backend": "ray", "workers": 2},
                         record={"properties": False, "taxonomy": {"threshold": 0.0}})  # fmt: skip


def _same_atlas(a: Path, b: Path) -> None:
    x, y = _arrays(a), _arrays(b)
    assert x.keys() == y.keys()
    assert [k for k in x if x[k] != y[k]] == []


def test_both_nodes_work_and_the_atlas_equals_one_node(two_nodes: dict, one_node: Path) -> None:
    path = two_nodes["atlases"]["two_nodes"]
    (entry,) = _record_entries(path)
    assert "interrupted" not in entry
    nodes = {w["node"] for w in entry["workers"]}
    assert nodes == {two_nodes["head"], two_nodes["second"]}, entry["workers"]
    assert all(w["device"] == "cpu" and w["shards"] for w in entry["workers"])
    _shards_once([entry], len(Atlas.open(path).shard_ranges()))
    _same_atlas(one_node, path)


def test_more_workers_than_the_cluster_places_is_a_clear_error(two_nodes: dict) -> None:
    assert two_nodes["cluster_cpus"] == 3
    assert two_nodes["too_many"] == (
        "field 'resources.workers': 4 workers need 4 CPUs but the Ray cluster has 3; lower "
        "resources.workers (--workers), add nodes, or set resources.scale_down: true to run "
        "with what fits"
    )


def test_losing_a_node_mid_run_still_finishes_the_same_atlas(two_nodes: dict,
                                                             one_node: Path) -> None:  # fmt: skip
    path = two_nodes["atlases"]["lose_node"]
    n_shards = len(Atlas.open(path).shard_ranges())
    removed = two_nodes["removed"]
    assert 1 <= removed["shards_recorded"] < n_shards  # removed mid-run
    assert removed["at"] < two_nodes["lose_node_finished"]
    assert two_nodes["alive_nodes"] == [two_nodes["head"]]
    (entry,) = _record_entries(path)  # the pool carried on: no failed attempt, no retry
    assert "interrupted" not in entry
    _shards_once([entry], n_shards)
    assert Atlas.open(path).info()["complete"]
    _same_atlas(one_node, path)


def test_a_prefect_retry_counts_every_shard_once(two_nodes: dict, one_node: Path) -> None:
    path = two_nodes["atlases"]["flaky"]
    failed, retried = _record_entries(path)  # the failed attempt, then Prefect's retry
    assert failed["interrupted"].startswith("RayTaskError"), failed
    assert "interrupted" not in retried
    _shards_once([failed, retried], len(Atlas.open(path).shard_ranges()))
    _same_atlas(one_node, path)


def test_runtime(two_nodes: dict) -> None:
    """Keeps the module's cost in view (what the driver took, stage by stage)."""
    print(json.dumps(two_nodes["timings"]), f"total with start-up {two_nodes['seconds']:.1f} s")
    assert two_nodes["seconds"] < 300
