"""Tests for ops.props: per-family neuron weights, folded unembedding, vocabulary composition,
weight properties and prediction / suppression labels.

Tiny random models are built from configs in memory (no download, no disk), in the style of
tests/ops/test_models.py.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    T5Config,
)

from ops.errors import ModelError
from ops.models import ARCHS, ArchSpec, arch_spec, register_arch
from ops.props import (
    DEFAULT_KURT_THRESHOLD,
    label_neurons,
    neuron_properties,
    neuron_weights,
    unembedding,
    vocab_composition,
)
from tests.tiny_configs import CONFIGS, D_MODEL, VOCAB

D_MLP = {"gpt2": 4 * D_MODEL, "gpt_neox": 40, "opt": 56, "bert": 44}

_CACHE: dict[str, PreTrainedModel] = {}


def _tiny(model_type: str, config: PretrainedConfig | None = None) -> PreTrainedModel:
    """A fresh-seeded tiny model in eval mode (cached per family unless a config is given)."""
    if config is None and model_type in _CACHE:
        return _CACHE[model_type]
    torch.manual_seed(0)
    cfg = config or CONFIGS[model_type]()
    cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id = 0, 1, 2
    cls = AutoModel if model_type == "bert" else AutoModelForCausalLM
    model = cls.from_config(cfg).eval()
    model.requires_grad_(False)
    if config is None:
        _CACHE[model_type] = model
    return model


def _fresh(model_type: str) -> PreTrainedModel:
    """An uncached copy, for tests that edit weights."""
    return _tiny(model_type, CONFIGS[model_type]())


def _mlp_pieces(model_type: str, block: nn.Module) -> tuple:
    """(in module, its act fn, up module or None, out module, run: x -> MLP output), read from
    the family's own attribute names, independently of ops.props."""
    if model_type == "gpt2":
        m = block.mlp
        return m.c_fc, m.act, None, m.c_proj, m
    if model_type == "gpt_neox":
        m = block.mlp
        return m.dense_h_to_4h, m.act, None, m.dense_4h_to_h, m
    if model_type == "opt":
        return (
            block.fc1,
            block.activation_fn,
            None,
            block.fc2,
            lambda x: block.fc2(block.activation_fn(block.fc1(x))),
        )
    if model_type == "bert":
        inter = block.intermediate
        return (
            inter.dense,
            inter.intermediate_act_fn,
            None,
            block.output.dense,
            lambda x: block.output.dense(inter(x)),
        )
    m = block.mlp
    return m.gate_proj, m.act_fn, m.up_proj, m.down_proj, m


# --------------------------------------------------------------------------- neuron_weights


def test_every_family_has_a_tiny_config() -> None:
    assert set(CONFIGS) == set(ARCHS)


@pytest.mark.parametrize("model_type", list(CONFIGS))
def test_weights_equal_parameters(model_type: str) -> None:
    model = _tiny(model_type)
    d_mlp = D_MLP.get(model_type, 48)
    for layer in (0, 1):
        w_in, w_out = neuron_weights(model, layer)
        assert w_in.shape == w_out.shape == (d_mlp, D_MODEL)
        assert w_in.dtype == w_out.dtype == torch.float32
        block = arch_spec(model).layers(model)[layer]
        in_mod, _, _, out_mod, _ = _mlp_pieces(model_type, block)
        if model_type == "gpt2":  # Conv1D: weight [in, out]
            for i in (0, 5, d_mlp - 1):
                assert torch.equal(w_in[i], in_mod.weight[:, i])
                assert torch.equal(w_out[i], out_mod.weight[i])
        else:  # nn.Linear: weight [out, in]
            for i in (0, 5, d_mlp - 1):
                assert torch.equal(w_in[i], in_mod.weight[i])
                assert torch.equal(w_out[i], out_mod.weight[:, i])
    # Layers differ, and the result is a copy.
    w0, _ = neuron_weights(model, 0)
    w1, _ = neuron_weights(model, 1)
    assert not torch.equal(w0, w1)
    before = in_mod.weight.clone()
    w1.zero_()
    assert torch.equal(in_mod.weight, before)


