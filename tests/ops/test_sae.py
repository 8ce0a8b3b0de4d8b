"""Sparse autoencoders: config checks, each architecture's contract, known answers (planted
features, geometric median, STE gradients), the sparse decoder against the dense ``z @ W_dec``
(values, gradients, losses, training), bf16 autocast, metrics against a recomputation, exact
resume."""

from __future__ import annotations

import math
from itertools import islice

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

import ops.sae as sae_module
import ops.sae.archs as sae_archs
import ops.sae.sparse as sae_sparse
from ops.sae import (
    ARCHITECTURES,
    SAEConfig,
    ShuffleBuffer,
    StreamBatches,
    TrainState,
    build_sae,
    ce_loss_recovered,
    geometric_median,
    jumprelu,
    load_checkpoint,
    metrics,
    sample_batches,
    shuffled,
    sparse_decode,
    step_fn,
    train,
)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _one_thread():
    """These matrices are tiny: one thread is faster and immune to oversubscribed cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _planted(n_tok: int, m: int = 64, d: int = 32, active: int = 3, seed: int = 0):
    """``x = codes @ D*``: ``m`` random unit features, ``active`` per token, magnitudes in
    [0.5, 1.5], plus a little noise. Returns ``(D*, x)``."""
    g = torch.Generator().manual_seed(seed)
    dic = torch.randn(m, d, generator=g)
    dic /= dic.norm(dim=1, keepdim=True)
    idx = torch.rand(n_tok, m, generator=g).argsort(1)[:, :active]
    codes = torch.zeros(n_tok, m).scatter(1, idx, 0.5 + torch.rand(n_tok, active, generator=g))
    return dic, codes @ dic + 0.01 * torch.randn(n_tok, d, generator=g)


def _small(arch: str, **kw) -> SAEConfig:
    base = dict(arch=arch, d_in=16, n_latents=48, k=4, auxk=8, batch_size=32, lr=3e-3)
    return SAEConfig(**{**base, **kw})


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"d_in": 0}, "d_in"),
        ({"n_latents": -3}, "n_latents"),
        ({"k": 100}, "k"),  # > n_latents for topk
        ({"lr": 0.0}, "lr"),
        ({"l1_coef": -1.0}, "l1_coef"),
        ({"auxk_coef": float("nan")}, "auxk_coef"),
        ({"jumprelu_bandwidth": 0}, "jumprelu_bandwidth"),
        ({"dead_after_tokens": 0}, "dead_after_tokens"),
        ({"batch_size": 2.5}, "batch_size"),
        ({"b_dec_init": "median"}, "b_dec_init"),
        ({"normalize_input": 1}, "normalize_input"),
    ],
)
def test_config_errors_name_the_field(kw, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        SAEConfig(**{"d_in": 8, "n_latents": 16, "k": 2, **kw})


def test_unknown_arch_lists_registered():
    with pytest.raises(ValueError, match="arch:") as e:
        SAEConfig(arch="gated", d_in=8, n_latents=16)
    for name in ("topk", "batchtopk", "relu", "jumprelu"):
        assert name in str(e.value)


def test_k_only_checked_where_used_and_dict_round_trip():
    cfg = SAEConfig(arch="relu", d_in=8, n_latents=16)  # default k=32 > 16 is irrelevant here
    assert SAEConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown fields"):
        SAEConfig.from_dict({**cfg.to_dict(), "l2_coef": 1.0})


# --------------------------------------------------------------------------- architectures


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_architecture_contract(arch):
    cfg = _small(arch)
    sae = build_sae(cfg)
    x = torch.randn(32, 16) * 3 + 1
    sae.init_from(x)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    dead = torch.zeros(cfg.n_latents, dtype=torch.bool)
    dead[::3] = True
    loss, parts = sae.loss(x, dead)
    assert torch.isfinite(loss) and {"loss", "recon", "l0", "fvu"} <= set(parts)
    loss.backward()
    for name, p in sae.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    sae.remove_parallel_grad()
    assert (sae.W_dec.grad * sae.W_dec).sum(1).abs().max() < 1e-5
    opt.step()
    sae.normalize_decoder()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(cfg.n_latents))
    z = sae.encode(x)
    assert z.shape == (32, cfg.n_latents) and (z >= 0).all()
    x_hat, z2, _ = sae(x)
    torch.testing.assert_close(z2, z)
    torch.testing.assert_close(x_hat, sae.decode(z), rtol=1e-4, atol=1e-4)


def test_topk_exactly_k_per_token():
    sae = build_sae(_small("topk"))
    z = sae.encode(torch.randn(64, 16))
    assert ((z != 0).sum(1) == 4).all()


def test_batchtopk_batch_budget_then_threshold():
    sae = build_sae(_small("batchtopk"))
    x = torch.randn(64, 16)
    sae.train()
    z = sae.encode(x)
    assert int((z != 0).sum()) == 64 * 4
    assert (z != 0).sum(1).unique().numel() > 1  # tokens differ in how many latents they use
    train(sae, [torch.randn(64, 16) for _ in range(20)], log_every=0)
    assert sae.threshold > 0 and not sae.training
    z = sae.encode(x)  # eval: per-token threshold, independent of the rest of the batch
    pre = torch.relu(sae.pre_acts(sae.scale(x)))
    torch.testing.assert_close(z, pre * (pre > sae.threshold))
    torch.testing.assert_close(sae.encode(x[:5]), z[:5])


def test_jumprelu_ste_gradients_known_answer():
    eps, theta0 = 0.1, 1.0
    # u = (x - θ)/ε = 0.2, -0.3, 2.0, -4.0: the first two are inside the rectangle kernel
    x = torch.tensor([[1.02], [0.97], [1.2], [0.6]], requires_grad=True)
    theta = torch.tensor([theta0], requires_grad=True)
    y = jumprelu(x, theta, eps)
    torch.testing.assert_close(y.detach(), torch.tensor([[1.02], [0.0], [1.2], [0.0]]))
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([[1.0], [0.0], [1.0], [0.0]]))
    torch.testing.assert_close(theta.grad, torch.tensor([-(theta0 / eps) * 2]))
    x.grad = theta.grad = None
    h = step_fn(x, theta, eps)
    torch.testing.assert_close(h.detach(), torch.tensor([[1.0], [0.0], [1.0], [0.0]]))
    h.sum().backward()
    torch.testing.assert_close(x.grad, torch.zeros_like(x))
    torch.testing.assert_close(theta.grad, torch.tensor([-(1 / eps) * 2]))


# --------------------------------------------------------------------------- sparse decoder


def _entries(b: int, n: int, k: int, dtype: torch.dtype, variable: bool = False, seed: int = 0):
    """A random sparse code as :func:`sparse_decode` takes it: ``k`` distinct latents per row
    (``variable``: 0..2k per row, every 5th row empty, as BatchTopK makes them), sorted within
    rows, positive values. Returns ``(idx, vals, offsets, rows, z)``, ``z`` the dense code."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 2 * k + 1, (b,), generator=g) if variable else torch.full((b,), k)
    if variable:
        counts[::5] = 0
    idx = torch.cat([torch.randperm(n, generator=g)[:c].sort().values for c in counts.tolist()])
    vals = (0.1 + torch.rand(idx.numel(), generator=g)).to(dtype)
    rows = torch.repeat_interleave(torch.arange(b), counts)
    z = torch.zeros(b, n, dtype=dtype).index_put((rows, idx), vals)
    return idx, vals, torch.cumsum(counts, 0) - counts, rows, z


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("variable", [False, True])
def test_sparse_decode_equals_dense(dtype, variable):
    idx, vals, offsets, _, z = _entries(64, 300, 8, dtype, variable)
    w = torch.randn(300, 24, dtype=dtype, generator=torch.Generator().manual_seed(1))
    out = sparse_decode(idx, vals, offsets, w)
    assert out.dtype == dtype and out.shape == (64, 24)
    torch.testing.assert_close(out, z @ w)
    if variable:
        assert (out[::5] == 0).all()  # rows without entries decode to zero


