"""Dictionaries stage end to end: SAE + distributed SNMF on a tiny model's activation sample."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from flows.config import parse_job
from ops.engine import attention_mask
from storage.atlas import Atlas


@pytest.fixture(scope="module")
def dict_atlas(tmp_path_factory, tiny_model_dir, ray_cluster, prefect_harness):
    from flows.pipeline import map_neurons

    path = tmp_path_factory.mktemp("dict") / "a.zarr"
    job = parse_job({
        "atlas": str(path),
        "corpus": {"seq_len": 32, "max_tokens": 6000, "shard_sequences": 48},
        "models": [{"name": "tiny", "source": str(tiny_model_dir), "dtype": "float32"}],
        "record": {"topk": 5, "hist_bins": 16, "sample_tokens": 3000, "sample_layers": [1]},
        "dictionaries": {"model": "tiny", "layer": 1, "ce_batches": 2,
                         "sae": [{"name": "tk", "arch": "topk", "expansion": 2, "k": 4,
                                  "batch_size": 256, "epochs": 3},
                                 {"name": "live", "arch": "topk", "expansion": 2, "k": 4,
                                  "batch_size": 256, "epochs": 1, "source": "stream",
                                  "buffer_tokens": 1024}],
                         "snmf": [{"name": "sn", "k": 6, "keep_fraction": 0.2, "iters": 30}],
                         # a random tiny model's KL saturates near 0.01 (see ops tests)
                         "steering": {"features": 1, "target_kl": 0.002, "sequences": 4,
                                      "contrast": ["wiki-fr", "wiki-en"]}},
        "resources": {"backend": "local"},  # the numbers; SNMF over Ray workers: below
    })  # fmt: skip
    out = map_neurons(job)
    return path, job, out


def _sample(atlas: Atlas) -> tuple[np.ndarray, np.ndarray]:
    arr = atlas.model_group("tiny")["layers"]["1"]["sample"][...].astype(np.float32)
    pos = atlas.corpus["sample_positions"][...]
    return arr[pos >= 0], pos[pos >= 0]


def test_sae_is_stored_with_metrics_that_recompute(dict_atlas) -> None:
    from ops import sae as sae_ops

    path, _, out = dict_atlas
    atlas = Atlas.open(path)
    g = atlas.dictionary("tiny", 1, "sae", "tk")
    assert g["W_dec"].shape == (96, 48) and g["W_enc"].shape == (48, 96)
    np.testing.assert_allclose(np.linalg.norm(g["W_dec"][...], axis=1), 1.0, atol=1e-4)
    m = g.attrs["metrics"]
    assert 0 <= m["fvu"] < 1 and 0 < m["l0"] <= 4 + 1e-6 and m["dead_fraction"] <= 1
    assert np.isfinite(m["ce_recovered"]) and m["ce_zero"] > 0 and m["ce_clean"] > 0
    # recompute L0 and FVU from the stored weights and the stored sample
    sae = sae_ops.build_sae(sae_ops.SAEConfig.from_dict(g.attrs["config"]))
    sae.load_state_dict({k: torch.from_numpy(np.array(g[k][...])) for k in sae.state_dict()})
    x, pos = _sample(atlas)
    with torch.no_grad():
        xh, z, _ = sae(torch.from_numpy(x))
    x64, xh64 = x.astype(np.float64), xh.numpy().astype(np.float64)
    fvu = ((x64 - xh64) ** 2).sum() / ((x64 - x64.mean(0)) ** 2).sum()
    assert fvu == pytest.approx(m["fvu"], rel=1e-3)
    assert (z > 0).sum(1).float().mean().item() == pytest.approx(m["l0"], rel=1e-3)
    assert out["dictionaries"]["sae/tk"]["fvu"] == pytest.approx(m["fvu"])


def test_distributed_snmf_equals_single_process(dict_atlas) -> None:
    from ops import snmf as snmf_ops

    path, job, _ = dict_atlas
    atlas = Atlas.open(path)
    g = atlas.dictionary("tiny", 1, "snmf", "sn")
    z = g["Z"][...]
    assert z.shape == (48, 6)
    assert ((z != 0).sum(0) <= np.ceil(0.2 * 48)).all()
    x, _ = _sample(atlas)
    run = job.dictionaries.snmf[0]
    cfg = snmf_ops.SNMFConfig(k=run.k, keep_fraction=run.keep_fraction, iters=run.iters,
                              patience=run.patience, init=run.init, seed=run.seed)  # fmt: skip
    ref = snmf_ops.fit(x.T, cfg)
    np.testing.assert_allclose(z, ref.z.numpy(), atol=2e-3)
    assert g.attrs["metrics"]["rel_error"] == pytest.approx(ref.rel_error, rel=1e-3)


@pytest.mark.slow
def test_snmf_over_two_ray_workers_equals_the_local_run(dict_atlas) -> None:
    """The same run with the sample's shards spread over two Ray workers (each holds its
    shards' rows between iterations) ends where the job's local run did."""
    from flows.config import ResourcesConfig
    from flows.runtime import Runtime
    from flows.snmf import fit_snmf

    path, job, _ = dict_atlas
    atlas = Atlas.open(path)
    g = atlas.dictionary("tiny", 1, "snmf", "sn")
    run = job.dictionaries.snmf[0]
    with Runtime(ResourcesConfig(backend="ray", workers=2)) as rt:
        spread = fit_snmf(rt, job, "tiny", 1, run, atlas)
        assert len(rt.workers()) == 2
    np.testing.assert_allclose(spread.z.numpy(), g["Z"][...], atol=2e-5)
    assert spread.rel_error == pytest.approx(g.attrs["metrics"]["rel_error"], rel=1e-5)


def test_cli_features(dict_atlas, capsys) -> None:
    import json

    from flows.cli import main

    path, _, _ = dict_atlas
    assert main(["features", str(path), "tiny", "1", "--method", "sae", "--feature", "0",
                 "--json"]) == 2  # fmt: skip
    assert "several sae runs (['live', 'tk']); pick one with --run" in capsys.readouterr().err
    assert main(["features", str(path), "tiny", "1", "--method", "sae", "--run", "tk",
                 "--feature", "0", "--json"]) == 0  # fmt: skip
    rec = json.loads(capsys.readouterr().out)
    assert rec["index"] == 0 and rec["method"] == "sae" and len(rec["promoted"]) == 10
    assert all("[[" in e["text"] for e in rec["examples"])
    assert main(["features", str(path), "tiny", "1", "--method", "snmf", "--top", "2"]) == 0
    text = capsys.readouterr().out
    assert "snmf/sn" in text and "neurons:" in text
    assert main(["features", str(path), "tiny", "1", "--method", "snmf", "--feature", "99"]) == 2


def test_dictionaries_need_a_sample(tiny_model_dir: Path) -> None:
    from flows.config import JobConfigError

    with pytest.raises(JobConfigError, match="needs an activation sample"):
        parse_job({"models": [{"name": "t", "source": str(tiny_model_dir)}],
                   "dictionaries": {"model": "t", "layer": 0}})  # fmt: skip


def test_steering_results_are_stored(dict_atlas) -> None:
    from storage.layout import contrast_key

    path, job, out = dict_atlas
    atlas = Atlas.open(path)
    res = atlas.steering("tiny", 1)
    base = contrast_key("wiki-fr", "wiki-en")
    sae_keys = [k for k in res if k.startswith("sae/tk/")]
    snmf_keys = [k for k in res if k.startswith("snmf/sn/")]
    assert base in res and len(sae_keys) == 1 and len(snmf_keys) == 1
    for key, r in res.items():
        assert r.converged, key
        assert abs(r.kl - 0.002) <= 0.1 * 0.002
        assert len(r.promoted) == len(r.suppressed) == 10
        assert r.promoted[0][1] > 0 > r.suppressed[0][1]
        assert out["dictionaries"][f"steering/{key}"]["kl"] == pytest.approx(r.kl)
    # the steered SAE feature is the run's most active one on average
    st = atlas.dictionary("tiny", 1, "sae", "tk")["stats"]["mean"][...]
    assert sae_keys == [f"sae/tk/{int(np.argmax(st))}"]
    # the baseline direction is the difference of sampled means, recomputed here in float64
    x, pos = _sample(atlas)
    names = list(atlas.corpus.attrs["source_names"])
    src = atlas.corpus["sources"][...][pos // 32]
    x64 = x.astype(np.float64)
    want = x64[src == names.index("wiki-fr")].mean(0) - x64[src == names.index("wiki-en")].mean(0)
    np.testing.assert_allclose(atlas.steering_direction("tiny", 1, base), want, rtol=1e-4,
                               atol=1e-7)  # fmt: skip
    # the feature query carries the stored steering result
    i = int(sae_keys[0].rsplit("/", 1)[1])
    rec = atlas.feature("tiny", 1, "sae", i, run="tk")
    assert rec.steering is not None and rec.steering.alpha == res[sae_keys[0]].alpha


def test_unknown_contrast_source_names_the_field(dict_atlas) -> None:
    from flows.config import JobConfigError
    from flows.steering import contrast_direction

    atlas = Atlas.open(dict_atlas[0])
    with pytest.raises(JobConfigError, match=r"dictionaries.steering.contrast: \['wiki-xx'\]"):
        contrast_direction(atlas, "tiny", 1, ["wiki-xx", "wiki-en"])


def test_cli_steer(dict_atlas, capsys) -> None:
    import json

    from flows.cli import main

    path = str(dict_atlas[0])
    args = ["steer", path, "tiny", "1", "--target-kl", "0.003", "--sequences", "3"]
    assert main([*args, "--method", "snmf", "--feature", "2", "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["key"] == "snmf/sn/2" and rec["converged"]
    assert abs(rec["kl"] - 0.003) <= 0.1 * 0.003
    stored = Atlas.open(path).steering("tiny", 1)["snmf/sn/2"]
    assert stored.alpha == rec["alpha"] and stored.target_kl == 0.003
    assert main([*args, "--contrast", "shakespeare", "wiki-en"]) == 0
    assert "diffmeans/shakespeare-vs-wiki-en" in capsys.readouterr().out
    # bad input: exit 2 with the problem named, nothing stored
    before = set(Atlas.open(path).steering("tiny", 1))
    assert main([*args, "--contrast", "wiki-xx", "wiki-en"]) == 2
    assert "wiki-xx" in capsys.readouterr().err
    assert main(["steer", path, "tiny", "1", "--method", "sae", "--feature", "0",
                 "--target-kl", "0"]) == 2  # fmt: skip
    assert "target_kl" in capsys.readouterr().err
    assert main(["steer", path, "tiny", "1", "--method", "sae", "--run", "tk", "--feature",
                 "999"]) == 2  # fmt: skip
    assert "out of range" in capsys.readouterr().err
    assert set(Atlas.open(path).steering("tiny", 1)) == before


def test_streamed_sae_trains_on_every_corpus_token(dict_atlas) -> None:
    path, _, out = dict_atlas
    atlas = Atlas.open(path)
    g = atlas.dictionary("tiny", 1, "sae", "live")
    n_tokens = int(np.count_nonzero(atlas.corpus["mask"][...]))
    assert g.attrs["source"] == "stream" and g.attrs["tokens_trained"] == n_tokens
    assert n_tokens > 2 * g.attrs["tokens"]  # more than the stored sample holds
    assert atlas.dictionary("tiny", 1, "sae", "tk").attrs["source"] == "sample"
    m = g.attrs["metrics"]
    assert 0 <= m["fvu"] < 1 and out["dictionaries"]["sae/live"]["fvu"] == m["fvu"]
    assert g.attrs["history"] and g.attrs["history"][-1]["tokens_seen"] <= n_tokens


def test_activation_feed_matches_the_stored_sample(dict_atlas) -> None:
    """What the workers stream is what the statistics pass recorded (same rows, same values)."""
    from flows.dictionaries import feed_stage
    from flows.engine import iter_stage

    path, job, _ = dict_atlas
    atlas = Atlas.open(path)
    shard = 1
    (out,) = iter_stage(feed_stage(job, "tiny", 1), str(path), [shard], job.resources)
    start, _ = atlas.shard_ranges()[shard]
    _, mask = atlas.read_shard(shard)
    flat = start * mask.shape[1] + np.flatnonzero(mask.reshape(-1))
    assert out["acts"].shape == (len(flat), 48) and out["acts"].dtype == np.float16
    per = atlas.sample_rows_per_shard()
    pos = atlas.corpus["sample_positions"][shard * per : (shard + 1) * per]
    rows = atlas.model_group("tiny")["layers"]["1"]["sample"][shard * per : (shard + 1) * per]
    ok = pos >= 0
    idx = np.searchsorted(flat, pos[ok])
    assert np.array_equal(flat[idx], pos[ok])
    np.testing.assert_allclose(out["acts"][idx].astype(np.float32),
                               rows[ok].astype(np.float32), rtol=1e-3, atol=1e-4)  # fmt: skip


def test_streamed_sae_resumes_mid_stream(dict_atlas, tmp_path) -> None:
    """Killed after a few steps and restarted from its checkpoint, a streamed run ends with the
    same weights as an uninterrupted one (real workers, real stream, shard order)."""
    from flows.dictionaries import train_sae_streamed

    path, job, _ = dict_atlas
    x, _ = _sample(Atlas.open(path))
    x = torch.from_numpy(x)
    run = next(r for r in job.dictionaries.sae if r.source == "stream")
    full = train_sae_streamed(job, "tiny", 1, run, str(tmp_path / "a.pt"), x)
    part = train_sae_streamed(job, "tiny", 1, run, str(tmp_path / "b.pt"), x, stop_at=9)
    assert part["steps"] == 9
    resumed = train_sae_streamed(job, "tiny", 1, run, str(tmp_path / "b.pt"), x)
    assert resumed["steps"] == full["steps"] > 9
    assert resumed["tokens_trained"] == full["tokens_trained"]
    for k, v in full["weights"].items():
        np.testing.assert_array_equal(resumed["weights"][k], v, err_msg=k)
    # the job trained this run on the record stage's own forward (first epoch shared):
    # the same stream in the same order, so the same weights as a stream of its own
    stored = Atlas.open(path).dictionary("tiny", 1, "sae", run.name)
    for k in ("W_enc", "W_dec", "b_enc", "b_dec"):
        np.testing.assert_array_equal(stored[k][...], full["weights"][k], err_msg=k)


def test_run_accounting_shows_one_pass_for_record_sample_and_stream(dict_atlas, capsys) -> None:
    """``info --json`` lists what each stage cost; recording, the sample and the streamed SAE's
    one epoch took one forward per token, and every dictionary's features one more."""
    import json

    from flows.cli import main

    path, job, out = dict_atlas
    assert main(["info", str(path), "--json"]) == 0
    runs = json.loads(capsys.readouterr().out)["runs"]
    run = next(r for r in runs if r["run"] == out["run"])
    stages = {s["stage"]: s for s in run["stages"]}
    atlas = Atlas.open(path)
    n_tokens = int(atlas.corpus.attrs["n_tokens"])
    mask, bs = atlas.corpus["mask"][...], job.record.batch_size
    batches = sum(bool(mask[a : min(a + bs, b)].any())
                  for a0, b in atlas.shard_ranges() for a in range(a0, b, bs))  # fmt: skip
    # no stream pass of its own; CE and steering forwards are accounted too, and the
    # taxonomy's probe of shard 0 for the firing thresholds (SwiGLU: a per-neuron quantile)
    assert set(stages) == {"firing/tiny", "record/tiny", "features/tiny/1", "dictionaries/measures"}
    probe = stages.pop("firing/tiny")
    a0, b0 = atlas.shard_ranges()[0]
    assert [x for w in probe["workers"] for x in w["shards"]] == [0]
    assert probe["tokens"] == int(mask[a0:b0].sum())
    measures = stages.pop("dictionaries/measures")
    assert measures["forward_passes"] > 0 and measures["tokens"] > 0
    for name, s in stages.items():
        assert set(s) >= {"stage", "tokens", "forward_passes", "seconds", "tokens_per_s",
                          "workers"}, name  # fmt: skip
        assert s["tokens"] == n_tokens and s["passes_per_token"] == 1.0
        assert s["forward_passes"] == batches  # one forward per batch, one model
        shards = sorted(x for w in s["workers"] for x in w["shards"])
        assert shards == list(range(len(Atlas.open(path).shard_ranges())))
        assert all(w["device"] == "cpu" and w["node"] for w in s["workers"])
    assert main(["info", str(path)]) == 0
    text = capsys.readouterr().out
    assert f"last run {out['run']}" in text and "features/tiny/1" in text