@pytest.mark.parametrize("model_type", list(CONFIGS))
def test_weights_reproduce_the_mlp(model_type: str) -> None:
    """Behavioural: the hidden activation at the neuron site is act(x @ W_in.T + b_in) (times
    the up projection for gated MLPs), and the MLP output is hidden @ W_out + b_out."""
    model = _tiny(model_type)
    block = arch_spec(model).layers(model)[1]
    in_mod, act, up, out_mod, run = _mlp_pieces(model_type, block)
    w_in, w_out = neuron_weights(model, 1)

    x = torch.randn(3, 5, D_MODEL, generator=torch.Generator().manual_seed(7))
    seen: dict[str, torch.Tensor] = {}
    site = arch_spec(model).down_proj(block)
    h1 = site.register_forward_pre_hook(lambda m, a: seen.__setitem__("hidden", a[0].clone()))
    h2 = site.register_forward_hook(lambda m, a, o: seen.__setitem__("out", o.clone()))
    try:
        with torch.no_grad():
            run(x)
    finally:
        h1.remove()
        h2.remove()

    b_in = in_mod.bias if getattr(in_mod, "bias", None) is not None else 0.0
    expected = act(x @ w_in.T + b_in)
    if up is not None:
        expected = expected * up(x)
    torch.testing.assert_close(seen["hidden"], expected, rtol=1e-5, atol=1e-6)
    b_out = out_mod.bias if getattr(out_mod, "bias", None) is not None else 0.0
    torch.testing.assert_close(seen["out"], seen["hidden"] @ w_out + b_out, rtol=1e-5, atol=1e-6)


def test_bad_layer_and_unknown_family() -> None:
    model = _tiny("llama")
    for layer in (2, -1, True, "0"):
        with pytest.raises(ModelError, match="layer"):
            neuron_weights(model, layer)  # type: ignore[arg-type]

    t5 = AutoModel.from_config(
        T5Config(vocab_size=VOCAB, d_model=32, d_ff=48, num_layers=1, num_heads=2, d_kv=8)
    )
    for call in (
        lambda: neuron_weights(t5, 0),
        lambda: unembedding(t5),
        lambda: neuron_properties(t5, 0),
    ):
        with pytest.raises(ModelError, match="'t5'"):
            call()

    # A family with a registered site but no weight layout: named, with the way out.
    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = PretrainedConfig()
            self.config.model_type = "my_arch"
            self.blocks = nn.ModuleList([nn.Module()])
            self.blocks[0].inp = nn.Linear(4, 6)
            self.blocks[0].out = nn.Linear(6, 4)

    tiny = Tiny()
    with pytest.raises(ModelError, match="my_arch.*register_arch"):
        neuron_weights(tiny, 0)
    register_arch(
        "my_arch",
        ArchSpec(lambda m: m.blocks, lambda b: b.out, lambda c: 6, "out input",
                 in_proj=lambda b: b.inp, final_norm=None),  # fmt: skip
    )
    try:
        w_in, w_out = neuron_weights(tiny, 0)
        assert torch.equal(w_in, tiny.blocks[0].inp.weight)
        assert torch.equal(w_out, tiny.blocks[0].out.weight.T)
        assert unembedding(tiny) is None
    finally:
        ARCHS.unregister("my_arch")


# --------------------------------------------------------------------------- unembedding


def _randomize_final_norm(model: nn.Module, model_type: str) -> nn.Module:
    base = model.base_model
    norm = {
        "gpt2": lambda: base.ln_f,
        "gpt_neox": lambda: base.final_layer_norm,
        "opt": lambda: base.decoder.final_layer_norm,
    }.get(model_type, lambda: base.norm)()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(norm.weight.shape, generator=g) * 2 - 0.5)
        if getattr(norm, "bias", None) is not None:
            norm.bias.copy_(torch.randn(norm.bias.shape, generator=g))
    return norm


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "gemma", "gemma2", "gpt_neox", "opt"])
def test_folded_unembedding_gives_the_logits(model_type: str) -> None:
    """head(norm(x)) = (W_U_eff @ x) / scale(x) + head(bias): the folded unembedding is the
    logit effect of a residual direction up to the norm's one positive per-token factor."""
    model = _fresh(model_type)
    norm = _randomize_final_norm(model, model_type)
    head = model.get_output_embeddings()
    raw = unembedding(model, fold_norm=False)
    assert torch.equal(raw, head.weight)
    w_eff = unembedding(model)
    assert w_eff.shape == (VOCAB, D_MODEL) and w_eff.dtype == torch.float32
    assert not torch.allclose(w_eff, raw)

    x = torch.randn(4, D_MODEL, generator=torch.Generator().manual_seed(5)) * 3 + 1
    with torch.no_grad():
        logits = head(norm(x))
    layer_norm = isinstance(norm, nn.LayerNorm)
    centred = x - x.mean(-1, keepdim=True) if layer_norm else x
    scale = (centred.pow(2).mean(-1, keepdim=True) + norm_eps(norm)).sqrt()
    bias = head(norm.bias) if getattr(norm, "bias", None) is not None else 0.0
    torch.testing.assert_close(logits, (x @ w_eff.T) / scale + bias, rtol=1e-4, atol=1e-5)


