"""Universality at scale, the numerics: tiled co-moments, the plan, finalising tiles.

Every number is checked against float64 numpy on the whole data (``np.corrcoef``, rotated
activations computed directly, Hungarian matching of a permuted copy).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ops.correlation import CoMoments, FamilyMoments
from ops.errors import ConfigError
from ops.plan import OwnTile, PairTile, device_budget, plan, tile_bytes
from ops.universality import assemble, finalize_tile, own_moments, rotation, rotation_stats

D = 12  # neurons per layer


def _family(t: int = 600, seed: int = 0) -> list[np.ndarray]:
    """Three 'models' of 3 layers each ([T, 3 * D]): model 1 is model 0 with neurons permuted
    within each layer plus a little noise; model 2 shares a few directions; one dead neuron."""
    g = np.random.default_rng(seed)
    x0 = g.standard_normal((t, 3 * D)) * g.uniform(0.5, 3.0, 3 * D) + g.uniform(-2, 2, 3 * D)
    x0[:, 5] = 1.25  # dead
    perm = np.concatenate([g.permutation(D) + k * D for k in range(3)])
    x1 = x0[:, perm] + 0.01 * g.standard_normal((t, 3 * D))
    x1[:, perm == 5] = 1.25
    x2 = g.standard_normal((t, 3 * D)) + 0.5 * x0[:, g.permutation(3 * D)]
    return [x0, x1, x2], perm


def _feed(acc: FamilyMoments, xs: list[np.ndarray], layers: dict[int, list[int]], rows: slice,
          batch: int = 64) -> None:  # fmt: skip
    for i in range(rows.start, rows.stop, batch):
        sl = slice(i, min(i + batch, rows.stop))
        acc.update({(m, L): torch.from_numpy(xs[m][sl, p * D : (p + 1) * D]).float().to(acc.device)
                    for m, ls in layers.items() for p, L in enumerate(ls)})  # fmt: skip


LAYERS = {0: [0, 1, 2], 1: [0, 1, 2], 2: [0, 1, 2]}
DIMS = {0: D, 1: D, 2: D}


def test_tiles_equal_float64_corrcoef_and_split_tiles_equal_whole() -> None:
    xs, _ = _family()
    whole = FamilyMoments([PairTile(0, 2, 0, 3), OwnTile(2, 0, 3)], LAYERS, DIMS)
    split = FamilyMoments([PairTile(0, 2, 0, 1), PairTile(0, 2, 1, 3)], LAYERS, DIMS)
    _feed(whole, xs, LAYERS, slice(0, 600))
    _feed(split, xs, LAYERS, slice(0, 600))
    c = whole.centred(PairTile(0, 2, 0, 3)).numpy()
    x0, x2 = xs[0] - xs[0].mean(0), xs[2] - xs[2].mean(0)
    np.testing.assert_allclose(c, x0.T @ x2, rtol=1e-5, atol=1e-3)
    top = split.centred(PairTile(0, 2, 0, 1)).numpy()
    rest = split.centred(PairTile(0, 2, 1, 3)).numpy()
    np.testing.assert_allclose(np.vstack([top, rest]), c, rtol=1e-6, atol=1e-6)
    own = whole.centred(OwnTile(2, 0, 3)).numpy()
    for k in range(3):
        blk = x2[:, k * D : (k + 1) * D]
        np.testing.assert_allclose(own[k], blk.T @ blk, rtol=1e-5, atol=1e-3)
    mean, m2, n = whole.columns(2)
    np.testing.assert_allclose(mean, xs[2].mean(0), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(m2, (x2**2).sum(0), rtol=1e-6)
    assert n == 600


def test_checkpoint_continues_exactly_and_flushed_buffers_agree() -> None:
    """raw() -> load_raw() mid-way gives the same state, bit for bit, as running through;
    the float32 buffer folded every few hundred tokens agrees with folding every batch."""
    xs, _ = _family()
    tiles = [PairTile(0, 1, 0, 3), OwnTile(0, 0, 3)]
    through = FamilyMoments(tiles, LAYERS, DIMS)
    _feed(through, xs, LAYERS, slice(0, 600))
    first = FamilyMoments(tiles, LAYERS, DIMS)
    _feed(first, xs, LAYERS, slice(0, 320))
    resumed = FamilyMoments(tiles, LAYERS, DIMS)
    resumed.load_raw({k: v.copy() for k, v in first.raw().items()})
    _feed(resumed, xs, LAYERS, slice(320, 600))
    for k, v in through.raw().items():
        np.testing.assert_array_equal(resumed.raw()[k], v, err_msg=k)
    buffered = FamilyMoments(tiles, LAYERS, DIMS, flush_tokens=256)
    _feed(buffered, xs, LAYERS, slice(0, 600))
    np.testing.assert_allclose(buffered.centred(tiles[0]).numpy(),
                               through.centred(tiles[0]).numpy(), rtol=1e-5, atol=1e-3)  # fmt: skip
    with pytest.raises(ConfigError, match="shape"):
        FamilyMoments([PairTile(0, 1, 0, 1)], LAYERS, DIMS).load_raw(through.raw())


def _finalised(xs: list[np.ndarray], tiles: list[PairTile], full: bool = False,
               device: str = "cpu", flush: int | None = None):  # fmt: skip
    acc = FamilyMoments([*tiles, OwnTile(0, 0, 3), OwnTile(1, 0, 3), OwnTile(2, 0, 3)], LAYERS,
                        DIMS, device, flush_tokens=flush)  # fmt: skip
    _feed(acc, xs, LAYERS, slice(0, 600))
    rot = {(m, p): rotation(D, 100 * m + p) for m in range(3) for p in range(3)}
    own = {}
    for m in range(3):
        for p, cm in enumerate(own_moments(acc, OwnTile(m, 0, 3))):
            own[(m, p)] = rotation_stats(cm, rot[(m, p)])
    results, blocks = [], {}
    for t in tiles:
        for item in finalize_tile(acc, t, [LAYERS[0], LAYERS[1], LAYERS[2]], own,
                                  lambda m, p: rot[(m, p)], full):  # fmt: skip
            if isinstance(item, tuple):
                blocks[(t, item[0], item[1])] = item[2]
            else:
                results.append(item)
    return results, blocks, rot, own


def _corr(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.corrcoef(x.T, y.T)[: x.shape[1], x.shape[1] :]
    return np.nan_to_num(r)  # dead neurons: 0


def test_finalised_tiles_equal_direct_float64() -> None:
    """Best partners both ways, worst r, the rotation baseline (against activations rotated
    directly) and the matching of equal layers; two row tiles give what one tile gives."""
    xs, perm = _family()
    results, blocks, rot, own = _finalised(xs, [PairTile(0, 1, 0, 2), PairTile(0, 1, 2, 3),
                                                PairTile(0, 2, 0, 3), PairTile(1, 2, 0, 3)], True)  # fmt: skip
    out = assemble(3, [LAYERS[m] for m in range(3)], [D] * 3, [3, 3, 3], results)
    for a, b in ((0, 1), (1, 0), (0, 2), (2, 0), (1, 2), (2, 1)):
        r = _corr(xs[a], xs[b])
        got = out[(a, b)]["arrays"]
        np.testing.assert_allclose(got["max_corr"].reshape(-1), r.max(1), atol=1e-5)
        np.testing.assert_allclose(got["min_corr"].reshape(-1), r.min(1), atol=1e-5)
        j = r.argmax(1)
        live = r.max(1) > 0.3  # unambiguous partners
        np.testing.assert_array_equal(got["partner_layer"].reshape(-1)[live], (j // D)[live])
        np.testing.assert_array_equal(got["partner_index"].reshape(-1)[live], (j % D)[live])
        # baseline: a's neurons against each layer of b rotated, computed on the activations
        base = np.full(3 * D, -np.inf)
        for p in range(3):
            xb = xs[b][:, p * D : (p + 1) * D] @ rot[(b, p)].numpy()
            rr = _corr(xs[a], xb)
            rr[np.std(xs[a], 0) < 1e-9] = 0
            base = np.maximum(base, rr.max(1))
        np.testing.assert_allclose(got["baseline_max_corr"].reshape(-1), base, atol=1e-5)
    # the permuted copy: every live neuron matched to its image with r ~ 1, both ways
    for k in range(3):
        p, c = out[(1, 0)]["matching"]["perm"][k], out[(1, 0)]["matching"]["corr"][k]
        live = perm[k * D : (k + 1) * D] - k * D != 5
        np.testing.assert_array_equal(p[live], (perm[k * D : (k + 1) * D] - k * D)[live])
        assert (c[live] > 0.999).all()
        inv = out[(0, 1)]["matching"]["perm"][k]
        np.testing.assert_array_equal(inv[p[live]], np.flatnonzero(live))
    # the full matrix, a layer of rows at a time
    r01 = _corr(xs[0], xs[1])
    np.testing.assert_allclose(blocks[(PairTile(0, 1, 2, 3), 2, 0)], r01[2 * D :], atol=1e-5)
    # the rotation product: diag(QᵀCQ) is the M2 of the rotated neurons
    xr = (xs[2][:, :D] - xs[2][:, :D].mean(0)) @ rot[(2, 0)].numpy()
    np.testing.assert_allclose(own[(2, 0)].m2_rot, (xr**2).sum(0), rtol=1e-6)


def test_subset_of_layers_leaves_the_others_empty() -> None:
    xs, _ = _family()
    layers = {0: [0, 2], 1: [0, 2], 2: [0, 1, 2]}
    sub = [np.hstack([x[:, :D], x[:, 2 * D :]]) for x in xs[:2]]
    acc = FamilyMoments([PairTile(0, 1, 0, 2), OwnTile(0, 0, 2), OwnTile(1, 0, 2)], layers, DIMS)
    _feed(acc, [*sub, xs[2]], {0: [0, 2], 1: [0, 2]}, slice(0, 600))
    rot = {(m, p): rotation(D, p) for m in range(2) for p in range(2)}
    own = {(m, p): rotation_stats(cm, rot[(m, p)]) for m in range(2)
           for p, cm in enumerate(own_moments(acc, OwnTile(m, 0, 2)))}  # fmt: skip
    (res,) = list(finalize_tile(acc, PairTile(0, 1, 0, 2), [layers[0], layers[1]], own,
                                lambda m, p: rot[(m, p)]))  # fmt: skip
    out = assemble(2, [layers[0], layers[1]], [D, D], [3, 3], [res])
    got = out[(0, 1)]["arrays"]
    assert np.isnan(got["max_corr"][1]).all() and (got["partner_layer"][1] == -1).all()
    assert set(np.unique(got["partner_layer"][[0, 2]])) <= {0, 2}
    np.testing.assert_allclose(got["max_corr"][[0, 2]].reshape(-1), _corr(sub[0], sub[1]).max(1),
                               atol=1e-5)  # fmt: skip


def test_the_plan_fits_its_budget_and_names_the_knob() -> None:
    gpt2 = [list(range(12))] * 5, [3072] * 5
    p = plan(*gpt2, workers=8, budget=80 * 2**30, flush=True)
    assert max(p.group_bytes) <= 80 * 2**30 and len(p.groups) >= 8
    tiles = [t for g in p.groups for t in g]
    for i in range(5):
        for j in range(i + 1, 5):  # every row of every pair, exactly once
            rows = sorted(r for t in tiles if (t.a, t.b) == (i, j) for r in range(t.lo, t.hi))
            assert rows == list(range(12))
    one = plan(*gpt2, workers=1, budget=140 * 2**30, flush=True)
    assert one.waves == len(one.groups) and max(one.group_bytes) <= 140 * 2**30
    assert "group 0" in one.describe([f"s{i}" for i in range(5)])
    # a pair of GPT-2-small on two CPU workers of ~8 GiB each: two row tiles
    cpu = plan([list(range(12))] * 2, [3072] * 2, workers=2, budget=8 * 2**30)
    assert len(cpu.groups) == 2 and max(cpu.group_bytes) < 8 * 2**30
    with pytest.raises(ConfigError, match="universality.memory_gb"):
        plan(*gpt2, workers=1, budget=2**29)


def test_rotation_is_orthogonal_and_seeded() -> None:
    q = rotation(64, 3)
    np.testing.assert_allclose((q.T @ q).numpy(), np.eye(64), atol=1e-12)
    assert torch.equal(q, rotation(64, 3)) and not torch.equal(q, rotation(64, 4))


def test_own_moments_merge_across_ranges() -> None:
    """Two workers' ranges merged (Chan) equal one pass over both."""
    xs, _ = _family()
    parts = []
    for rows in (slice(0, 250), slice(250, 600)):
        acc = FamilyMoments([OwnTile(1, 0, 3)], LAYERS, DIMS)
        _feed(acc, xs, {1: [0, 1, 2]}, rows)
        parts.append(own_moments(acc, OwnTile(1, 0, 3)))
    x = xs[1] - xs[1].mean(0)
    for k in range(3):
        cm = parts[0][k].merge(parts[1][k])
        assert isinstance(cm, CoMoments) and cm.n == 600
        blk = x[:, k * D : (k + 1) * D]
        np.testing.assert_allclose(cm.c, blk.T @ blk, rtol=1e-5, atol=1e-3)


