"""Weight-based neuron properties and labels (Gurnee et al. 2024, "Universal Neurons in GPT2
Language Models", section 5).

Per MLP neuron ``i`` of a layer:

- ``W_in[i]``: the row of the input projection whose dot product with the (normalised) residual
  stream is the neuron's pre-activation. Gated MLPs (Llama, Gemma, Qwen, Mistral, SmolLM3)
  have two input rows, ``gate_proj`` (inside the nonlinearity) and ``up_proj`` (a linear
  multiplier); ``W_in`` is the gate row, the one that decides when the neuron fires.
- ``W_out[i]``: what the neuron writes into the residual stream per unit of activation (a row
  of ``c_proj`` for GPT-2's Conv1D, a column of every ``nn.Linear`` output projection).
- vocabulary composition: the direct effect of ``W_out[i]`` on the next-token logits,
  ``W_U @ W_out[i]`` over the whole vocabulary, summarised by its moments and its most
  promoted / suppressed tokens. Prediction neurons have a heavy right tail (a few tokens pushed
  far up: high kurtosis, positive skew), suppression neurons the mirror image.

The unembedding is folded with the final norm by default, as TransformerLens does for the
paper (``fold_ln``): the residual stream reaches ``W_U`` only through the final norm, whose
per-channel gain reweights every direction (Llama's RMSNorm gains differ a lot between
channels), and LayerNorm also removes the mean over channels. The norm's division by the
residual's scale is one positive number per token, so it changes no moment ratio and no
ranking and is left out. See :func:`unembedding`.

Everything here reads weights only (no forward pass); it runs on whatever device the model
is on and returns numpy arrays.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ops.errors import ConfigError, ModelError
from ops.models import arch_spec

__all__ = [
    "DEFAULT_KURT_THRESHOLD",
    "label_neurons",
    "neuron_properties",
    "neuron_weights",
    "unembedding",
    "vocab_composition",
]

DEFAULT_KURT_THRESHOLD = 10.0
"""Vocabulary kurtosis above which a neuron counts as a prediction / suppression neuron.

Pearson kurtosis, so a Gaussian logit distribution has 3; over a 50k-token vocabulary its
sampling noise is ~0.02, and ordinary neurons of real models sit around 3-5 (the embedding
geometry is itself somewhat heavy-tailed). Gurnee et al. fix no cut-off: they plot vocab
kurtosis per layer on a log scale, where the prediction and suppression neurons of the later
layers stand out with values in the tens to hundreds. 10 (more than three times the Gaussian
value) separates those tails from the bulk; pass another ``kurt_threshold`` to be stricter."""


def _model_type(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) or type(model).__name__


def _neuron_rows(module: nn.Module, role: str) -> torch.Tensor:
    """One row per neuron, ``[d_mlp, d_model]``, as a float32 copy.

    ``role="in"``: the neurons are the module's outputs; ``"out"``: its inputs. ``nn.Linear``
    stores ``[out, in]``, GPT-2's ``Conv1D`` ``[in, out]``.
    """
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ModelError(
            f"{type(module).__name__} has no 2-d weight; cannot read neuron {role} weights"
        )
    neurons_are_rows = isinstance(module, Conv1D) == (role == "out")
    rows = weight if neurons_are_rows else weight.T
    return rows.detach().to(torch.float32).clone(memory_format=torch.contiguous_format)


def _block(model: nn.Module, layer: int) -> nn.Module:
    blocks = arch_spec(model).layers(model)
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < len(blocks):
        raise ModelError(
            f"model_type {_model_type(model)!r}: layer {layer!r} is out of range; "
            f"it has layers 0..{len(blocks) - 1}"
        )
    return blocks[layer]


def neuron_weights(model: nn.Module, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W_in, W_out)`` of one layer, each ``[d_mlp, d_model]`` float32 on the model's device.

    ``W_in[i]``: neuron ``i``'s input row (pre-activation = ``x @ W_in[i] + b_in[i]``; the
    gate for gated MLPs). ``W_out[i]``: what it adds to the residual stream per unit of
    activation (MLP output = ``act @ W_out + b_out``). Copies: editing them leaves the model
    alone.
    """
    spec = arch_spec(model)
    block = _block(model, layer)
    w_in = _neuron_rows(spec.in_proj(block), "in")
    w_out = _neuron_rows(arch_spec(model).down_proj(block), "out")
    if w_in.shape != w_out.shape:
        raise ModelError(
            f"model_type {_model_type(model)!r} layer {layer}: W_in {tuple(w_in.shape)} and "
            f"W_out {tuple(w_out.shape)} do not both have shape [d_mlp, d_model]"
        )
    return w_in, w_out


# --------------------------------------------------------------------------- unembedding