@pytest.mark.parametrize("variable", [False, True])
def test_sparse_decode_gradcheck(variable):
    idx, vals, offsets, _, _ = _entries(6, 10, 3, torch.float64, variable)
    w = torch.randn(10, 5, dtype=torch.float64, requires_grad=True)
    vals.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v, w: sparse_decode(idx, v, offsets, w), (vals, w))


@pytest.mark.parametrize("variable", [False, True])
def test_sparse_decode_gradients_equal_dense_autograd(variable):
    idx, vals, offsets, rows, _ = _entries(256, 512, 16, torch.float32, variable)
    g = torch.Generator().manual_seed(2)
    w = torch.randn(512, 64, generator=g)
    grad_out = torch.randn(256, 64, generator=g)
    grads = []
    for sparse in (True, False):
        v, wd = vals.clone().requires_grad_(True), w.clone().requires_grad_(True)
        if sparse:
            out = sparse_decode(idx, v, offsets, wd)
        else:
            out = torch.zeros(256, 512).index_put((rows, idx), v) @ wd
        out.backward(grad_out)
        grads.append((v.grad, wd.grad))
    (gv, gw), (gv_ref, gw_ref) = grads
    torch.testing.assert_close(gv, gv_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-5, atol=1e-5)


def test_sparse_decode_backward_paths_agree(monkeypatch):
    """The values' gradient has a CPU path (sampled_addmm) and a CUDA one (gathered rows, in
    chunks): both run here, the latter with chunks far smaller than one row block."""
    idx, vals, offsets, rows, _ = _entries(50, 200, 7, torch.float64, variable=True)
    g = torch.Generator().manual_seed(3)
    grad = torch.randn(50, 32, generator=g, dtype=torch.float64)
    w = torch.randn(200, 32, generator=g, dtype=torch.float64)
    want = (grad @ w.T)[rows, idx]
    torch.testing.assert_close(sae_sparse._values_grad_csr(grad, w, idx, offsets), want)
    monkeypatch.setattr(sae_sparse, "_GATHER_ELEMENTS", 3 * 32 + 5)  # 3 entries a chunk
    torch.testing.assert_close(sae_sparse._values_grad_gather(grad, w, rows, idx), want)
    torch.testing.assert_close(sae_sparse._entry_rows(offsets, idx.numel()), rows)


