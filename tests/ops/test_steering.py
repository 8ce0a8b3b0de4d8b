"""Steering: KL calibration against an independent float64 recomputation, known-answer tokens."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from ops.models import load_model
from ops.steering import SteeringEval, diff_in_means, steer


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(str(tiny_model_dir), dtype="float32", device="cpu", with_tokenizer=False)


def _batches(vocab: int, n: int = 2, seq: int = 24, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(2, vocab, (3, seq), generator=g)
        attn = torch.ones_like(ids)
        attn[2, seq - 5 :] = 0  # a right-padded row: its pads must not count
        m = attn.bool().clone()
        m[:, 0] = False
        out.append((ids, attn, m))
    return out


def _kl_float64(lm, layer: int, direction: np.ndarray, alpha: float, batches) -> float:
    """KL(clean || steered) with the shift folded into the down projection's output instead of
    its input (``W(a + αd) = Wa + αWd``), in a float64 copy of the model."""
    model = copy.deepcopy(lm.model).double()
    down = lm.down_projs()[layer]
    w = down.weight.detach().double()
    unit = torch.from_numpy(direction / np.linalg.norm(direction))
    bias = alpha * (w @ unit)
    idx = lm.down_projs().index(down)
    target = [m for m in model.modules() if isinstance(m, torch.nn.Linear)
              and m.weight.shape == down.weight.shape]  # fmt: skip
    target = target[idx]
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, attn, m in batches:
            clean = model(input_ids=ids, attention_mask=attn).logits[m]
            h = target.register_forward_hook(lambda _mod, _a, out: out + bias)
            steered = model(input_ids=ids, attention_mask=attn).logits[m]
            h.remove()
            p = np.asarray(torch.log_softmax(clean, -1))
            q = np.asarray(torch.log_softmax(steered, -1))
            total += float((np.exp(p) * (p - q)).sum())
            count += p.shape[0]
    return total / count


def test_diff_in_means_matches_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 7)).astype(np.float32)
    lab = rng.integers(0, 3, 200)
    got = diff_in_means(x, lab, 2, 0)
    want = x[lab == 2].astype(np.float64).mean(0) - x[lab == 0].astype(np.float64).mean(0)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    with pytest.raises(ValueError, match="label b=5"):
        diff_in_means(x, lab, 2, 5)


@pytest.mark.parametrize("target", [0.001, 0.005])
def test_steer_hits_target_kl_and_matches_float64(tiny, target):
    batches = _batches(tiny.model.config.vocab_size)
    ev = SteeringEval(tiny, 1, batches)
    direction = np.random.default_rng(1).normal(size=tiny.d_mlp)
    res = steer(ev, direction, target_kl=target, tolerance=0.05)
    assert res.converged
    assert abs(res.kl - target) <= 0.05 * target
    assert res.alpha > 0 and res.alpha_rel == pytest.approx(res.alpha / ev.act_norm)
    # the reported KL is the KL of the reported alpha, recomputed independently
    assert _kl_float64(tiny, 1, direction, res.alpha, batches) == pytest.approx(res.kl, rel=1e-3)
    # the search tried larger and smaller alphas around the answer, KL increasing with alpha
    alphas, kls = zip(*sorted(res.evaluations), strict=True)
    assert list(kls) == sorted(kls)
    assert len(res.promoted) == len(res.suppressed) == 10
    assert res.promoted[0][1] > 0 > res.suppressed[0][1]


def test_steer_reports_saturation(tiny):
    """Behind RMSNorm the effect of a huge shift is bounded: an unreachable target stops early."""
    ev = SteeringEval(tiny, 1, _batches(tiny.model.config.vocab_size))
    res = steer(ev, np.random.default_rng(1).normal(size=tiny.d_mlp), target_kl=5.0)
    assert not res.converged
    assert len(res.evaluations) < 24
    assert res.kl == max(kl for _, kl in res.evaluations)


def test_steer_promotes_the_unembedding_direction(tiny):
    """A shift whose residual write is one token's unembedding row promotes that token."""
    # a random init's logits barely move (KL saturates near 0.01): sharpen the unembedding
    model = copy.deepcopy(tiny.model)
    with torch.no_grad():
        model.lm_head.weight.mul_(50)
    tiny = dataclasses.replace(tiny, model=model)
    layer = tiny.n_layers - 1
    w_down = tiny.down_projs()[layer].weight.detach().double().numpy()  # [d_model, d_mlp]
    w_u = tiny.model.lm_head.weight.detach().double().numpy()
    token = 57
    direction = np.linalg.pinv(w_down) @ w_u[token]
    ev = SteeringEval(tiny, layer, _batches(tiny.model.config.vocab_size))
    res = steer(ev, direction, target_kl=3.0, tolerance=0.1)
    assert res.converged
    assert res.promoted[0][0] == token
    # steering against the token the model predicts most often suppresses it most (changes are
    # in probability, so only a token with probability to lose can top the suppressed list)
    likely = int(torch.cat([c.exp() for c in ev.clean]).mean(0).argmax())
    res_neg = steer(ev, -np.linalg.pinv(w_down) @ w_u[likely], target_kl=3.0, tolerance=0.1)
    assert res_neg.suppressed[0][0] == likely


def test_steer_rejects_bad_direction(tiny):
    ev = SteeringEval(tiny, 0, _batches(tiny.model.config.vocab_size, n=1))
    with pytest.raises(ValueError, match="zero"):
        steer(ev, np.zeros(tiny.d_mlp))
    with pytest.raises(ValueError, match="target_kl"):
        steer(ev, np.ones(tiny.d_mlp), target_kl=0)