def test_info_lists_dictionaries(dict_atlas, capsys) -> None:
    import json

    from flows.cli import main

    path = str(dict_atlas[0])
    assert main(["info", path, "--json"]) == 0
    d = json.loads(capsys.readouterr().out)["models"]["tiny"]["dictionaries"]["1"]
    atlas = Atlas.open(path)
    assert set(d["runs"]) == {"sae/tk", "sae/live", "snmf/sn"}
    assert d["runs"]["sae/tk"] == atlas.dictionary("tiny", 1, "sae", "tk").attrs["metrics"]
    assert d["steering"] == len(atlas.steering("tiny", 1)) >= 3
    assert main(["info", path]) == 0
    assert "dictionaries: sae/live (l0" in capsys.readouterr().out


def test_rerun_of_a_finished_job_keeps_the_dictionaries(dict_atlas) -> None:
    """Rerunning the finished job retrains nothing: same summary, same files, no leftovers."""
    from flows.pipeline import map_neurons

    path, job, out = dict_atlas
    w_dec = path / "models/tiny/layers/1/sae/tk/W_dec/zarr.json"
    before = w_dec.stat().st_mtime_ns
    assert not (path / "_work" / "dictionaries").exists()  # checkpoints dropped when done
    again = map_neurons(job)["dictionaries"]
    assert {k: again[k] for k in out["dictionaries"]} == out["dictionaries"]
    assert w_dec.stat().st_mtime_ns == before