def _loss_and_grads(sae, x, dead):
    sae.zero_grad(set_to_none=True)
    loss, parts = sae.loss(x, dead)
    loss.backward()
    return parts, {name: p.grad.clone() for name, p in sae.named_parameters()}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_sparse_and_dense_decoder_same_loss_and_gradients(arch, dtype):
    _, x = _planted(256, m=64, d=16)
    x = x.to(dtype)
    sae = build_sae(_small(arch)).to(dtype)
    sae.init_from(x)
    dead = torch.zeros(48, dtype=torch.bool)
    dead[::3] = True  # AuxK decodes too
    parts, grads = _loss_and_grads(sae, x, dead)
    assert sae._loss(sae.scale(x), dead).z is None  # no dense [B, n] code in training
    sae.sparse_decoder = False
    parts_ref, grads_ref = _loss_and_grads(sae, x, dead)
    assert parts["auxk"] > 0 and parts["l0"] == parts_ref["l0"] == 4
    tol = {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {}
    for key in parts_ref:
        torch.testing.assert_close(parts[key], parts_ref[key], **tol, msg=key)
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], **tol, msg=name)


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_sparse_and_dense_decoder_same_training(arch):
    """Same FVU/AuxK trajectory; dead latents planted so that AuxK works throughout."""
    _, x = _planted(4096, m=64, d=16)
    histories = []
    for sparse in (True, False):
        sae = build_sae(_small(arch, batch_size=128, dead_after_tokens=256))
        sae.sparse_decoder = sparse
        with torch.no_grad():
            sae.W_enc[:, :24] *= 0.01
        state = train(sae, lambda s: sample_batches(x, 128, 0, s), steps=200, log_every=20)
        histories.append(state.history)
    got, want = histories
    assert want[0]["auxk"] > 0 and want[-1]["fvu"] < 0.5 * want[0]["fvu"]
    for key in ("fvu", "auxk", "l0", "dead_fraction"):
        assert [h[key] for h in got] == pytest.approx([h[key] for h in want], rel=1e-3, abs=1e-6)