def norm_eps(norm: nn.Module) -> float:
    for name in ("eps", "variance_epsilon"):
        if hasattr(norm, name):
            return float(getattr(norm, name))
    raise AssertionError(f"no eps on {type(norm).__name__}")


def test_opt_project_out_is_folded() -> None:
    """OPT-350m style: the head lives in word_embed_proj_dim; project_out maps into it."""
    cfg = CONFIGS["opt"]()
    cfg.word_embed_proj_dim = 16
    model = _tiny("opt", cfg)
    proj = model.base_model.decoder.project_out
    assert proj is not None
    head = model.get_output_embeddings()
    assert head.weight.shape == (VOCAB, 16)
    raw = unembedding(model, fold_norm=False)
    torch.testing.assert_close(raw, head.weight @ proj.weight)
    assert unembedding(model).shape == (VOCAB, D_MODEL)
    props = neuron_properties(model, 0)
    assert props["top_promoted"].shape == (56, 10)


def test_bert_has_no_unembedding() -> None:
    model = _tiny("bert")
    assert unembedding(model) is None
    props = neuron_properties(model, 1)
    assert set(props) == {"w_in_norm", "w_out_norm", "cos_in_out"}
    labels = label_neurons(props)
    assert labels["prediction"].shape == (44,)
    assert not labels["prediction"].any() and not labels["suppression"].any()


# --------------------------------------------------------------------------- vocab_composition


def _reference(w_out: np.ndarray, w_u: np.ndarray) -> dict[str, np.ndarray]:
    logits = w_out.astype(np.float64) @ w_u.astype(np.float64).T
    mean = logits.mean(1)
    d = logits - mean[:, None]
    m2, m3, m4 = (d**2).mean(1), (d**3).mean(1), (d**4).mean(1)
    return {
        "logits": logits,
        "vocab_mean": mean,
        "vocab_var": m2,
        "vocab_skew": m3 / m2**1.5,
        "vocab_kurt": m4 / m2**2,
    }


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_vocab_composition_matches_numpy(dtype: torch.dtype) -> None:
    rng = np.random.default_rng(0)
    w_out = rng.standard_normal((37, 24))
    w_u = rng.standard_normal((300, 24)) * rng.exponential(1.0, (300, 1))  # heavy-ish tails
    w_out[3] *= 0.01  # scale must not matter for skew / kurt
    ref = _reference(w_out, w_u)
    tol = {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-6}
    results = [
        vocab_composition(
            torch.tensor(w_out, dtype=dtype), torch.tensor(w_u, dtype=dtype), 7, chunk
        )
        for chunk in (5, 1, 1000)
    ]
    for out in results:
        assert set(out) == {
            "vocab_mean",
            "vocab_var",
            "vocab_skew",
            "vocab_kurt",
            "top_promoted",
            "top_suppressed",
        }
        for key in ("vocab_mean", "vocab_var", "vocab_skew", "vocab_kurt"):
            assert out[key].dtype == np.float64 and out[key].shape == (37,)
            np.testing.assert_allclose(out[key], ref[key], **tol)
        assert out["top_promoted"].dtype == np.int64
        assert out["top_promoted"].shape == out["top_suppressed"].shape == (37, 7)
        order = np.argsort(ref["logits"], axis=1)
        np.testing.assert_array_equal(out["top_promoted"], order[:, ::-1][:, :7])
        np.testing.assert_array_equal(out["top_suppressed"], order[:, :7])
    for other in results[1:]:  # chunking changes nothing beyond BLAS rounding
        for key in ("vocab_mean", "vocab_var", "vocab_skew", "vocab_kurt"):
            np.testing.assert_allclose(other[key], results[0][key], **tol)
        for key in ("top_promoted", "top_suppressed"):
            np.testing.assert_array_equal(other[key], results[0][key])