def test_ranges_merged_into_one_state_finalise_like_one_worker() -> None:
    """Token-parallel: two workers' ranges of a tile, merged and loaded into a fresh
    accumulator (``load_moments``), finalise to what one worker that saw everything gives."""
    xs, _ = _family()
    tile = PairTile(0, 2, 0, 3)
    one = FamilyMoments([tile], LAYERS, DIMS)
    _feed(one, xs, LAYERS, slice(0, 600))
    parts = []
    for rows in (slice(0, 230), slice(230, 600)):
        acc = FamilyMoments([tile], LAYERS, DIMS)
        _feed(acc, xs, LAYERS, rows)
        parts.append(acc.pair_moments(tile))
    loaded = FamilyMoments([tile], LAYERS, DIMS)
    loaded.load_moments({tile: parts[0].merge(parts[1])})
    # equal up to the float32 products (each side shifted differently)
    np.testing.assert_allclose(loaded.centred(tile).numpy(), one.centred(tile).numpy(),
                               rtol=1e-5, atol=1e-3)  # fmt: skip
    for m in (0, 2):
        for got, want in zip(loaded.columns(m), one.columns(m), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(loaded.pair_moments(tile).pearson(), one.pair_moments(tile).pearson(),
                               atol=1e-6)  # fmt: skip


def test_row_blocks_change_nothing(monkeypatch) -> None:
    """Finalising a few rows at a time (as a large tile does) gives the same results."""
    import ops.universality as ou

    xs, _ = _family()
    tiles = [PairTile(0, 1, 0, 3)]
    whole, full_whole, _, _ = _finalised(xs, tiles, True)
    monkeypatch.setattr(ou, "ROW_BLOCK_BYTES", 8 * 3 * D * 5)  # 5 rows of 36 columns
    blocks, full_blocks, _, _ = _finalised(xs, tiles, True)
    for k in whole[0].fwd:
        np.testing.assert_array_equal(blocks[0].fwd[k], whole[0].fwd[k], err_msg=k)
        np.testing.assert_array_equal(blocks[0].rev[k], whole[0].rev[k], err_msg=k)
    for pa, (perm, corr) in whole[0].matching.items():
        np.testing.assert_array_equal(blocks[0].matching[pa][0], perm)
        np.testing.assert_array_equal(blocks[0].matching[pa][1], corr)
    assert len(full_blocks) > len(full_whole)
    for (t, pa, r0), r in full_blocks.items():
        np.testing.assert_array_equal(r, full_whole[(t, pa, 0)][r0 : r0 + len(r)])


def test_device_budget_reads_the_device_not_a_constant() -> None:
    """What one worker may hold follows the device's memory: an "80 GB" H100 (79.6 GiB)
    holds four GPT-2-small pairs with their float32 buffers, an H200 (139.8 GiB) seven; the
    5-seed study then plans 3 and 2 groups on one device."""
    h100, h200 = 81559 * 2**20, 143771 * 2**20
    pair = tile_bytes(PairTile(0, 1, 0, 12), [list(range(12))] * 2, [3072] * 2, flush=True)
    for total, pairs_held, groups in ((h100, 4, 3), (h200, 7, 2)):
        budget = device_budget(total)
        assert budget <= total - 6 * 2**30 and budget // pair == pairs_held
        p = plan([list(range(12))] * 5, [3072] * 5, workers=1, budget=budget, flush=True)
        assert len(p.groups) == groups and max(p.group_bytes) <= budget
    assert device_budget(4 * 2**30) == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_finalised_tile_equals_the_cpu_one() -> None:
    """A pair tile accumulated and finalised on the device (float32 buffers folded every 256
    tokens, the baselines' products in float32, r in float64) gives the CPU's results: r
    to 1e-5, the same partners where they are unambiguous, matchings of the same value (the
    same matching where it is clear)."""
    xs, _ = _family()
    tiles = [PairTile(0, 1, 0, 3), PairTile(0, 2, 0, 2)]
    cpu, cpu_blocks, _, _ = _finalised(xs, tiles, True)
    gpu, gpu_blocks, _, _ = _finalised(xs, tiles, True, device="cuda", flush=256)
    assert len(gpu) == len(cpu) and set(gpu_blocks) == set(cpu_blocks)
    for g, c in zip(gpu, cpu, strict=True):
        assert g.tile == c.tile
        for side in ("fwd", "rev"):
            gs, cs = getattr(g, side), getattr(c, side)
            for k in ("max_corr", "min_corr", "baseline_max_corr"):
                np.testing.assert_allclose(gs[k], cs[k], atol=1e-5, err_msg=f"{side} {k}")
            live = cs["max_corr"] > 0.3
            for k in ("partner_layer", "partner_index"):
                np.testing.assert_array_equal(gs[k][live], cs[k][live], err_msg=f"{side} {k}")
        assert set(g.matching) == set(c.matching)
        for pa, (perm, corr) in c.matching.items():
            if g.tile.b == 1:  # the permuted copy: one clear optimum
                np.testing.assert_array_equal(g.matching[pa][0], perm)
                np.testing.assert_allclose(g.matching[pa][1], corr, atol=1e-5)
            else:  # unrelated neurons: near-ties may swap, the optimum's value may not
                assert g.matching[pa][1].sum() == pytest.approx(corr.sum(), abs=1e-4)
    for key, r in cpu_blocks.items():
        np.testing.assert_allclose(gpu_blocks[key], r, atol=1e-5, err_msg=str(key))