def test_thin_keeps_ends_and_bounds_length() -> None:
    from ops.sae import thin

    rows = list(range(1000))
    out = thin(rows, 200)
    assert len(out) == 200 and out[0] == 0 and out[-1] == 999 and out == sorted(out)
    assert thin(rows[:50], 200) == rows[:50]


def test_feature_stats_cover_the_whole_corpus(dict_atlas) -> None:
    """Like a neuron's: every corpus token, recomputed here in float64 from a plain forward."""
    from ops import sae as sae_ops
    from ops.models import capture_mlp, load_model

    path, job, _ = dict_atlas
    atlas = Atlas.open(path)
    g = atlas.dictionary("tiny", 1, "sae", "tk")
    assert g.attrs["feature_stats"] == "corpus"
    sae = sae_ops.build_sae(sae_ops.SAEConfig.from_dict(g.attrs["config"]))
    sae.load_state_dict({k: torch.from_numpy(np.array(g[k][...])) for k in sae.state_dict()})
    lm = load_model(job.models[0].source, dtype="float32", device="cpu", with_tokenizer=False)
    tokens, mask = atlas.corpus["tokens"][...], atlas.corpus["mask"][...]
    zs, pos = [], []
    with capture_mlp(lm, [1], lambda _l, a: zs.append(a.reshape(-1, a.shape[-1]).clone())):
        for r in range(0, len(tokens), 16):
            ids = torch.from_numpy(tokens[r : r + 16].astype(np.int64))
            with torch.no_grad():
                lm.model(input_ids=ids, attention_mask=torch.from_numpy(
                    attention_mask(mask[r : r + 16])))  # fmt: skip
            pos.append(r * tokens.shape[1] + np.flatnonzero(mask[r : r + 16].reshape(-1)))
    acts = torch.cat(zs)
    pos = np.concatenate(pos)
    with torch.no_grad():
        z = sae.encode(acts[torch.from_numpy(pos)]).double().numpy()
    st = {k: g["stats"][k][...] for k in ("count", "mean", "max", "frac_active")}
    assert (st["count"] == len(pos)).all() and len(pos) == np.count_nonzero(mask)
    np.testing.assert_allclose(st["max"], z.max(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(st["mean"], z.mean(0), rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(st["frac_active"], (z > 0).mean(0), atol=2 / len(pos))
    top = g["topk"]["positions"][...][:, 0]
    live = st["max"] > 0
    np.testing.assert_allclose(z[np.searchsorted(pos, top[live]), np.flatnonzero(live)],
                               st["max"][live], rtol=1e-4)  # fmt: skip
    assert not np.isin(top[live], atlas.corpus["sample_positions"][...]).all()

    # SNMF features: coefficients of every corpus token under the stored Z, solved here per token
    # with scipy's NNLS in float64
    from scipy.optimize import nnls

    sg = atlas.dictionary("tiny", 1, "snmf", "sn")
    assert sg.attrs["feature_stats"] == "corpus"
    zmat = sg["Z"][...].astype(np.float64)
    a64 = acts[torch.from_numpy(pos)].double().numpy()
    y = np.stack([nnls(zmat, row)[0] for row in a64])
    scale = y.max()
    np.testing.assert_allclose(sg["stats"]["max"][...], y.max(0), atol=1e-3 * scale)
    np.testing.assert_allclose(sg["stats"]["mean"][...], y.mean(0), atol=1e-4 * scale)
    np.testing.assert_allclose(sg["stats"]["frac_active"][...], (y > 1e-6 * scale).mean(0),
                               atol=0.01)  # fmt: skip
    assert (sg["stats"]["count"][...] == len(pos)).all()