# --------------------------------------------------------------------------- autocast


def test_autocast_knob_validated_and_resume_fills_new_fields(tmp_path):
    with pytest.raises(ValueError, match="^autocast:"):
        SAEConfig(d_in=8, n_latents=16, k=2, autocast=1)
    assert SAEConfig(d_in=8, n_latents=16, k=2).autocast is True
    ckpt = tmp_path / "sae.pt"
    x = torch.randn(32, 16)
    train(build_sae(_small("topk")), [x] * 2, checkpoint=ckpt)
    payload = torch.load(ckpt, weights_only=True)
    del payload["cfg"]["autocast"]  # a checkpoint written before the knob existed
    torch.save(payload, ckpt)
    assert train(build_sae(_small("topk")), [x] * 4, checkpoint=ckpt).step == 4


def test_autocast_is_a_no_op_on_cpu():
    _, x = _planted(1024, m=32, d=16)
    states = []
    for autocast in (True, False):
        sae = build_sae(_small("topk", autocast=autocast))
        train(sae, lambda s: sample_batches(x, 32, 0, s), steps=10, log_every=0)
        states.append(sae.state_dict())
    for name, a in states[0].items():
        assert a.dtype == states[1][name].dtype and torch.equal(a, states[1][name]), name


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_loss_under_bf16_autocast_keeps_fp32_master_weights(arch):
    """What ``train`` does on CUDA, on CPU's autocast: the mixed-precision forward works for
    every architecture, gradients land in float32, and the loss stays near float32's."""
    _, x = _planted(256, m=64, d=16)
    sae = build_sae(_small(arch))
    sae.init_from(x)
    dead = torch.zeros(48, dtype=torch.bool)
    dead[::3] = True
    parts_ref, _ = _loss_and_grads(sae, x, dead)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, parts = sae.loss(x, dead)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    for name, p in sae.named_parameters():
        assert p.dtype == p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name
    assert float(parts["fvu"]) != float(parts_ref["fvu"])  # the encoder did run in bf16
    assert float(parts["fvu"]) == pytest.approx(float(parts_ref["fvu"]), abs=0.02)


@needs_cuda
@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_cuda_sparse_decoder_equals_dense(arch):
    _, x = _planted(512, m=64, d=16)
    sae = build_sae(_small(arch)).to("cuda", torch.float64)
    x = x.to("cuda", torch.float64)
    sae.init_from(x)
    dead = torch.zeros(48, dtype=torch.bool, device="cuda")
    dead[::3] = True
    parts, grads = _loss_and_grads(sae, x, dead)
    sae.sparse_decoder = False
    parts_ref, grads_ref = _loss_and_grads(sae, x, dead)
    for key in parts_ref:
        torch.testing.assert_close(parts[key], parts_ref[key], msg=key)
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], msg=name)


@needs_cuda
@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_cuda_autocast_training_matches_fp32(arch):
    """bf16 autocast with fp32 master weights: FVU within 1% of the variance of fp32's."""
    _, x = _planted(20_000)
    fvu = {}
    for autocast in (True, False):
        cfg = SAEConfig(arch=arch, d_in=32, n_latents=128, k=4, auxk=16, lr=3e-3,
                        batch_size=256, dead_after_tokens=2_000, autocast=autocast)  # fmt: skip
        sae = build_sae(cfg).to("cuda")
        state = train(sae, lambda s: sample_batches(x, 256, 0, s), steps=500, log_every=100)
        assert all(p.dtype == torch.float32 for p in sae.parameters())
        fvu[autocast] = metrics(sae, x, state)["fvu"]
    assert fvu[True] == pytest.approx(fvu[False], abs=0.01)


