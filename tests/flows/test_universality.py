"""Universality stage end to end (Ray + Prefect + Zarr) on tiny models sharing a tokenizer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from flows.config import parse_job
from storage.atlas import Atlas

# No test here looks at the neuron taxonomy: a fixed firing threshold instead of the default
# per-neuron quantile (SwiGLU, GELU) spares every job a probe of shard 0 per model, each a Ray
# stage of its own (~10 s of worker start-up on 2 cores). The counters still run.
NO_PROBE = {"threshold": 0.0}


def _permuted_copy(src: Path, dst: Path, seed: int) -> np.ndarray:
    """A copy whose MLP neurons are permuted per layer: same function, neurons relabelled."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src)
    perms = []
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.model.layers:
            mlp = layer.mlp
            p = torch.randperm(mlp.down_proj.in_features, generator=g)
            mlp.gate_proj.weight.copy_(mlp.gate_proj.weight[p])
            mlp.up_proj.weight.copy_(mlp.up_proj.weight[p])
            mlp.down_proj.weight.copy_(mlp.down_proj.weight[:, p])
            perms.append(p.numpy())
    model.save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return np.stack(perms)  # copy neuron j = original neuron perm[j]


def _other_seed(src: Path, dst: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(123)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src)).save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)


@pytest.fixture(scope="module")
def uni_atlas(tmp_path_factory, tiny_model_dir, ray_cluster, prefect_harness):
    from flows.pipeline import map_neurons

    root = tmp_path_factory.mktemp("uni")
    perm = _permuted_copy(tiny_model_dir, root / "perm", seed=7)
    _other_seed(tiny_model_dir, root / "other")
    job = parse_job({
        "atlas": str(root / "a.zarr"),
        "corpus": {"seq_len": 24, "max_tokens": 2000, "shard_sequences": 24},
        "models": [{"name": "base", "source": str(tiny_model_dir), "dtype": "float32"},
                   {"name": "perm", "source": str(root / "perm"), "dtype": "float32"},
                   {"name": "other", "source": str(root / "other"), "dtype": "float32"}],
        "record": {"topk": 4, "hist_bins": 16, "batch_size": 8, "taxonomy": NO_PROBE},
        "universality": {"models": ["base", "perm", "other"], "keep_full": True, "threshold": 0.2},
        # the numbers on the local backend; Ray with 1 worker, killed and resumed, agrees below
        "resources": {"backend": "local", "workers": 2},
    })  # fmt: skip
    out = map_neurons(job)
    return root / "a.zarr", perm, out