def test_vocab_composition_edge_cases() -> None:
    w_u = torch.randn(50, 8)
    out = vocab_composition(torch.zeros(2, 8), w_u, top=3)
    for key in ("vocab_mean", "vocab_var", "vocab_skew", "vocab_kurt"):
        assert np.all(out[key] == 0.0)  # constant logits: 0, not NaN
    out = vocab_composition(np.ones((2, 8), np.float32), w_u.numpy(), top=50)  # numpy is fine
    assert out["top_promoted"].shape == (2, 50)
    for bad in (
        lambda: vocab_composition(torch.zeros(2, 7), w_u),
        lambda: vocab_composition(torch.zeros(2, 8), w_u, top=51),
        lambda: vocab_composition(torch.zeros(2, 8), w_u, top=0),
        lambda: vocab_composition(torch.zeros(2, 8), w_u, chunk=0),
    ):
        with pytest.raises(ValueError):
            bad()


def test_planted_prediction_and_suppression_neurons() -> None:
    rng = np.random.default_rng(1)
    vocab, d = 2000, 64
    w_u = rng.standard_normal((vocab, d))
    w_out = rng.standard_normal((6, d)) * 0.1
    token = 1234
    w_u[token] *= 10  # a long unembedding row: aligned with it, the token stands far out
    w_out[0] = w_u[token] / 10  # its logit ~ 10 * 64, the rest ~ N(0, 64): an 80-sigma outlier
    w_out[1] = -w_out[0]
    unit = w_u[token] / np.linalg.norm(w_u[token])
    w_out[2:] -= np.outer(w_out[2:] @ unit, unit)  # the other neurons ignore that token
    out = vocab_composition(torch.tensor(w_out), torch.tensor(w_u), top=5)
    assert out["vocab_kurt"][0] > 50 and out["vocab_skew"][0] > 2
    assert out["vocab_kurt"][1] > 50 and out["vocab_skew"][1] < -2
    assert out["top_promoted"][0, 0] == token
    assert out["top_suppressed"][1, 0] == token
    assert np.all(np.abs(out["vocab_kurt"][2:] - 3) < 0.5)  # random rows: near Gaussian
    labels = label_neurons(out)
    np.testing.assert_array_equal(labels["prediction"], [True] + [False] * 5)
    np.testing.assert_array_equal(labels["suppression"], [False, True] + [False] * 4)
    assert not labels["dead"].any()


# --------------------------------------------------------------------------- neuron_properties


def test_neuron_properties_on_a_model() -> None:
    model = _fresh("llama")
    mlp = arch_spec(model).layers(model)[1].mlp
    token, g = 17, torch.Generator().manual_seed(2)
    direction = torch.randn(D_MODEL, generator=g)
    with torch.no_grad():
        # Neuron 0: a prediction neuron for `token`; neuron 1: its suppression twin.
        model.lm_head.weight[token] = 10 * direction  # (tied: also the input embedding)
        mlp.down_proj.weight[:, 0] = direction
        mlp.down_proj.weight[:, 1] = -direction
        # Neuron 2: W_in row == W_out row; neuron 3: zero W_in; neuron 4: zero W_out.
        mlp.gate_proj.weight[2] = mlp.down_proj.weight[:, 2]
        mlp.gate_proj.weight[3] = 0
        mlp.down_proj.weight[:, 4] = 0
    props = neuron_properties(model, 1, top=4)
    assert set(props) >= {"w_in_norm", "w_out_norm", "cos_in_out", "vocab_kurt", "top_promoted"}
    for key in ("w_in_norm", "w_out_norm", "cos_in_out", "vocab_mean", "vocab_kurt"):
        assert props[key].shape == (48,) and props[key].dtype == np.float64
        assert np.isfinite(props[key]).all(), key
    w_in, w_out = neuron_weights(model, 1)
    np.testing.assert_allclose(props["w_in_norm"], w_in.double().norm(dim=1).numpy())
    np.testing.assert_allclose(props["w_out_norm"], w_out.double().norm(dim=1).numpy())
    np.testing.assert_allclose(props["cos_in_out"][2], 1.0, rtol=1e-12)
    assert props["cos_in_out"][3] == 0.0 and props["cos_in_out"][4] == 0.0
    assert props["w_in_norm"][3] == 0.0 and props["w_out_norm"][4] == 0.0
    assert np.all(np.abs(props["cos_in_out"]) <= 1.0 + 1e-12)
    np.testing.assert_allclose(
        props["cos_in_out"][5],
        float(torch.nn.functional.cosine_similarity(w_in[5:6].double(), w_out[5:6].double())),
    )

    assert props["top_promoted"][0, 0] == token and props["top_suppressed"][1, 0] == token
    assert props["vocab_kurt"][0] > 50 and props["vocab_skew"][0] > 0
    assert props["vocab_kurt"][1] > 50 and props["vocab_skew"][1] < 0
    dead = np.zeros(48, bool)
    dead[7] = True
    labels = label_neurons(props, dead=dead)
    assert labels["prediction"][0] and not labels["suppression"][0]
    assert labels["suppression"][1] and not labels["prediction"][1]
    assert labels["dead"][7] and labels["dead"].sum() == 1
    assert labels["dead"] is not dead

    # Reusing a precomputed unembedding gives the same result; the raw one differs only
    # through the norm gain (ones at init, so here: identical).
    again = neuron_properties(model, 1, top=4, w_u=unembedding(model), chunk=7)
    for key in props:
        np.testing.assert_allclose(again[key], props[key], rtol=1e-6, atol=1e-9)


