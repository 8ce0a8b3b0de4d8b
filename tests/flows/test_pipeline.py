"""The map_neurons flow end to end on the Prefect harness and Zarr, its numbers on the local
backend (every worker claim is on Ray: local = Ray with 1 worker = Ray with 2, kill and resume).

The atlas is checked against a float64 numpy computation over activations captured
independently (plain forward pre-hooks, no neuronmap code on the capture path).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from flows.config import parse_job
from ops.errors import CorpusError, ModelError
from ops.stats import bin_index_np
from storage.atlas import Atlas, AtlasError
from storage.lease import AtlasBusy, Lease

LAYERS = [0, 1, 2]


def _job(atlas: Path, model_dir: Path, **over) -> dict:
    job = {
        "atlas": str(atlas),
        "corpus": {"source": "bundled", "seq_len": 24, "max_tokens": 2500,
                   "shard_sequences": 16},
        "models": [{"name": "tiny", "source": str(model_dir), "dtype": "float32"}],
        "layers": "all",
        "record": {"topk": 6, "hist_bins": 32, "hist_min": 1e-3, "hist_max": 10.0,
                   "batch_size": 4, "sample_tokens": 200},
        # numbers are proven on the local backend (no Ray start-up); the Ray claims say ray
        "resources": {"backend": "local"},
    }  # fmt: skip
    for k, v in over.items():
        job[k] = {**job[k], **v} if isinstance(v, dict) and isinstance(job.get(k), dict) else v
    return job


def _run(job: dict, **kw):
    from flows.pipeline import map_neurons

    return map_neurons(parse_job(job), **kw)


def _arrays(path: Path) -> dict[str, bytes]:
    """Every stored array of the atlas as bytes, keyed by path (for bitwise comparison)."""
    import zarr

    root = zarr.open_group(str(path), mode="r")
    out = {}

    def walk(g, prefix):
        for name, a in g.arrays():
            out[f"{prefix}{name}"] = np.ascontiguousarray(a[...]).tobytes()
        for name, sub in g.groups():
            walk(sub, f"{prefix}{name}/")

    walk(root, "")
    return out


def _reference_activations(model_dir: Path, atlas: Atlas, batch: int) -> dict[int, np.ndarray]:
    """Activations of every layer for every token, in the atlas's shard/batch layout."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    acts: dict[int, list[np.ndarray]] = {i: [] for i in LAYERS}
    hooks = [
        model.model.layers[i].mlp.down_proj.register_forward_pre_hook(
            lambda _m, args, i=i: acts[i].append(args[0].detach().reshape(-1, args[0].shape[-1]).numpy().copy())
        )
        for i in LAYERS
    ]  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers run
    try:
        for s in range(len(atlas.shard_ranges())):
            tokens, mask = atlas.read_shard(s)
            for a in range(0, len(tokens), batch):
                ids = torch.from_numpy(tokens[a : a + batch].astype(np.int64))
                with torch.no_grad():
                    model(input_ids=ids)
    finally:
        torch.set_num_threads(threads)
        for h in hooks:
            h.remove()
    return {i: np.concatenate(v) for i, v in acts.items()}


@pytest.fixture(scope="module")
def mapped(tiny_atlas: Path) -> Path:
    """The tiny job's atlas (tests/conftest.py: mapped once per session, test_object_store
    compares with it too)."""
    return tiny_atlas