def unembedding(model: nn.Module, fold_norm: bool = True) -> torch.Tensor | None:
    """The effective unembedding ``[vocab, d_model]`` (float32, model's device), or ``None``
    when the model has no linear readout (BERT and other encoders, or no LM head loaded).

    ``fold_norm=False``: the LM head's weight (``get_output_embeddings``) as stored.
    ``fold_norm=True`` (default): composed with the final norm as far as it is linear, so that
    ``W_U_eff @ v`` is the logit effect of a residual direction ``v`` up to one positive
    per-token factor: each column is scaled by the norm's gain (``weight``, or
    ``1 + weight`` for Gemma), and for LayerNorm (which subtracts the channel mean first)
    each row is centred over ``d_model``. The norm's bias only adds a constant per token.
    A projection between the norm and the head (OPT-350m's ``project_out``) is always folded,
    since without it the head does not live in the residual stream's space.
    Gemma-2's final logit soft-capping (a monotone tanh) is not modelled.
    """
    spec = arch_spec(model)
    if spec.final_norm is None:
        return None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return None
    w_u = weight.detach().to(torch.float32, copy=True)
    project = spec.out_project(model) if spec.out_project is not None else None
    if project is not None:
        w_u = w_u @ project.weight.detach().to(w_u.device, torch.float32)
    if not fold_norm:
        return w_u
    norm = spec.final_norm(model)
    if norm is None:
        return w_u
    gain = getattr(norm, "weight", None)
    if isinstance(gain, torch.Tensor):
        w_u *= gain.detach().to(w_u.device, torch.float32) + spec.norm_offset
    elif spec.norm_offset:
        w_u *= 1.0 + spec.norm_offset
    if isinstance(norm, nn.LayerNorm):
        w_u -= w_u.mean(dim=1, keepdim=True)
    return w_u


# --------------------------------------------------------------------------- vocabulary


def vocab_composition(
    w_out: torch.Tensor | np.ndarray,
    w_u: torch.Tensor | np.ndarray,
    top: int = 10,
    chunk: int = 256,
) -> dict[str, np.ndarray]:
    """Moments and extreme tokens of each neuron's logit effect ``w_out[i] @ w_u.T``.

    ``w_out`` ``[d_mlp, d_model]``, ``w_u`` ``[vocab, d_model]``. The ``[d_mlp, vocab]``
    logits are formed ``chunk`` neurons at a time on ``w_u``'s device (the matmul in float32,
    or float64 when both inputs are float64; moments in float64), so memory stays near
    ``chunk * vocab * 20`` bytes. Returns float64 ``vocab_mean``, ``vocab_var`` (population),
    ``vocab_skew``, ``vocab_kurt`` (Pearson: normal = 3), ``[d_mlp]`` each, constant rows giving
    skew = kurt = 0 as in :func:`ops.stats.finalize`; int64 ``top_promoted`` (largest logit
    first) and ``top_suppressed`` (most negative first), ``[d_mlp, top]``.
    """
    w_u = torch.as_tensor(w_u)
    w_out = torch.as_tensor(w_out, device=w_u.device)
    if w_out.dim() != 2 or w_u.dim() != 2 or w_out.shape[1] != w_u.shape[1]:
        raise ConfigError(
            f"vocab_composition: w_out {tuple(w_out.shape)} and w_u {tuple(w_u.shape)} must be "
            "[d_mlp, d_model] and [vocab, d_model]"
        )
    n, vocab = w_out.shape[0], w_u.shape[0]
    if not 0 < top <= vocab:
        raise ConfigError(f"vocab_composition: top={top} must be in 1..{vocab} (the vocabulary)")
    if chunk < 1:
        raise ConfigError(f"vocab_composition: chunk={chunk} must be positive")
    dtype = torch.float64 if w_out.dtype == w_u.dtype == torch.float64 else torch.float32
    w_u_t = w_u.to(dtype).T
    w_out = w_out.to(dtype)

    out = {k: np.empty(n, np.float64) for k in ("vocab_mean", "vocab_var", "vocab_skew")}
    out["vocab_kurt"] = np.empty(n, np.float64)
    out["top_promoted"] = np.empty((n, top), np.int64)
    out["top_suppressed"] = np.empty((n, top), np.int64)
    with torch.no_grad():
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            logits = w_out[start:stop] @ w_u_t  # [c, vocab]
            out["top_promoted"][start:stop] = logits.topk(top, dim=1).indices.cpu().numpy()
            out["top_suppressed"][start:stop] = (
                logits.topk(top, dim=1, largest=False).indices.cpu().numpy()
            )
            d = logits.to(torch.float64)
            del logits
            mean = d.mean(dim=1, keepdim=True)
            d -= mean
            d2 = d * d
            # Row-wise dot products: no [c, vocab] temporaries for the 3rd and 4th powers.
            m2 = d2.mean(dim=1)
            m3 = torch.einsum("ij,ij->i", d2, d) / vocab
            m4 = torch.einsum("ij,ij->i", d2, d2) / vocab
            del d, d2
            ok = m2 > 0
            safe = torch.where(ok, m2, torch.ones_like(m2))
            skew = torch.where(ok, m3 / safe**1.5, torch.zeros_like(m3))
            kurt = torch.where(ok, m4 / safe**2, torch.zeros_like(m4))
            out["vocab_mean"][start:stop] = mean[:, 0].cpu().numpy()
            out["vocab_var"][start:stop] = m2.cpu().numpy()
            out["vocab_skew"][start:stop] = skew.cpu().numpy()
            out["vocab_kurt"][start:stop] = kurt.cpu().numpy()
    return out