# --------------------------------------------------------------------------- known answers


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_recovers_planted_features(arch):
    dic, x = _planted(20_000)
    cfg = SAEConfig(arch=arch, d_in=32, n_latents=128, k=4, auxk=16, lr=3e-3, batch_size=256,
                    dead_after_tokens=2_000)  # fmt: skip
    sae = build_sae(cfg)
    state = train(sae, lambda s: sample_batches(x, 256, seed=0, start_step=s), steps=1000)
    cos = (dic @ sae.W_dec.detach().T).numpy()
    rows, cols = linear_sum_assignment(-cos)  # one latent per planted feature
    assert (cos[rows, cols] >= 0.9).mean() >= 0.75
    m = metrics(sae, x, state)
    assert m["fvu"] < 0.1
    assert m["l0"] == pytest.approx(4, rel=0.1)
    assert [h["step"] for h in state.history] == [100.0 * i for i in range(1, 11)]


def test_jumprelu_learns_sparsity_through_its_thresholds():
    """The L0 pseudo-gradient alone must raise thresholds until L0 nears the planted 3."""
    dic, x = _planted(20_000)
    cfg = SAEConfig(arch="jumprelu", d_in=32, n_latents=128, lr=3e-3, batch_size=256,
                    jumprelu_l0_coef=1e-2, jumprelu_bandwidth=0.05,
                    jumprelu_threshold_init=0.05)  # fmt: skip
    sae = build_sae(cfg)
    l0_start = metrics(sae, x[:2000])["l0"]
    train(sae, lambda s: sample_batches(x, 256, seed=0, start_step=s), steps=1500)
    m = metrics(sae, x)
    assert l0_start > 20 and m["l0"] < 4.5 and m["fvu"] < 0.1


def test_geometric_median_known_answer_and_robust():
    c = torch.tensor([1.0, -2.0, 3.0])
    sym = torch.cat([c + 0.7 * torch.eye(3), c - 0.7 * torch.eye(3), c + torch.ones(1, 3),
                     c - torch.ones(1, 3)])  # fmt: skip
    torch.testing.assert_close(geometric_median(sym), c)
    g = torch.Generator().manual_seed(0)
    cloud = torch.randn(200, 3, generator=g)
    cloud = torch.cat([cloud, -cloud])  # centred exactly at 0
    with_outlier = torch.cat([cloud, torch.full((1, 3), 1e4)])
    assert with_outlier.mean(0).norm() > 40
    assert geometric_median(with_outlier).norm() < 0.05


def test_input_scale_makes_training_unit_free():
    _, x = _planted(4_096, m=32, d=16)
    results = []
    for factor in (1.0, 1000.0):
        sae = build_sae(_small("topk", batch_size=256))
        train(sae, lambda s, f=factor: sample_batches(x * f, 256, 0, s), steps=50, log_every=0)
        assert (x * factor).pow(2).sum(-1).mean() * sae.input_scale**2 == pytest.approx(1, rel=0.1)
        results.append((metrics(sae, x * factor), sae.encode(x[:64] * factor)))
    (m1, z1), (m2, z2) = results
    assert m1["fvu"] == pytest.approx(m2["fvu"], rel=1e-3)
    torch.testing.assert_close(z1, z2, rtol=1e-3, atol=1e-4)