def _activations(model_dir: Path, atlas: Atlas) -> np.ndarray:
    """All layers' MLP activations at the recorded positions, [T, L*d], float64 (plain hooks)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokens = atlas.corpus["tokens"][...]
    mask = atlas.corpus["mask"][...].reshape(-1)
    acts = {i: [] for i in range(len(model.model.layers))}
    hooks = [
        layer.mlp.down_proj.register_forward_pre_hook(
            lambda _m, a, i=i: acts[i].append(a[0].reshape(-1, a[0].shape[-1]).detach().numpy())
        )
        for i, layer in enumerate(model.model.layers)
    ]
    with torch.no_grad():
        model(input_ids=torch.from_numpy(tokens.astype(np.int64)))
    for h in hooks:
        h.remove()
    return np.concatenate([np.concatenate(acts[i])[mask] for i in sorted(acts)], 1).astype(
        np.float64
    )


def test_full_correlations_equal_numpy_corrcoef(uni_atlas, tiny_model_dir) -> None:
    path, _, _ = uni_atlas
    atlas = Atlas.open(path)
    a = _activations(tiny_model_dir, atlas)
    b = _activations(path.parent / "other", atlas)
    with np.errstate(invalid="ignore", divide="ignore"):
        ref = np.nan_to_num(np.corrcoef(a, b, rowvar=False)[: a.shape[1], a.shape[1] :])
    got = atlas.pair("base", "other")["corr"]
    assert got.shape == ref.shape == (3 * 48, 3 * 48)
    assert np.abs(got - ref).max() <= 1e-5
    # best partners are the row maxima of that matrix
    p = atlas.pair("base", "other")
    np.testing.assert_allclose(p["max_corr"].reshape(-1), ref.max(1), atol=1e-5)
    np.testing.assert_allclose(p["min_corr"].reshape(-1), ref.min(1), atol=1e-5)
    flat = p["partner_layer"].reshape(-1) * 48 + p["partner_index"].reshape(-1)
    np.testing.assert_allclose(ref[np.arange(len(flat)), flat], ref.max(1), atol=1e-5)


def test_permuted_copy_matches_every_neuron_to_its_image(uni_atlas) -> None:
    path, perm, _ = uni_atlas
    atlas = Atlas.open(path)
    p = atlas.pair("base", "perm")
    inv = np.argsort(perm, axis=1)  # base neuron i is copy neuron inv[i]
    live = p["max_corr"] > 0  # constant neurons correlate 0 and have no defined partner
    assert live.mean() > 0.9
    assert np.allclose(p["max_corr"][live], 1.0, atol=1e-5)
    np.testing.assert_array_equal(p["partner_layer"][live], np.nonzero(live)[0])
    np.testing.assert_array_equal(p["partner_index"][live], inv[live])
    for layer in range(3):
        m, corr = atlas.matching("base", "perm", layer)
        np.testing.assert_array_equal(m[live[layer]], inv[layer][live[layer]])
        assert np.nanmin(corr[live[layer]]) > 1 - 1e-5
    # the rotation baseline is far below the identical-copy correlation
    assert p["baseline_max_corr"][live].mean() < 0.9


def test_family_summary_and_labels(uni_atlas) -> None:
    path, _, out = uni_atlas
    atlas = Atlas.open(path)
    s = atlas.universality_summary("base")[1]
    pb = atlas.pair("base", "perm")["max_corr"][1]
    po = atlas.pair("base", "other")["max_corr"][1]
    np.testing.assert_allclose(s["mean_max_corr"], (pb + po) / 2)
    np.testing.assert_allclose(s["max_max_corr"], np.maximum(pb, po))
    base = (atlas.pair("base", "perm")["baseline_max_corr"][1]
            + atlas.pair("base", "other")["baseline_max_corr"][1]) / 2  # fmt: skip
    np.testing.assert_allclose(s["excess_corr"], s["mean_max_corr"] - base)
    np.testing.assert_array_equal(s["universal"], (s["excess_corr"] > 0.2) & ~s["dead"])
    assert not np.isnan(s["excess_corr"]).any()
    uni = out["universality"]
    assert 0 <= uni["universal_frac"] <= 1 and uni["tokens"] == atlas.corpus.attrs["n_tokens"]
    rows = atlas.universal_neurons(model="base", top=5)
    assert rows and all(r["excess_corr"] > 0.2 for r in rows)
    assert {q["model"] for q in rows[0]["partners"]} == {"perm", "other"}
    assert "[[" in rows[0]["examples"][0]


def test_cli_universal_lists_neurons(uni_atlas, capsys) -> None:
    import json

    from flows.cli import main

    path, _, _ = uni_atlas
    assert main(["universal", str(path), "--model", "base", "--top", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["neurons"]) == 3 and out["neurons"][0]["model"] == "base"
    assert set(out["overview"]) == {"base", "perm", "other"}
    comp = out["summary"]["comparison"]
    assert comp["universal"]["count"] > 0 and "vocab_kurt" in comp["universal"]
    assert main(["universal", str(path)]) == 0
    text = capsys.readouterr().out
    assert "universal neurons:" in text and "baseline" in text and "[[" in text


def test_properties_are_stored_next_to_stats(uni_atlas) -> None:
    path, perm, _ = uni_atlas
    atlas = Atlas.open(path)
    base, cp = atlas.props("base", 0), atlas.props("perm", 0)
    assert {"w_in_norm", "w_out_norm", "cos_in_out", "vocab_kurt", "prediction"} <= set(base)
    # the permuted copy has the same neurons in another order
    np.testing.assert_allclose(cp["w_out_norm"], base["w_out_norm"][perm[0]], rtol=1e-6)
    rec = atlas.neuron("base", 0, 1, k=1)
    assert len(rec.stats["props"]["top_promoted_tokens"]) == 10


@pytest.mark.slow
def test_job_with_seed_family(tmp_path, tiny_model_dir, ray_cluster, prefect_harness, monkeypatch):
    """A job with a `seeds` section trains the family, maps it into families/<name>, compares it."""
    from flows.cli import main
    from flows.pipeline import map_neurons

    monkeypatch.setenv("NEURONMAP_CACHE", str(tmp_path / "cache"))
    job = parse_job({
        "atlas": str(tmp_path / "a.zarr"),
        "corpus": {"seq_len": 24, "max_tokens": 1500, "shard_sequences": 32},
        "models": [{"name": "base", "source": str(tiny_model_dir), "dtype": "float32"}],
        "record": {"topk": 4, "hist_bins": 16, "properties": False, "taxonomy": NO_PROBE},
        "seeds": {"name": "fam", "count": 2, "layers": 1, "d_model": 32, "d_mlp": 64,
                  "n_heads": 2, "vocab_size": 320, "seq_len": 24, "train_tokens": 20000},
        "resources": {"workers": 2},
    })  # fmt: skip
    out = map_neurons(job)
    atlas = Atlas.open(tmp_path / "a.zarr")
    assert atlas.models == ["base"] and atlas.families == ["fam"]
    assert atlas.all_models == ["base", "fam-s0", "fam-s1"]
    fam = atlas.family("fam")
    assert fam.attrs["tokenizer"] != atlas.attrs["tokenizer"]  # its own tokenizer and corpus
    assert atlas.universality_pairs() == [("fam-s0", "fam-s1"), ("fam-s1", "fam-s0")]
    s = atlas.universality_summary("fam-s0")[0]
    assert s["mean_max_corr"].shape == (64,) and out["universality"]["tokens"] > 1000
    # queries reach family models through the root atlas, decoded with the family's vocabulary
    rec = atlas.neuron("fam-s1", 0, 5, k=2)
    assert len(rec.examples) == 2 and "[[" in rec.examples[0].text
    assert main(["info", str(tmp_path / "a.zarr"), "--json"]) == 0
    # the first universality pass recorded both members (one forward per member and batch,
    # no separate record stage), the second correlated them
    run = next(r for r in atlas.runs() if r["run"] == out["run"])
    stages = {st["stage"]: st for st in run["stages"]}
    assert {"record+layers", "universality/pairs", "seeds/fam"} <= set(stages)
    assert not {"record/fam-s0", "record/fam-s1"} & set(stages)
    one = stages["record+layers"]
    assert one["passes_per_token"] == 1.0 and one["tokens"] == fam.corpus.attrs["n_tokens"]
    assert one["forward_passes"] == stages["universality/pairs"]["forward_passes"]
    # its numbers against float64 on plain forwards of both members
    from ops.engine import attention_mask
    from ops.models import capture_mlp, load_model

    tokens, mask = fam.corpus["tokens"][...], fam.corpus["mask"][...]
    flat = np.flatnonzero(mask.reshape(-1))
    acts = []
    for name in ("fam-s0", "fam-s1"):
        a = fam.model_attrs(name)  # the dtype the job recorded in (auto: bfloat16 on CPU)
        lm = load_model(a["source"], dtype=a["dtype"], device="cpu", with_tokenizer=False)
        got = []
        with capture_mlp(lm, [0], lambda _l, a, got=got: got.append(a.reshape(-1, a.shape[-1]))
                         ), torch.no_grad():  # fmt: skip
            lm.model(input_ids=torch.from_numpy(tokens.astype(np.int64)),
                     attention_mask=torch.from_numpy(attention_mask(mask)))  # fmt: skip
        acts.append(got[0].double().numpy()[flat])
    np.testing.assert_allclose(fam.stats("fam-s0", 0)["mean"], acts[0].mean(0), rtol=1e-4,
                               atol=1e-6)  # fmt: skip
    np.testing.assert_allclose(fam.stats("fam-s1", 0)["max"], acts[1].max(0), rtol=1e-5)
    r = np.nan_to_num(np.corrcoef(acts[0].T, acts[1].T)[:64, 64:])
    np.testing.assert_allclose(atlas.pair("fam-s0", "fam-s1")["max_corr"][0], r.max(1),
                               atol=1e-4)  # fmt: skip
    # a rerun reuses the trained seeds and the finished atlas
    again = map_neurons(job)
    assert all(r["tokens"] == 0 for r in again["models"])


@pytest.mark.slow
def test_killed_run_resumes_from_its_checkpoint_and_one_worker_agrees_with_two(
        uni_atlas, tmp_path: Path, tiny_model_dir: Path) -> None:  # fmt: skip
    """Kill a real `neuronmap run` once a pair worker has checkpointed its state (every shard
    here), resume it: the pairs pass continues from the checkpoint (it runs fewer shards than
    the corpus has), and the result, planned for one worker and on other shard boundaries,
    equals the fixture's atlas (planned for two workers; to float64 rounding)."""
    import contextlib
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    import yaml

    path, _, _ = uni_atlas
    root = path.parent
    atlas_path = tmp_path / "killed.zarr"
    job = {
        "atlas": str(atlas_path),
        "corpus": {"seq_len": 24, "max_tokens": 2000, "shard_sequences": 6},
        "models": [{"name": "base", "source": str(tiny_model_dir), "dtype": "float32"},
                   {"name": "perm", "source": str(root / "perm"), "dtype": "float32"}],
        "record": {"topk": 4, "hist_bins": 16, "batch_size": 8, "properties": False,
                   "taxonomy": NO_PROBE},
        "universality": {"models": ["base", "perm"], "threshold": 0.2, "checkpoint_shards": 1},
        # one process, killed: the checkpoint is what resumes (a Ray worker's kill and
        # resume is test_pipeline's; the plan for 1 worker is not the fixture's for 2)
        "resources": {"backend": "local", "workers": 1},
    }  # fmt: skip
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(job))
    from prefect.settings import PREFECT_API_URL

    # the session's Prefect server (a temporary one per run would add its start-up twice)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PREFECT_API_URL": PREFECT_API_URL.value()}
    run = [sys.executable, "-m", "flows.cli", "run", str(job_file)]
    proc = subprocess.Popen(run, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip
    ckpt = atlas_path / "_work" / "_universality" / "ckpt" / "g0" / "zarr.json"
    deadline = time.time() + 400
    try:
        while time.time() < deadline:
            with contextlib.suppress(OSError, ValueError):
                cp = json.loads(ckpt.read_text())["attributes"].get("checkpoint")
                if cp and cp["cursor"] >= 2:
                    break
            assert proc.poll() is None, "run finished before it could be killed"
            time.sleep(0.05)
        else:
            pytest.fail("no pair checkpoint in time")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not Atlas.open(atlas_path).attrs.get("universality")
    done = subprocess.run([*run, "--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    atlas = Atlas.open(atlas_path)
    n_shards = len(atlas.shard_ranges())
    last = atlas.runs()[-1]
    pairs_stage = next(st for st in last["stages"] if st["stage"] == "universality/pairs")
    assert 0 < pairs_stage["tokens"] < atlas.corpus.attrs["n_tokens"], pairs_stage  # resumed
    assert n_shards > 10
    ref = Atlas.open(path)
    for a, b in (("base", "perm"), ("perm", "base")):
        got, want = atlas.pair(a, b), ref.pair(a, b)
        for k in ("max_corr", "min_corr", "baseline_max_corr"):
            np.testing.assert_allclose(got[k], want[k], atol=1e-6, err_msg=f"{a}->{b} {k}")
        clear = want["max_corr"] > 0.5
        np.testing.assert_array_equal(got["partner_index"][clear], want["partner_index"][clear])
    for L in range(3):
        np.testing.assert_array_equal(atlas.matching("perm", "base", L)[0],
                                      ref.matching("perm", "base", L)[0])  # fmt: skip
    assert not (atlas_path / "_work").exists()


def test_the_study_profile_plans_on_1_and_8_gpus(capsys) -> None:
    """The reference study's job (repository file) plans from its config alone: 5 seeds, 10
    pairs, every row once, state per GPU within the budget; 8 GPUs take one wave."""
    import json

    from flows.cli import main

    study = Path(__file__).resolve().parents[2] / "deploy" / "studies" / "universal-neurons-gpt2.yaml"
    assert main(["plan", str(study), "--json"]) == 0
    eight = json.loads(capsys.readouterr().out)
    assert eight["models"] == [f"gpt2-s{i}" for i in range(5)] and eight["workers"] == 8
    assert eight["waves"] == 1 and max(eight["group_bytes"]) <= 80 * 2**30
    rows = sorted((a, b, r) for g in eight["groups"] for a, b, lo, hi in g for r in range(lo, hi))
    assert rows == sorted((a, b, r) for a in range(5) for b in range(a + 1, 5) for r in range(12))
    assert main(["plan", str(study), "--workers", "1", "--memory-gb", "120"]) == 0
    one = capsys.readouterr().out
    assert "2 waves" in one and "min on 1 worker" in one
    # a budget that cannot hold one layer of rows: one line naming the knob, exit 2
    assert main(["plan", str(study), "--memory-gb", "0.5"]) == 2
    assert "universality.memory_gb" in capsys.readouterr().err


def test_a_checkpoint_resumes_only_the_unit_it_is_of(tmp_path: Path) -> None:
    """A checkpoint is written atomically and read back exactly; a unit of the same name that
    holds other work (a run resumed under another plan or worker count) starts afresh."""
    from flows.engine import Shard, Unit
    from flows.universality import _Held, _restore, _save
    from ops.correlation import FamilyMoments
    from ops.plan import PairTile
    from storage.store import Store

    store = Store.create(tmp_path / "a.zarr", {})
    ctx = Shard(-1, store, [])
    layers, d = {0: [0], 1: [0]}, {0: 4, 1: 4}
    held = _Held(FamilyMoments([PairTile(0, 1, 0, 1)], layers, d))
    g = torch.Generator().manual_seed(0)
    held.acc.update({(0, 0): torch.randn(9, 4, generator=g), (1, 0): torch.randn(9, 4, generator=g)})
    unit = Unit("g0", (0, 1, 2), 0)
    _save(ctx, unit, held, 2)
    _save(ctx, unit, held, 3)  # replaces the first: one committed checkpoint
    again = _Held(FamilyMoments([PairTile(0, 1, 0, 1)], layers, d))
    assert _restore(ctx, unit, again) == 3
    for k, v in held.acc.raw().items():
        np.testing.assert_array_equal(again.acc.raw()[k], v)
    other = _Held(FamilyMoments([PairTile(0, 1, 0, 1)], layers, d))
    assert _restore(ctx, Unit("g0", (0, 1), 0), other) == 0 and other.acc.n == 0
    ckpts = [k for k in store.root["_work"]["_universality"]["ckpt"]["g0"].group_keys()]
    assert ckpts == ["ckpt-1"]