def test_label_neurons_thresholds() -> None:
    props = {
        "vocab_kurt": np.array([3.0, 10.0, 10.5, 50.0, 50.0, 50.0, 0.0]),
        "vocab_skew": np.array([0.5, 2.0, 1.0, -1.0, 0.0, 3.0, 0.0]),
        "w_in_norm": np.ones(7),
    }
    labels = label_neurons(props)
    np.testing.assert_array_equal(labels["prediction"], [0, 0, 1, 0, 0, 1, 0])
    np.testing.assert_array_equal(labels["suppression"], [0, 0, 0, 1, 0, 0, 0])
    np.testing.assert_array_equal(labels["dead"], np.zeros(7, bool))
    assert all(v.dtype == bool for v in labels.values())
    strict = label_neurons(props, kurt_threshold=60.0)
    assert not strict["prediction"].any() and not strict["suppression"].any()
    assert DEFAULT_KURT_THRESHOLD == 10.0
    with pytest.raises(ValueError, match="d_mlp"):
        label_neurons(props, dead=np.zeros(6, bool))


# --------------------------------------------------------------------------- real SmolLM2


@pytest.mark.slow
def test_real_smollm2_properties() -> None:
    if not os.environ.get("HF_HUB_OFFLINE"):
        pytest.skip("set HF_HUB_OFFLINE=1 (nothing may download)")
    from ops.models import load_model

    lm = load_model("smollm2", dtype="float32", device="cpu", with_tokenizer=False)
    w_u = unembedding(lm.model)
    assert w_u is not None and w_u.shape == (49152, 576)
    t0 = time.perf_counter()
    props = neuron_properties(lm.model, lm.n_layers - 1, w_u=w_u)
    elapsed = time.perf_counter() - t0
    assert props["vocab_kurt"].shape == (1536,) and np.isfinite(props["vocab_kurt"]).all()
    assert props["top_promoted"].max() < 49152
    assert elapsed < 60, elapsed


def test_direction_logit_lens_matches_bruteforce() -> None:
    from ops.props import direction_logit_lens

    rng = np.random.default_rng(7)
    d_mlp, d_model, vocab, n = 24, 8, 50, 3
    dirs = rng.standard_normal((n, d_mlp))
    w_out = torch.from_numpy(rng.standard_normal((d_mlp, d_model)))
    w_u = torch.from_numpy(rng.standard_normal((vocab, d_model)))
    promoted, suppressed = direction_logit_lens(dirs, w_out, w_u, top=5)
    logits = dirs @ w_out.numpy() @ w_u.numpy().T  # [n, vocab]
    assert promoted.shape == suppressed.shape == (n, 5) and promoted.dtype == np.int64
    assert np.array_equal(promoted, np.argsort(-logits, axis=1)[:, :5])
    assert np.array_equal(suppressed, np.argsort(logits, axis=1)[:, :5])
    with pytest.raises(ValueError, match="d_mlp"):
        direction_logit_lens(dirs.T, w_out, w_u, top=5)