# --------------------------------------------------------------------------- metrics


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "relu"])
def test_metrics_match_recomputation(arch):
    _, x = _planted(3_000, m=32, d=16)
    x = x * 5 + 2  # non-zero mean: FVU must subtract it
    sae = build_sae(_small(arch, batch_size=256))
    state = train(sae, lambda s: sample_batches(x, 256, 0, s), steps=30, log_every=0)
    m = metrics(sae, x, batch_size=700)  # chunks that do not divide the data
    with torch.no_grad():
        z = sae.encode(x).numpy().astype(np.float64)
        x_hat = sae.decode(torch.from_numpy(z).float()).numpy().astype(np.float64)
    xn = x.numpy().astype(np.float64)
    assert m["l0"] == pytest.approx((z != 0).sum(1).mean(), rel=1e-9)
    sq = ((xn - x_hat) ** 2).sum()
    assert m["fvu"] == pytest.approx(sq / ((xn - xn.mean(0)) ** 2).sum(), rel=1e-5)
    assert m["mse"] == pytest.approx(sq / xn.size, rel=1e-5)
    assert m["dead_fraction"] == pytest.approx(((z != 0).sum(0) == 0).mean())
    counts = torch.tensor([0, 3] * 24)
    assert metrics(sae, x, counts)["dead_fraction"] == 0.5
    fake = TrainState(last_fired=torch.tensor([0] * 36 + [10**9] * 12))
    assert metrics(sae, x, fake)["dead_fraction"] == 0.25
    assert state.step == 30


def test_ce_loss_recovered():
    assert ce_loss_recovered(clean_loss=2.0, sae_loss=2.5, zero_loss=7.0) == pytest.approx(0.9)
    assert ce_loss_recovered(2.0, 2.0, 7.0) == 1.0
    assert ce_loss_recovered(2.0, 7.0, 7.0) == 0.0
    assert math.isnan(ce_loss_recovered(2.0, 2.5, 2.0))


# --------------------------------------------------------------------------- data


def test_shuffle_buffer_every_token_once_and_mixed():
    chunks = [torch.stack([torch.arange(100) + 100 * c, torch.full((100,), c)], 1).float()
              for c in range(23)]  # fmt: skip
    batches = list(shuffled(chunks, capacity=512, batch_size=64, seed=1))
    out = torch.cat(batches)
    assert sorted(out[:, 0].long().tolist()) == list(range(2300))
    assert all(len(b) == 64 for b in batches[:-1]) and 0 < len(batches[-1]) <= 64
    assert all(b[:, 1].unique().numel() >= 3 for b in batches[:-1])  # never one document
    again = torch.cat(list(shuffled(chunks, capacity=512, batch_size=64, seed=1)))
    assert torch.equal(out, again)


def test_shuffle_buffer_holds_until_full():
    buf = ShuffleBuffer(capacity=256, batch_size=32, seed=0)
    buf.add(torch.zeros(200, 4))
    assert buf.batches() == [] and len(buf) == 200
    buf.add(torch.ones(100, 4))
    ready = buf.batches()
    assert len(ready) == (300 - 128) // 32 and len(buf) == 300 - 32 * len(ready)
    rest = buf.batches(final=True)
    assert sum(len(b) for b in ready + rest) == 300 and len(buf) == 0
    with pytest.raises(ValueError, match="capacity"):
        ShuffleBuffer(capacity=40, batch_size=32)


def test_sample_batches_resume_and_epochs():
    x = torch.arange(100).float()[:, None]
    full = list(islice(sample_batches(x, 16, seed=3), 14))
    resumed = list(islice(sample_batches(x, 16, seed=3, start_step=9), 5))
    assert all(torch.equal(a, b) for a, b in zip(full[9:], resumed, strict=True))
    epoch = torch.cat(full[:6])[:, 0].long()  # 6 batches per epoch, 4 tokens dropped
    assert epoch.unique().numel() == 96
    assert not torch.equal(torch.cat(full[:6]), torch.cat(full[6:12]))


