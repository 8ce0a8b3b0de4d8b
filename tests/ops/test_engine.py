"""The activation pass: one forward per batch feeds every consumer, against float64 numpy."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from ops.correlation import FamilyMoments
from ops.engine import (
    ActivationFeed,
    ActivationPass,
    ActivationSample,
    FeatureStats,
    NeuronStats,
    TileMoments,
    attention_mask,
    batches,
)
from ops.models import capture_mlp, load_model
from ops.plan import OwnTile, PairTile
from ops.stats import hist_spec
from tests.ops.test_stats import _reference
from tests.tiny_configs import CONFIGS, VOCAB


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    out = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        d = tmp_path_factory.mktemp(f"llama{seed}")
        AutoModelForCausalLM.from_config(CONFIGS["llama"]()).save_pretrained(d)
        out.append(load_model(str(d), dtype="float32", device="cpu", with_tokenizer=False))
    return out


def _corpus(n_seq: int = 20, seq_len: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(2, VOCAB, size=(n_seq, seq_len)).astype(np.int32)
    mask = np.ones_like(tokens, dtype=bool)
    mask[:, 0] = False  # BOS
    for r in range(0, n_seq, 3):  # right padding on some rows
        mask[r, seq_len - 1 - r % 5 :] = False
    return tokens, mask


def _plain(lm, tokens, mask, layer):
    """Every recorded row of ``layer`` from a plain full forward, float64, with positions."""
    acts = []
    keep = lambda _l, a: acts.append(a.reshape(-1, a.shape[-1]).clone())  # noqa: E731
    with capture_mlp(lm, [layer], keep), torch.no_grad():
        lm.model(input_ids=torch.from_numpy(tokens.astype(np.int64)),
                 attention_mask=torch.from_numpy(attention_mask(mask)))  # fmt: skip
    flat = np.flatnonzero(mask.reshape(-1))
    return acts[0].double().numpy()[flat], flat


def test_one_forward_feeds_every_consumer(two_models) -> None:
    """Statistics, sample, feed, features and co-moments from one pass equal a float64
    recomputation on a plain forward, and each model ran once per batch."""
    a, b = two_models
    tokens, mask = _corpus()
    spec = hist_spec(16, 1e-3, 10.0)
    # sample slots: three recorded positions of the block (sequences 3..), one masked, one empty
    want = np.array([3 * 16 + 1, 3 * 16 + 2, 5 * 16 + 7, 3 * 16, -1], np.int64)
    w = torch.randn(48, 5, generator=torch.Generator().manual_seed(0))
    cons = {
        "stats": NeuronStats((0, 1), 48, 4, spec),
        "stats0": NeuronStats((0, 0), 48, 4, spec),
        "sample": ActivationSample((0, 1), 48, want),
        "feed": ActivationFeed((0, 1)),
        "feat": FeatureStats((0, 1), lambda x: torch.relu(x @ w), 5, 4, spec),
        "tiles": TileMoments(FamilyMoments(
            [PairTile(0, 1, 0, 1), OwnTile(1, 0, 1)], {0: [1], 1: [0]}, {0: 48, 1: 48})),
    }
    calls = {"a": 0, "b": 0}
    ha = a.model.register_forward_pre_hook(lambda *_: calls.__setitem__("a", calls["a"] + 1))
    hb = b.model.register_forward_pre_hook(lambda *_: calls.__setitem__("b", calls["b"] + 1))
    try:
        count = ActivationPass([a, b]).run(batches(tokens, mask, 3, 6), list(cons.values()))
    finally:
        ha.remove()
        hb.remove()
    n_batches = -(-len(tokens) // 6)
    assert calls == {"a": n_batches, "b": n_batches}
    assert count.forward_passes == 2 * n_batches and count.tokens == mask.sum()

    x1, flat = _plain(a, tokens, mask, 1)
    x0, _ = _plain(a, tokens, mask, 0)
    y0, _ = _plain(b, tokens, mask, 0)
    pos = 3 * tokens.shape[1] + flat  # the block starts at corpus sequence 3
    for key, x in (("stats", x1), ("stats0", x0)):
        st = NeuronStats.finalize(cons[key].state())
        ref = _reference(x.astype(np.float32), pos, 4, spec.edges())
        for name in ("mean", "var", "min", "max", "frac_active", "hist"):
            np.testing.assert_allclose(st[name], ref[name], rtol=1e-4, atol=1e-6, err_msg=name)
        np.testing.assert_array_equal(cons[key].state().top_positions, ref["top_positions"])
    feed = cons["feed"].state()
    assert feed.dtype == np.float16 and feed.shape == x1.shape
    np.testing.assert_allclose(feed, x1, rtol=1e-3, atol=1e-3)
    sample = cons["sample"].state()
    assert not np.isin(want[3], pos)  # BOS: never recorded, so its slot stays empty
    for i, p in enumerate(want):
        if np.isin(p, pos):
            np.testing.assert_allclose(sample[i], x1[np.searchsorted(pos, p)], rtol=1e-3, atol=1e-3)
        else:
            assert not sample[i].any()
    z = np.maximum(x1 @ w.double().numpy(), 0)
    fs = FeatureStats.finalize(cons["feat"].state())
    np.testing.assert_allclose(fs["mean"], z.mean(0), rtol=1e-4, atol=1e-6)
    acc = cons["tiles"].acc
    c = acc.centred(PairTile(0, 1, 0, 1)).numpy()
    np.testing.assert_allclose(c, (x1 - x1.mean(0)).T @ (y0 - y0.mean(0)), rtol=1e-4, atol=1e-6)
    (own,) = acc.centred(OwnTile(1, 0, 1)).numpy()
    np.testing.assert_allclose(own, (y0 - y0.mean(0)).T @ (y0 - y0.mean(0)), rtol=1e-4,
                               atol=1e-6)  # fmt: skip


def test_shard_states_merge_to_the_whole(two_models) -> None:
    """Per-shard states merged in shard order equal one pass over everything."""
    a, _ = two_models
    tokens, mask = _corpus(24)
    spec = hist_spec(16, 1e-3, 10.0)
    whole = NeuronStats((0, 1), 48, 3, spec)
    ActivationPass([a]).run(batches(tokens, mask, 0, 5), [whole])
    parts = []
    for lo in (0, 8, 16):
        c = NeuronStats((0, 1), 48, 3, spec)
        ActivationPass([a]).run(batches(tokens[lo : lo + 8], mask[lo : lo + 8], lo, 5), [c])
        parts.append(c.state())
    merged, one = NeuronStats.merge(parts), whole.state()
    np.testing.assert_allclose(merged.mean, one.mean, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(merged.m2, one.m2, rtol=1e-7, atol=1e-9)
    np.testing.assert_array_equal(merged.hist, one.hist)
    np.testing.assert_array_equal(merged.top_positions, one.top_positions)


def test_a_model_runs_only_to_its_deepest_consumer(two_models) -> None:
    a, _ = two_models
    tokens, mask = _corpus(4)
    seen = []
    h = a.down_projs()[1].register_forward_pre_hook(lambda *_: seen.append(1))
    try:
        ActivationPass([a]).run(batches(tokens, mask, 0, 4), [ActivationFeed((0, 0))])
    finally:
        h.remove()
    assert not seen  # layer 1 never ran


def _sync_sites(run) -> list[str]:  # noqa: ANN001
    """Run ``run()`` with CUDA's sync check on "warn" and return, for every wait on the
    device, the innermost frame outside torch that caused it (``file:line``)."""
    import traceback
    import warnings

    sites: list[str] = []

    def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001
        if "synchroniz" in str(message):
            frames = [f for f in traceback.extract_stack()[:-1]
                      if f"{os.sep}torch{os.sep}" not in f.filename and f.filename != __file__
                      and os.path.basename(f.filename) != "warnings.py"]  # fmt: skip
            sites.append(f"{frames[-1].filename}:{frames[-1].lineno}" if frames else filename)

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sites


def test_sync_sites_name_the_frame_that_waited(monkeypatch) -> None:
    """The helper of the CUDA test below, on a warning raised where a sync would be: it
    names the innermost frame outside torch, the warnings machinery and this file."""
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda mode: None)
    code = "import warnings\ndef f():\n    warnings.warn('called a synchronizing CUDA operation')\n"
    ns: dict = {}
    for where in (f"{os.sep}x{os.sep}ops{os.sep}fake.py",
                  f"{os.sep}y{os.sep}transformers{os.sep}masking_utils.py"):  # fmt: skip
        exec(compile(code, where, "exec"), ns)  # noqa: S102
        assert _sync_sites(lambda: (ns["f"](), ns["f"]())) == [f"{where}:3"] * 2
    assert _sync_sites(lambda: None) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_recording_pass_does_not_wait_for_the_device() -> None:
    """The per-batch path of a recording pass on a GPU (rows and token ids up through
    pinned memory, the forward cut after the last layer, the fused statistics of every
    layer) only queues work: no wait on the device is caused by the project's code. The
    model's forward itself waits (transformers 5 reads back whether the mask is all ones,
    or without a mask whether the positions are packed, before the first layer); those
    are printed, not counted against us. The first batch, which compiles the kernels and
    fills the top-k state, is run before."""
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(CONFIGS["llama"](), dtype=torch.bfloat16)
    model.eval().requires_grad_(False)
    from ops.models import LoadedModel, arch_spec

    spec = arch_spec(model.config)
    lm = LoadedModel(model=model, tokenizer=None, model_type="llama", n_layers=2,
                     d_mlp=spec.d_mlp(model.config), site=spec.description, source="tiny",
                     path="", revision=None, dtype=torch.bfloat16, device=torch.device("cuda"))  # fmt: skip
    tokens, mask = _corpus(n_seq=40, seq_len=16)
    stats = [NeuronStats((0, L), lm.d_mlp, 4, hist_spec(16), "cuda") for L in range(2)]
    assert all(s.acc.backend == "triton" for s in stats)
    engine = ActivationPass([lm])
    engine.run(batches(tokens[:8], mask[:8], 0, 8), stats)
    torch.cuda.synchronize()
    count = []
    sites = _sync_sites(lambda: count.append(engine.run(batches(tokens[8:], mask[8:], 8, 8), stats)))
    ours = [s for s in sites if f"{os.sep}transformers{os.sep}" not in s]
    print(f"{len(sites) - len(ours)} waits in {count[0].forward_passes} forwards, in "
          f"transformers: {sorted(set(sites) - set(ours))}")  # fmt: skip
    assert ours == []
    assert count[0].forward_passes == 4 and stats[1].state().n == mask.sum()