def test_atlas_matches_float64_numpy(mapped: Path, tiny_model_dir: Path) -> None:
    atlas = Atlas.open(mapped)
    assert atlas.models == ["tiny"] and atlas.layers("tiny") == LAYERS
    mask = atlas.corpus["mask"][...].reshape(-1)
    positions = np.flatnonzero(mask)
    acts = _reference_activations(tiny_model_dir, atlas, batch=4)
    sample_pos = atlas.corpus["sample_positions"][...]
    for layer in LAYERS:
        x = acts[layer][mask]
        x64 = x.astype(np.float64)
        st = atlas.stats("tiny", layer)
        mean = x64.mean(0)
        c = x64 - mean
        var = (c**2).mean(0)
        assert st["count"][0] == len(x) == atlas.corpus.attrs["n_tokens"]
        np.testing.assert_allclose(st["mean"], mean, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(st["var"], var, rtol=1e-5)
        np.testing.assert_allclose(st["skew"], (c**3).mean(0) / var**1.5, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(st["kurt"], (c**4).mean(0) / var**2, rtol=1e-4)
        np.testing.assert_allclose(st["min"], x.min(0), rtol=1e-6)
        np.testing.assert_allclose(st["max"], x.max(0), rtol=1e-6)
        np.testing.assert_allclose(st["frac_active"], (x > 0).mean(0), atol=2 / len(x))
        bins = bin_index_np(x, st["hist_edges"])
        ref_hist = np.stack([np.bincount(bins[:, j], minlength=32) for j in range(x.shape[1])])
        np.testing.assert_array_equal(st["hist"], ref_hist)
        # top-k: canonical order (value desc, then position asc), exact
        vals = atlas.model_group("tiny")["layers"][str(layer)]["topk"]["values"][...]
        pos = atlas.model_group("tiny")["layers"][str(layer)]["topk"]["positions"][...]
        order = np.lexsort((np.broadcast_to(positions[:, None], x.shape), -x64), axis=0)[:6].T
        np.testing.assert_array_equal(pos, positions[order])
        np.testing.assert_array_equal(vals, np.take_along_axis(x.T, order, 1))
        full = acts[layer]
        assert mask[pos].all()  # never a BOS or pad position
        # the stored sample holds the activations at the sampled positions (float16)
        sample = atlas.model_group("tiny")["layers"][str(layer)]["sample"][...]
        ok = sample_pos >= 0
        assert ok.sum() >= 200
        np.testing.assert_allclose(sample[ok], full[sample_pos[ok]].astype(np.float16), rtol=1e-3)
        assert mask[sample_pos[ok]].all()
        _check_taxonomy(atlas, layer, x, positions)


def _check_taxonomy(atlas: Atlas, layer: int, x: np.ndarray, positions: np.ndarray) -> None:
    """The taxonomy's counters against numpy over the same activations: the quantile
    thresholds from shard 0, fires per position bucket and source, trigger tokens, bigrams."""
    from collections import Counter

    from ops.taxonomy import BIGRAM_BASE, position_buckets

    t = atlas.taxonomy("tiny", layer)
    attrs = atlas.taxonomy_attrs("tiny", layer)
    assert attrs["firing"]["rule"] == "quantile" and attrs["firing"]["q"] == 0.99  # SwiGLU
    seq_len = atlas.corpus.attrs["seq_len"]
    in0 = positions < atlas.shard_ranges()[0][1] * seq_len
    np.testing.assert_allclose(t["threshold"], np.quantile(x[in0].astype(np.float64), 0.99, axis=0),
                               rtol=1e-6)  # fmt: skip
    fired = x > t["threshold"]
    np.testing.assert_array_equal(t["fires"], fired.sum(0))
    bucket = position_buckets(seq_len, 8)[positions % seq_len]
    for b in range(8):
        sel = bucket == b
        if sel.any():
            np.testing.assert_allclose(t["pos_rate"][:, b], fired[sel].mean(0), rtol=1e-12)
            np.testing.assert_allclose(t["pos_mean"][:, b], x[sel].astype(np.float64).mean(0),
                                       rtol=1e-6, atol=1e-9)  # fmt: skip
    src = atlas.corpus["sources"][...][positions // seq_len]
    for k in range(len(attrs["sources"])):
        sel = src == k
        np.testing.assert_allclose(t["source_rate"][:, k], fired[sel].mean(0), rtol=1e-12)
        np.testing.assert_allclose(t["source_mean"][:, k], x[sel].astype(np.float64).mean(0),
                                   rtol=1e-6, atol=1e-9)  # fmt: skip
    flat = atlas.corpus["tokens"][...].reshape(-1).astype(np.int64)
    tok, prev = flat[positions], flat[positions - 1]  # recorded positions never start a row
    for j in range(x.shape[1]):
        f = fired[:, j]
        for which, true in (("tok", Counter(tok[f].tolist())),
                            ("bi", Counter((prev[f] * BIGRAM_BASE + tok[f]).tolist()))):  # fmt: skip
            items, counts, err = t[f"{which}_items"][j], t[f"{which}_counts"][j], t[f"{which}_err"][j]
            got = {int(i): int(c) for i, c in zip(items, counts, strict=True) if i >= 0}
            if len(true) <= len(items):  # exact while the summary holds every item
                assert err == 0 and got == dict(true), (layer, j, which)
            else:  # Misra-Gries: every count an underestimate by at most err
                assert err > 0 and all(true[i] - err <= c <= true[i] for i, c in got.items())
                assert all(c <= err for i, c in true.items() if i not in got), (layer, j, which)


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_local_equals_ray_with_one_and_two_workers(mapped: Path, tiny_model_dir: Path,
                                                   tmp_path: Path, ray_cluster, workers: int
                                                   ) -> None:  # fmt: skip
    """The same job on Ray actors (1 and 2 workers) gives the local backend's atlas, array by
    array; each Ray worker loaded the model once for the whole job (firing probe, record,
    properties: three stages, one load)."""
    other = tmp_path / f"ray{workers}.zarr"
    _run(_job(other, tiny_model_dir, resources={"backend": "ray", "workers": workers}))
    a, b = _arrays(mapped), _arrays(other)
    assert a.keys() == b.keys()
    different = [k for k in a if a[k] != b[k]]
    assert not different, different
    (run,) = Atlas.open(other).runs()
    stages = [st["stage"] for st in run["stages"]]
    assert stages[:2] == ["firing/tiny", "record/tiny"], stages
    loads = run["model_loads"]
    assert len(loads) == workers and len({w["pid"] for w in loads}) == workers
    assert all(w["node"] != "local" and w["device"] == "cpu" for w in loads)
    assert [w["model_loads"] for w in loads] == [{f"{tiny_model_dir} (float32)": 1}] * workers
    used = {w["pid"] for st in run["stages"] for w in st["workers"]}
    assert used <= {w["pid"] for w in loads}  # every stage ran on the job's workers


def test_local_backend_loads_the_model_once_in_this_process(mapped: Path, tiny_model_dir: Path
                                                            ) -> None:  # fmt: skip
    (run,) = Atlas.open(mapped).runs()
    (w,) = run["model_loads"]
    assert w["node"] == "local" and w["pid"] == os.getpid()
    assert w["model_loads"] == {f"{tiny_model_dir} (float32)": 1}


def test_finished_atlas_is_complete_and_verifies(mapped: Path) -> None:
    """A finished job leaves no partials, says it is complete, and every chunk checks out."""
    from storage.integrity import verify

    info = Atlas.open(mapped).info()
    assert info["complete"] is True and info["pending"] == []
    assert not (mapped / "_work").exists()
    rep = verify(str(mapped))
    assert rep["ok"] and rep["unchecked"] == [] and rep["chunks"] > 0, rep


def test_completed_rerun_is_a_noop(mapped: Path, tiny_model_dir: Path) -> None:
    before = _arrays(mapped)
    out = _run(_job(mapped, tiny_model_dir))
    assert out["models"][0]["tokens"] == 0  # nothing recorded or merged again
    assert _arrays(mapped) == before


@pytest.mark.slow
def test_kill_and_resume_gives_the_same_atlas(
    mapped: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Kill a real `neuronmap run` mid-recording, resume it, compare with the clean run."""
    path = tmp_path / "killed.zarr"
    job = _job(path, tiny_model_dir, resources={"backend": "ray", "workers": 1})
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(job))
    from prefect.settings import PREFECT_API_URL

    # the session's Prefect server: a temporary one of its own would add its start-up (~15 s
    # here) before the first shard; test_run_process runs, kills and interrupts `neuronmap
    # run` with its own temporary server, as from a user's shell
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PREFECT_API_URL": PREFECT_API_URL.value()}
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "run", str(job_file)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    manifest = path / "_manifest" / "zarr.json"
    deadline = time.time() + 240
    try:
        while time.time() < deadline:
            if manifest.exists():
                shards = json.loads(manifest.read_text())["attributes"].get("record/tiny", {})
                if len(shards.get("shards", [])) >= 2:
                    break
            assert proc.poll() is None, "run finished before it could be killed"
            time.sleep(0.05)
        else:
            pytest.fail("no shard recorded in time")
        # a second run on the same atlas would be refused at once, naming the running one
        with pytest.raises(AtlasBusy, match=rf"in use by pid {proc.pid} on "), Lease(path):
            pass
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    atlas = Atlas.open(path)
    assert not atlas.model_attrs("tiny").get("complete")
    info = atlas.info()
    assert info["complete"] is False and "record/tiny" in info["pending"]
    n_done = len(atlas.done("record/tiny")["shards"])
    assert 2 <= n_done < len(atlas.shard_ranges())
    with pytest.raises(AtlasError, match="--resume"):
        _run(job)
    _run(job, resume=True)
    assert Atlas.open(path).info()["complete"] and not (path / "_work").exists()
    a, b = _arrays(mapped), _arrays(path)
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []


def _tree_hash(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(path)).encode() + p.read_bytes())
    return h.hexdigest()


def test_bad_inputs_give_clear_errors_and_leave_atlas_untouched(
    mapped: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    before = _tree_hash(mapped)
    # a different corpus against the existing atlas
    with pytest.raises(AtlasError, match="different corpus"):
        _run(_job(mapped, tiny_model_dir, corpus={"seq_len": 16}))
    # an unknown model: named in the error, atlas not created
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelError, match="no-such-model"):
        _run(_job(tmp_path / "x.zarr", missing))
    assert not (tmp_path / "x.zarr").exists()
    # an empty corpus
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("\n\n")
    with pytest.raises(CorpusError):
        _run(_job(tmp_path / "y.zarr", tiny_model_dir, corpus={"source": str(empty)}))
    assert not (tmp_path / "y.zarr").exists()
    # a layer the model does not have
    with pytest.raises(Exception, match="out of range"):
        _run(_job(tmp_path / "z.zarr", tiny_model_dir, layers=[0, 7]))
    assert _tree_hash(mapped) == before


def test_neuron_query_decodes_examples(mapped: Path) -> None:
    atlas = Atlas.open(mapped)
    rec = atlas.neuron("tiny", 1, 3, k=3)
    assert len(rec.examples) == 3
    vals = atlas.model_group("tiny")["layers"]["1"]["topk"]["values"][3, :3]
    assert [e.value for e in rec.examples] == pytest.approx(vals.tolist())
    tokens = atlas.corpus["tokens"][...].reshape(-1)
    for e in rec.examples:
        assert "[[" in e.text and e.token == atlas.decode([int(tokens[e.position])])
        assert e.source in atlas.corpus.attrs["source_names"]


def test_failed_overwrite_keeps_the_old_atlas(mapped: Path, tiny_model_dir: Path,
                                              tmp_path: Path) -> None:  # fmt: skip
    """--overwrite with a model whose weights file is corrupt (preflight sees a complete model
    directory): the job fails once recording starts, in the worker's constructor, with the
    worker's error as itself; the old atlas stays byte for byte, nothing is left beside."""
    import shutil

    target = tmp_path / "old.zarr"
    shutil.copytree(mapped, target)
    before = _tree_hash(target)
    broken = tmp_path / "bad-weights"
    shutil.copytree(tiny_model_dir, broken, ignore=shutil.ignore_patterns("*.safetensors"))
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ModelError, match="bad-weights") as e:  # the worker's error, unwrapped
        _run(_job(target, broken, corpus={"seq_len": 16}), overwrite=True)
    assert "Traceback" not in str(e.value)
    assert _tree_hash(target) == before
    left = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("."))  # lease
    assert left == ["bad-weights", "old.zarr"]


def test_overwrite_swaps_in_the_new_atlas(mapped: Path, tiny_model_dir: Path,
                                          tmp_path: Path) -> None:  # fmt: skip
    import shutil

    target = tmp_path / "old.zarr"
    shutil.copytree(mapped, target)
    # a fixed firing threshold: no quantile probe of shard 0 (a Ray stage of its own) in a
    # test that does not look at the taxonomy
    out = _run(_job(target, tiny_model_dir, corpus={"seq_len": 16, "max_tokens": 800},
                    record={"sample_tokens": 0, "taxonomy": {"threshold": 0.0}}),
               overwrite=True)  # fmt: skip
    assert out["atlas"] == str(target)
    atlas = Atlas.open(target)
    assert atlas.corpus.attrs["seq_len"] == 16 and atlas.model_attrs("tiny")["complete"]
    assert atlas.model_attrs("tiny")["compute_dtype"] == {"float32": "asked for"}
    assert "atlas" not in atlas.attrs["job"]  # moved or swapped, its attrs do not lie
    assert [r["run"] for r in atlas.runs()] == [out["run"]]  # the old atlas's history is gone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.zarr"]
    with pytest.raises(Exception, match="contradict"):
        _run(_job(target, tiny_model_dir), resume=True, overwrite=True)