# --------------------------------------------------------------------------- training state


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("source", ["iterable", "factory", "stream"])
def test_resume_equals_uninterrupted(tmp_path, arch, source):
    _, x = _planted(2_000, m=32, d=16)
    cfg = _small(arch, dead_after_tokens=64)  # dead latents appear, AuxK is exercised
    starts: list[int] = []  # where the live stream was asked to start

    def chunks(start: int):
        starts.append(start)
        return iter(x.split(50)[start:])

    def data():
        if source == "factory":
            return lambda s: sample_batches(x, 32, seed=5, start_step=s)
        if source == "stream":
            return StreamBatches(chunks, capacity=256, batch_size=32, seed=5)
        return shuffled(x.split(50), capacity=256, batch_size=32, seed=5)

    ref = build_sae(cfg)
    ref_state = train(ref, data(), steps=40, log_every=5)

    ckpt = tmp_path / "sae.pt"
    first = train(build_sae(cfg), data(), steps=20, checkpoint=ckpt, checkpoint_every=7,
                  log_every=5)  # fmt: skip
    assert first.step == 20
    resumed = build_sae(cfg)  # a fresh process: nothing but the checkpoint
    state = train(resumed, data(), steps=40, checkpoint=ckpt, checkpoint_every=7, log_every=5)
    if source == "stream":  # resumed mid-stream from the saved buffer, nothing replayed
        assert starts[:2] == [0, 0] and starts[2] > 0

    for (name, a), b in zip(ref.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert state.step == 40 and state.tokens_seen == ref_state.tokens_seen == 40 * 32
    assert torch.equal(state.last_fired, ref_state.last_fired)
    assert state.history == ref_state.history

    loaded, loaded_state = load_checkpoint(ckpt)
    assert loaded_state.step == 40
    for a, b in zip(loaded.state_dict().values(), ref.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    # nothing left to do: returns the saved state untouched
    assert train(build_sae(cfg), data(), steps=40, checkpoint=ckpt).step == 40


def test_resume_refuses_other_config(tmp_path):
    x = torch.randn(256, 16)
    ckpt = tmp_path / "sae.pt"
    train(build_sae(_small("topk")), [x[:32]] * 3, checkpoint=ckpt)
    with pytest.raises(ValueError, match=r"\['k'\]"):
        train(build_sae(_small("topk", k=5)), [x[:32]] * 6, checkpoint=ckpt)


def test_auxk_revives_dead_latents():
    """Half the latents start with tiny encoder columns: they never win the top-k, so without
    AuxK they get no gradient and stay dead; AuxK trains them back."""
    _, x = _planted(10_000, m=256)  # more features than latents: every latent is useful
    dead_end = {}
    for coef in (0.0, 1 / 32):
        cfg = SAEConfig(d_in=32, n_latents=128, k=4, auxk=16, auxk_coef=coef, lr=3e-3,
                        batch_size=256, dead_after_tokens=2048)  # fmt: skip
        sae = build_sae(cfg)
        with torch.no_grad():
            sae.W_enc[:, :64] *= 0.01
        state = train(sae, lambda s: sample_batches(x, 256, 0, s), steps=300, log_every=50)
        dead_end[coef] = state.history[-1]["dead_fraction"]
        if coef == 0:
            assert state.history[-1]["auxk"] == 0.0
        else:
            assert state.history[0]["auxk"] > 0
    assert dead_end[0.0] >= 0.45 and dead_end[1 / 32] <= 0.05


def test_auxk_loss_zero_without_dead_latents():
    sae = build_sae(_small("topk"))
    x = torch.randn(32, 16)
    none = torch.zeros(48, dtype=torch.bool)
    assert sae.loss(x, none)[1]["auxk"] == 0
    assert sae.loss(x, None)[1]["auxk"] == 0
    assert sae.loss(x, ~none)[1]["auxk"] > 0


# --------------------------------------------------------------------------- no host reads


@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_auxk_without_reading_the_dead_count_is_the_same(arch, sparse, monkeypatch):
    """The GPU's AuxK (top ``auxk`` of the masked pre-activations whatever the count, the
    extra slots zeroed, the scale a device tensor) gives the host's losses and gradients bit
    for bit: none dead, fewer dead than ``auxk``, more."""
    _, x = _planted(256, m=64, d=16)
    for n_dead in (0, 3, 8, 30):
        dead = torch.zeros(48, dtype=torch.bool)
        dead[torch.randperm(48, generator=torch.Generator().manual_seed(n_dead))[:n_dead]] = True
        got = {}
        for free in (True, False):
            monkeypatch.setattr(sae_archs, "_reads_are_free", lambda t, free=free: free)
            sae = build_sae(_small(arch))
            sae.sparse_decoder = sparse
            sae.init_from(x)
            got[free] = _loss_and_grads(sae, x, dead)
        (parts, grads), (parts_dev, grads_dev) = got[True], got[False]
        assert (float(parts["auxk"]) > 0) == (n_dead > 0)
        for key in parts:
            assert torch.equal(parts_dev[key], parts[key]), (n_dead, key)
        for name in grads:
            assert torch.equal(grads_dev[name], grads[name]), (n_dead, name)


def test_batchtopk_threshold_update_without_branches():
    """BatchTopK's threshold update, now all on the device, against the rule it replaced:
    unset until a batch keeps a positive activation, then set to the smallest, then an EMA
    of it; a batch with nothing positive changes nothing."""
    sae = build_sae(_small("batchtopk"))

    def step(vals: list[float]) -> None:
        z = torch.tensor(vals)
        sae.on_step(sae_archs._Out(z.sum(), {}, None, z > 0, {"vals": z}))

    def reference(thr: float, vals: list[float]) -> float:
        pos = [v for v in vals if v > 0]
        if not pos:
            return thr
        small = torch.tensor(min(pos))
        return float(small) if thr < 0 else float(torch.tensor(thr).lerp(small, 0.01))

    thr = float(sae.threshold)
    for vals in ([0.0, -1.0], [0.5, 0.0, 2.0], [0.0], [3.0, 1.5], [-2.0], [0.25, 9.0]):
        step(vals)
        thr = reference(thr, vals)
        assert float(sae.threshold) == thr, vals
    assert thr > 0
    sae.on_step(sae_archs._Out(torch.zeros(()), {}, None, torch.zeros(0), {}))  # dense code
    assert float(sae.threshold) == thr


def test_train_initialises_once_and_only_when_needed(monkeypatch):
    """``initialized`` is read once per ``train`` call (not every step): an SAE initialised
    beforehand is left as it is, a fresh one takes its first batch, once."""
    calls = []
    real = sae_module.SAE.init_from
    monkeypatch.setattr(sae_module.SAE, "init_from",
                        lambda self, x: (calls.append(x.shape[0]), real(self, x))[1])  # fmt: skip
    _, x = _planted(512, m=32, d=16)
    sae = build_sae(_small("topk"))
    train(sae, [x[:32], x[32:64], x[64:96]], log_every=0)
    assert calls == [32] and bool(sae.initialized)
    train(sae, [x[:32], x[32:64]], log_every=0)
    assert calls == [32]
    ready = build_sae(_small("topk"))
    ready.init_from(x)
    scale = ready.input_scale.clone()
    train(ready, [x[:32] * 5, x[32:64]], log_every=0)
    assert calls == [32, 512] and torch.equal(ready.input_scale, scale)


@needs_cuda
@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_cuda_training_steps_do_not_wait_for_the_device(arch, autocast):
    """No host sync in a training step (loss, backward, parallel-gradient removal, fused
    Adam, renormalisation, BatchTopK's threshold, AuxK, dead-latent counters): from the
    third batch on, the data source turns CUDA's sync check to "error", so any step that
    waits for the device fails here. (The first two steps build Adam's state.)"""
    cfg = SAEConfig(arch=arch, d_in=64, n_latents=512, k=8, auxk=32, batch_size=256, lr=1e-3,
                    dead_after_tokens=256, autocast=autocast)  # fmt: skip
    g = torch.Generator(device="cuda").manual_seed(0)
    xs = [torch.randn(256, 64, device="cuda", generator=g) for _ in range(8)]
    sae = build_sae(cfg).to("cuda")
    sae.init_from(xs[0])
    with torch.no_grad():
        sae.W_enc[:, :200] *= 0.01  # some latents go dead: AuxK has work

    def source():
        for i, x in enumerate(xs):
            if i == 2:
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
            yield x

    try:
        state = train(sae, source(), log_every=0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert state.step == 8
    assert all(torch.isfinite(p).all() for p in sae.parameters())
    if arch in ("topk", "batchtopk"):
        assert bool(state.dead_mask(cfg.dead_after_tokens).any())  # AuxK ran with dead latents