# --------------------------------------------------------------------------- per-neuron summary


def neuron_properties(
    model: nn.Module,
    layer: int,
    top: int = 10,
    w_u: torch.Tensor | None = None,
    fold_norm: bool = True,
    chunk: int = 256,
) -> dict[str, np.ndarray]:
    """Weight properties of every neuron of one layer, ``[d_mlp]`` float64 arrays:
    ``w_in_norm``, ``w_out_norm``, ``cos_in_out`` (0 where either norm is 0), plus
    :func:`vocab_composition` when the model has an unembedding.

    ``w_u``: a precomputed :func:`unembedding` (pass it when looping over layers; by default
    it is rebuilt, with ``fold_norm``, on each call).
    """
    w_in, w_out = neuron_weights(model, layer)
    a, b = w_in.to(torch.float64), w_out.to(torch.float64)
    in_norm = a.norm(dim=1)
    out_norm = b.norm(dim=1)
    denom = in_norm * out_norm
    ok = denom > 0
    cos = torch.where(ok, (a * b).sum(dim=1) / torch.where(ok, denom, 1.0), 0.0)
    props = {
        "w_in_norm": in_norm.cpu().numpy(),
        "w_out_norm": out_norm.cpu().numpy(),
        "cos_in_out": cos.cpu().numpy(),
    }
    if w_u is None:
        w_u = unembedding(model, fold_norm=fold_norm)
    if w_u is not None:
        props.update(vocab_composition(w_out, w_u, top=top, chunk=chunk))
    return props


def label_neurons(
    props: Mapping[str, np.ndarray],
    dead: np.ndarray | None = None,
    kurt_threshold: float = DEFAULT_KURT_THRESHOLD,
) -> dict[str, np.ndarray]:
    """Boolean ``[d_mlp]`` labels from :func:`neuron_properties` (and activation statistics).

    ``prediction``: ``vocab_kurt > kurt_threshold`` and ``vocab_skew > 0`` (a few tokens
    pushed far up); ``suppression``: the same kurtosis with ``vocab_skew < 0`` (a few tokens
    pushed far down); ``dead``: passed through from the activation statistics (all False when
    ``None``). Without vocabulary moments (encoders) prediction and suppression are all False.
    Why the default threshold: see :data:`DEFAULT_KURT_THRESHOLD`.
    """
    sizes = {np.shape(v)[0] for v in props.values() if np.ndim(v) >= 1}
    if dead is not None:
        sizes.add(np.shape(dead)[0] if np.ndim(dead) == 1 else -1)
    if len(sizes) != 1 or -1 in sizes:
        raise ConfigError(f"label_neurons: arrays disagree on d_mlp (sizes {sorted(sizes)})")
    (n,) = sizes
    if "vocab_kurt" in props and "vocab_skew" in props:
        kurt = np.asarray(props["vocab_kurt"], np.float64)
        skew = np.asarray(props["vocab_skew"], np.float64)
        heavy = kurt > kurt_threshold
        prediction, suppression = heavy & (skew > 0), heavy & (skew < 0)
    else:
        prediction = suppression = np.zeros(n, bool)
    return {
        "prediction": prediction,
        "suppression": suppression,
        "dead": np.zeros(n, bool) if dead is None else np.asarray(dead, bool).copy(),
    }


@torch.no_grad()
def direction_logit_lens(
    directions: torch.Tensor | np.ndarray, w_out: torch.Tensor, w_u: torch.Tensor, top: int = 10
) -> tuple[np.ndarray, np.ndarray]:
    """Tokens that feature directions in MLP-neuron space promote / suppress directly.

    ``directions [n, d_mlp]`` (SAE decoder rows, SNMF ``Zᵀ``) write ``directions @ W_out`` into
    the residual stream; their logits go through :func:`vocab_composition`, chunked, so
    12k-feature dictionaries against a 49k vocabulary stay within memory.
    """
    d = torch.as_tensor(directions).to(w_out.dtype)
    if d.dim() != 2 or d.shape[1] != w_out.shape[0]:
        raise ConfigError(
            f"directions {tuple(d.shape)} must be [n, d_mlp] with d_mlp = {w_out.shape[0]}"
        )
    comp = vocab_composition(d @ w_out, w_u, top=top)
    return comp["top_promoted"], comp["top_suppressed"]
