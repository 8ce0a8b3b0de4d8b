"""Sparse autoencoders (SAEs) over MLP activations: architectures, training, metrics.

An SAE writes an activation ``x [d_in]`` as a sparse, nonnegative code ``z [n_latents]`` over a
dictionary of unit-norm decoder rows: ``x ≈ z @ W_dec + b_dec``. Each latent is then mapped like
a neuron (statistics, top-k examples) by the flows.

Architectures live in a registry (:data:`ARCHITECTURES`, :func:`register`) and differ only in
the activation and the sparsity term of the loss:

- ``topk``: keep the k largest pre-activations per token (Gao et al. 2024), plus AuxK;
- ``batchtopk``: keep the ``B*k`` largest over the whole batch while training and a learned
  threshold at inference (Bussmann et al. 2024), plus AuxK;
- ``relu``: ReLU with an L1 penalty weighted by decoder-row norms;
- ``jumprelu``: per-latent thresholds trained through straight-through estimators with an L0
  penalty (Rajamanoharan et al. 2024).

Training needs no activation dump: :func:`train` consumes any iterable of batches, e.g. a
:class:`ShuffleBuffer` over activations streamed live from the model, or :func:`sample_batches`
over the stored activation sample. It checkpoints model, optimiser and dead-latent counters
together, and a resumed run equals an uninterrupted one on the same data order.

Losses are computed on inputs scaled to unit mean squared norm (``normalize_input``) so that
``l1_coef`` / ``jumprelu_l0_coef`` mean the same thing at every layer; :meth:`SAE.encode` takes
and :meth:`SAE.decode` returns activations in their original units.

TopK and BatchTopK train without a dense ``[B, n_latents]`` code: the selected latents are kept
as (row, latent, value) entries and decoded by :func:`sparse_decode`, which gathers their
decoder rows (forward), and in the backward pass takes the values' gradient as dot products
with the same rows and ``W_dec``'s as per-latent sums of gradient rows: ``O(B·k·d_in)`` instead
of ``O(B·n·d_in)``. AuxK decodes its dead latents the same way. On CUDA the forward runs under
bfloat16 autocast (``SAEConfig.autocast``) with float32 master weights.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ops.configs import ARCHITECTURES, SAEConfig
from ops.errors import ConfigError
from ops.interventions import mean_losses

__all__ = [
    "ARCHITECTURES",
    "BatchTopKSAE",
    "JumpReLUSAE",
    "ReLUSAE",
    "SAE",
    "SAEConfig",
    "ShuffleBuffer",
    "StreamBatches",
    "TopKSAE",
    "TrainState",
    "build_sae",
    "ce_loss_recovered",
    "geometric_median",
    "jumprelu",
    "load_checkpoint",
    "metrics",
    "register",
    "sample_batches",
    "save_checkpoint",
    "shuffled",
    "sparse_decode",
    "step_fn",
    "train",
]


CHECKPOINT_FORMAT = 1
"""Bump when the checkpoint layout changes; older checkpoints are then refused, not misread."""

INIT_TOKENS = 16_384
"""Tokens :meth:`SAE.init_from` uses at most (scale and decoder-bias estimates)."""

_THRESHOLD_LR = 0.01  # BatchTopK inference threshold: EMA rate of the per-batch minimum (SAELens)
_EPS = 1e-12
_GATHER_ELEMENTS = 1 << 26  # CUDA backward: gathered [entries, d] rows per chunk (256 MiB fp32)


def _reads_are_free(t: Tensor) -> bool:
    """Whether reading a value of ``t`` on the host costs nothing (it is on the CPU). On a
    GPU a read waits for everything queued before it; the training step avoids them."""
    return t.device.type == "cpu"


def register(name: str) -> Callable[[type[SAE]], type[SAE]]:
    """Class decorator: make an architecture available as ``SAEConfig(arch=name)``."""

    def deco(cls: type[SAE]) -> type[SAE]:
        ARCHITECTURES.register(name, cls)
        cls.arch = name
        return cls

    return deco


# --------------------------------------------------------------------------- sparse decoder


def _entry_rows(offsets: Tensor, nnz: int) -> Tensor:
    """Row of each of ``nnz`` entries stored row after row, ``offsets [B]`` their starts."""
    pos = torch.arange(nnz, device=offsets.device)
    return torch.searchsorted(offsets, pos, right=True) - 1


def _values_grad(grad: Tensor, weight: Tensor, rows: Tensor, idx: Tensor,
                 offsets: Tensor) -> Tensor:  # fmt: skip
    """``grad[rows[j]] · weight[idx[j]]`` for every entry ``j`` (a sampled ``grad @ weight.T``):
    :func:`_values_grad_csr` on CPU (float32/64), else :func:`_values_grad_gather`."""
    if grad.device.type == "cpu" and grad.dtype in (torch.float32, torch.float64):
        return _values_grad_csr(grad, weight, idx, offsets)
    return _values_grad_gather(grad, weight, rows, idx)


def _values_grad_csr(grad: Tensor, weight: Tensor, idx: Tensor, offsets: Tensor) -> Tensor:
    """``torch.sparse.sampled_addmm`` with the entries as a CSR pattern: one pass, no gathered
    rows (~4x faster than gathering on CPU). Needs each row's latents sorted and distinct."""
    nnz = idx.numel()
    crow = torch.cat([offsets, offsets.new_full((1,), nnz)])
    with warnings.catch_warnings():  # "sparse CSR tensor support is in beta state"
        warnings.simplefilter("ignore", UserWarning)
        pattern = torch.sparse_csr_tensor(crow, idx, grad.new_zeros(nnz),
                                          (grad.shape[0], weight.shape[0]))  # fmt: skip
        return torch.sparse.sampled_addmm(pattern, grad, weight.T, beta=0).values()


def _values_grad_gather(grad: Tensor, weight: Tensor, rows: Tensor, idx: Tensor) -> Tensor:
    """Dot products of the gathered rows, :data:`_GATHER_ELEMENTS` per chunk (CUDA)."""
    out = grad.new_empty(idx.numel())
    step = max(1, _GATHER_ELEMENTS // max(1, weight.shape[1]))
    for s in range(0, idx.numel(), step):
        e = slice(s, s + step)
        out[e] = torch.linalg.vecdot(grad.index_select(0, rows[e]), weight.index_select(0, idx[e]))
    return out


def _weight_grad(grad: Tensor, rows: Tensor, idx: Tensor, vals: Tensor, n: int) -> Tensor:
    """``∂/∂weight [n, d]``: row ``i`` is ``Σ vals[j]·grad[rows[j]]`` over the entries ``j`` of
    latent ``i``: the entries grouped by latent, then one ``embedding_bag`` over ``grad`` with a
    bag per latent. A segment sum in a fixed order: deterministic (no atomics, unlike
    ``index_add_`` on CUDA), no ``[entries, d]`` temporary, and ~4x faster than ``index_add_``
    on CPU."""
    order = torch.argsort(idx, stable=True)
    starts = torch.searchsorted(idx[order], torch.arange(n, device=idx.device))
    return F.embedding_bag(rows[order], grad, starts, mode="sum", per_sample_weights=vals[order])


class _SparseDecode(torch.autograd.Function):
    """``out[b] = Σ_j vals[j]·weight[idx[j]]`` over row ``b``'s entries (:func:`sparse_decode`)."""

    @staticmethod
    def forward(ctx: Any, idx: Tensor, vals: Tensor, offsets: Tensor, weight: Tensor) -> Tensor:
        with torch.autocast(weight.device.type, enabled=False):  # float32 with fp32 weights
            out = F.embedding_bag(idx, weight, offsets, mode="sum", per_sample_weights=vals)
        ctx.save_for_backward(idx, vals, offsets, weight)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor | None, None, Tensor | None]:
        idx, vals, offsets, weight = ctx.saved_tensors
        grad = grad.contiguous()
        rows = _entry_rows(offsets, idx.numel())
        g_vals = g_weight = None
        with torch.autocast(grad.device.type, enabled=False):
            if ctx.needs_input_grad[1]:
                g_vals = _values_grad(grad, weight, rows, idx, offsets)
            if ctx.needs_input_grad[3]:
                g_weight = _weight_grad(grad, rows, idx, vals, weight.shape[0])
        return None, g_vals, None, g_weight


def sparse_decode(idx: Tensor, vals: Tensor, offsets: Tensor, weight: Tensor) -> Tensor:
    """``z @ weight`` ``[B, d]`` for a sparse code given as entries, without forming ``z``.

    Entry ``j`` is ``z[row, idx[j]] = vals[j]``; entries are stored row after row, row ``b``'s
    starting at ``offsets[b]`` (``offsets [B]``, nondecreasing, ``offsets[0] == 0``; a row may
    have none), and within a row their latents are distinct and increasing. Differentiable in
    ``vals`` and ``weight`` (explicit backward, see :class:`_SparseDecode`); ``vals`` is cast
    to ``weight``'s dtype, so under autocast the decoder stays in the weights' precision.
    """
    return _SparseDecode.apply(idx, vals.to(weight.dtype), offsets, weight)


def _row_code(vals: Tensor, idx: Tensor) -> dict[str, Tensor]:
    """Entries of a code with the same number of latents in every row (``[B, m]`` from a
    ``topk``): latents sorted within each row, then flattened; with ``rows`` and ``offsets``."""
    b, m = idx.shape
    idx, order = idx.sort(-1)
    arange = torch.arange(b, device=idx.device)
    # each row index m times, as a broadcast: one copy, nothing to read back from a GPU
    return {"rows": arange[:, None].expand(b, m).reshape(-1), "idx": idx.flatten(),
            "vals": vals.gather(-1, order).flatten(), "offsets": arange * m}  # fmt: skip


def _dense_code(code: dict[str, Tensor], like: Tensor) -> Tensor:
    """The ``[B, n]`` code (zeros elsewhere) of the entries in ``code``; differentiable."""
    return torch.zeros_like(like).index_put((code["rows"], code["idx"]), code["vals"])


# --------------------------------------------------------------------------- model


class _Out(NamedTuple):
    """One training forward: total loss, detached scalar parts, code (``None`` when it is only
    sparse: the entries in ``aux``), latents that fired in the batch, and arch-specific
    extras."""

    loss: Tensor
    parts: dict[str, Tensor]
    z: Tensor | None
    fired: Tensor
    aux: dict[str, Tensor]


class SAE(nn.Module):
    """Base SAE: ``z = act((x·s - b_dec) @ W_enc + b_enc)``, ``x̂ = (z @ W_dec + b_dec) / s``.

    ``s`` is ``input_scale`` (1 unless ``normalize_input``). Subclasses define :meth:`activate`
    and :meth:`penalty`. Decoder rows are unit-norm (the sparsity then cannot be bought by
    shrinking ``z`` and growing ``W_dec``); ``W_enc`` starts as ``W_dec.T``, which leaves few
    latents dead at the start (Gao et al. 2024).
    """

    arch: ClassVar[str] = ""
    sparse_decoder: bool = True
    """TopK/BatchTopK/AuxK decode through :func:`sparse_decode`, and training forms no dense
    code; ``False`` (set on an instance) takes the dense ``z @ W_dec`` reference path instead,
    with the same loss and gradients (the tests compare the two)."""

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()
        if cfg.arch != self.arch:
            raise ConfigError(
                f"arch: config says {cfg.arch!r}, {type(self).__name__} is {self.arch!r}"
            )
        self.cfg = cfg
        gen = torch.Generator().manual_seed(cfg.seed)
        w = torch.randn(cfg.n_latents, cfg.d_in, generator=gen)
        w /= w.norm(dim=1, keepdim=True)
        self.W_enc = nn.Parameter(w.T.clone())  # [d_in, n]
        self.b_enc = nn.Parameter(torch.zeros(cfg.n_latents))
        self.W_dec = nn.Parameter(w)  # [n, d_in]
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))
        self.input_scale: Tensor
        self.initialized: Tensor
        self.register_buffer("input_scale", torch.tensor(1.0))
        self.register_buffer("initialized", torch.tensor(False))

    @classmethod
    def validate(cls, cfg: SAEConfig) -> None:
        """Architecture-specific config checks (called by ``SAEConfig.__post_init__``)."""

    # ---- pieces subclasses define

    def activate(self, pre: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Latent code ``[B, n]`` from pre-activations, plus extras for decode/penalty."""
        raise NotImplementedError

    def _code(self, pre: Tensor) -> tuple[Tensor | None, dict[str, Tensor]]:
        """The training forward's code: as :meth:`activate`, but ``z`` may be ``None`` when
        ``aux`` holds it as sparse entries (``idx``, ``vals``, ``offsets``, ``rows``)."""
        return self.activate(pre)

    def penalty(
        self, z: Tensor | None, aux: dict[str, Tensor], resid: Tensor, dead: Tensor | None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Sparsity / auxiliary loss added to the reconstruction MSE, and its named parts
        (``z`` is ``None`` when :meth:`_code` kept the code sparse)."""
        return resid.new_zeros(()), {}

    def on_step(self, out: _Out) -> None:
        """Update non-gradient state after an optimiser step (BatchTopK's threshold)."""

    # ---- shared

    def init_from(self, x: Tensor) -> None:
        """Set ``input_scale`` and ``b_dec`` from a sample of activations ``[T, d_in]``.

        At most :data:`INIT_TOKENS` evenly strided tokens are used: the estimates are then
        good to about 1% and a whole stored sample costs no float64 copy of itself.
        """
        if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] != self.cfg.d_in:
            raise ConfigError(f"x: need [T > 0, {self.cfg.d_in}], got shape {tuple(x.shape)}")
        with torch.no_grad():
            x = x[:: -(-x.shape[0] // INIT_TOKENS)].to(self.W_dec)
            if self.cfg.normalize_input:
                self.input_scale.fill_(x.pow(2).sum(-1).mean().clamp_min(_EPS).rsqrt())
            xs = x * self.input_scale
            if self.cfg.b_dec_init == "geometric_median":
                self.b_dec.copy_(geometric_median(xs))
            elif self.cfg.b_dec_init == "mean":
                self.b_dec.copy_(xs.mean(0))
            else:
                self.b_dec.zero_()
            self.initialized.fill_(True)

    def scale(self, x: Tensor) -> Tensor:
        """Activations in model units -> the units the SAE works in."""
        return x.to(self.W_enc) * self.input_scale

    def pre_acts(self, xs: Tensor) -> Tensor:
        return (xs - self.b_dec) @ self.W_enc + self.b_enc

    def encode(self, x: Tensor) -> Tensor:
        """Latent activations ``[B, n]`` (nonnegative) of activations ``x [B, d_in]``."""
        return self.activate(self.pre_acts(self.scale(x)))[0]

    def decode(self, z: Tensor) -> Tensor:
        """Reconstruction in model units from a latent code ``[B, n]``."""
        return (z @ self.W_dec + self.b_dec) / self.input_scale

    def _decode_scaled(self, z: Tensor | None, aux: dict[str, Tensor]) -> Tensor:
        if "idx" in aux and (z is None or self.sparse_decoder):
            dec = sparse_decode(aux["idx"], aux["vals"], aux["offsets"], self.W_dec)
            return dec + self.b_dec
        assert z is not None
        return z @ self.W_dec + self.b_dec

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """``(x_hat, z, aux)``; ``x_hat`` in model units."""
        z, aux = self.activate(self.pre_acts(self.scale(x)))
        return self._decode_scaled(z, aux) / self.input_scale, z, aux

    def _loss(self, xs: Tensor, dead: Tensor | None) -> _Out:
        z, aux = self._code(self.pre_acts(xs))
        resid = xs - self._decode_scaled(z, aux)
        recon = resid.pow(2).sum(-1).mean()
        extra, parts = self.penalty(z, aux, resid, dead)
        loss = recon + extra
        with torch.no_grad():
            if z is None:  # sparse entries; a selected latent may still be 0
                on = aux["vals"] != 0
                l0 = on.sum().float() / xs.shape[0]
                hits = torch.zeros(self.cfg.n_latents, dtype=torch.int64, device=xs.device)
                fired = hits.index_add_(0, aux["idx"], on.long()) > 0
            else:
                active = z != 0
                l0 = active.sum(-1).float().mean()
                fired = active.any(0)
            var = (xs - xs.mean(0)).pow(2).sum().clamp_min(_EPS)
            parts = {
                "loss": loss.detach(),
                "recon": recon.detach(),
                "l0": l0,
                "fvu": resid.pow(2).sum() / var,
                **parts,
            }
        return _Out(loss, parts, z, fired, aux)

    def loss(self, x: Tensor, dead: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Training loss on a batch in model units and its parts (detached 0-d tensors).

        ``recon`` is ``||x - x̂||²`` per token (summed over ``d_in``, mean over tokens) in scaled
        units; ``dead`` is a bool ``[n]`` mask of dead latents (for AuxK).
        """
        out = self._loss(self.scale(x), dead)
        return out.loss, out.parts

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale decoder rows to unit norm (after each optimiser step)."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(_EPS))

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Drop the part of ``W_dec.grad`` along each row (before each step): with rows
        renormalised afterwards it only changes the norm, and Adam would waste its step size
        on it (sparsify, Gemma Scope)."""
        g = self.W_dec.grad
        if g is not None:
            g.sub_((g * self.W_dec).sum(1, keepdim=True) * self.W_dec)

    def _auxk(self, pre: Tensor, resid: Tensor, dead: Tensor | None) -> Tensor:
        """AuxK (Gao et al. 2024): the top-``auxk`` dead latents model the residual, so that
        dead latents get gradient again. Scaled by ``min(n_dead / auxk, 1)`` (sparsify).

        On the CPU the number of dead latents is read, and the work skipped when there are
        none. On a GPU reading it would make the host wait for the device every step, so
        the top ``min(auxk, n_latents)`` of the masked pre-activations are taken whatever
        the count: slots beyond the dead latents hold ``-inf``, are zeroed, and add exactly
        nothing (and the scale is 0 when none is dead). Both give the same bits
        (``tests/ops/test_sae.py``)."""
        cfg = self.cfg
        if dead is None or cfg.auxk_coef == 0 or cfg.auxk == 0:
            return pre.new_zeros(())
        weight: float | Tensor
        if _reads_are_free(dead):
            n_dead = int(dead.sum())
            if n_dead == 0:
                return pre.new_zeros(())
            vals, idx = pre.masked_fill(~dead, -math.inf).topk(min(cfg.auxk, n_dead), sorted=False)
            weight = min(n_dead / cfg.auxk, 1.0)
        else:
            k = min(cfg.auxk, cfg.n_latents)
            vals, idx = pre.masked_fill(~dead, -math.inf).topk(k, sorted=False)
            vals = vals.masked_fill(vals == -math.inf, 0.0)
            # min(n_dead / auxk, 1.0) as the host computes it: float64, then float32 in the mul
            weight = (dead.sum().double() / cfg.auxk).clamp_max(1.0).float()
        if self.sparse_decoder:
            code = _row_code(vals, idx)
            e_hat = sparse_decode(code["idx"], code["vals"], code["offsets"], self.W_dec)
        else:
            e_hat = torch.zeros_like(pre).scatter(-1, idx, vals) @ self.W_dec
        return weight * (resid.detach() - e_hat).pow(2).sum(-1).mean()


def build_sae(cfg: SAEConfig) -> SAE:
    """The registered architecture for ``cfg.arch``, freshly initialised."""
    return ARCHITECTURES[cfg.arch](cfg)


@register("topk")
class TopKSAE(SAE):
    """Exactly k latents per token (fewer only if fewer are positive): L0 is set, not tuned,
    and there is no shrinkage from an L1 penalty. Decoding is a gather of k rows per token
    (:func:`sparse_decode`); training never forms the dense code."""

    @classmethod
    def validate(cls, cfg: SAEConfig) -> None:
        if cfg.k > cfg.n_latents:
            raise ConfigError(f"k: must be <= n_latents ({cfg.n_latents}), got {cfg.k}")

    def _select(self, pre: Tensor) -> dict[str, Tensor]:
        """Sparse entries of the code of rectified pre-activations ``pre [B, n]``."""
        return _row_code(*pre.topk(self.cfg.k, dim=-1, sorted=False))

    def _code(self, pre: Tensor) -> tuple[Tensor | None, dict[str, Tensor]]:
        pre = F.relu(pre)
        aux = {"pre": pre, **self._select(pre)}
        return (None if self.sparse_decoder else _dense_code(aux, pre)), aux

    def activate(self, pre: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        z, aux = self._code(pre)
        return (_dense_code(aux, aux["pre"]) if z is None else z), aux

    def penalty(
        self, z: Tensor | None, aux: dict[str, Tensor], resid: Tensor, dead: Tensor | None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        auxk = self._auxk(aux["pre"], resid, dead)
        return self.cfg.auxk_coef * auxk, {"auxk": auxk.detach()}


@register("batchtopk")
class BatchTopKSAE(TopKSAE):
    """Top ``B*k`` activations over the whole batch while training, so that hard tokens can use
    more latents than easy ones; at inference (``eval()``) a per-token rule ``z > threshold``
    with the threshold estimated in training (EMA of the smallest kept activation).

    ``threshold`` is negative until training has set it; an untrained model in eval mode then
    falls back to the batch rule.
    """

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        self.threshold: Tensor
        self.register_buffer("threshold", torch.tensor(-1.0))

    def _code(self, pre: Tensor) -> tuple[Tensor | None, dict[str, Tensor]]:
        if not self.training and self.threshold >= 0:
            pre = F.relu(pre)
            return pre * (pre > self.threshold), {"pre": pre}
        return super()._code(pre)

    def _select(self, pre: Tensor) -> dict[str, Tensor]:
        """The batch's top ``B*k`` as entries: a variable number per row (possibly none)."""
        b, n = pre.shape
        flat = pre.flatten()
        vals, pos = flat.topk(min(b * self.cfg.k, flat.numel()), sorted=False)
        pos, order = pos.sort()  # row-major: rows contiguous, latents increasing within each
        rows = torch.div(pos, n, rounding_mode="floor")
        return {"rows": rows, "idx": pos - rows * n, "vals": vals[order],
                "offsets": torch.searchsorted(rows, torch.arange(b, device=pre.device))}  # fmt: skip

    @torch.no_grad()
    def on_step(self, out: _Out) -> None:
        """The threshold follows the smallest positive kept activation: set by the first
        batch that has one, then an EMA. All on the device, with no branch on its values
        (each would make the host wait for the device every step): a batch with nothing
        positive leaves it as it was."""
        vals = out.aux.get("vals")
        if vals is None:
            return
        pos = vals > 0
        smallest = torch.where(pos, vals, math.inf).min().to(self.threshold.dtype)
        new = torch.where(self.threshold < 0, smallest,
                          torch.lerp(self.threshold, smallest, _THRESHOLD_LR))  # fmt: skip
        self.threshold.copy_(torch.where(pos.any(), new, self.threshold))


@register("relu")
class ReLUSAE(SAE):
    """The original ReLU SAE with an L1 penalty; the L1 is weighted by decoder-row norms
    (Anthropic, 2024) so that the penalty cannot be dodged between renormalisations."""

    def activate(self, pre: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        return F.relu(pre), {}

    def penalty(
        self, z: Tensor, aux: dict[str, Tensor], resid: Tensor, dead: Tensor | None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        l1 = (z * self.W_dec.norm(dim=1)).sum(-1).mean()
        return self.cfg.l1_coef * l1, {"l1": l1.detach()}


def _rectangle(u: Tensor) -> Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    """``x·H(x - θ)``; ∂/∂x = H(x - θ), ∂/∂θ = -(θ/ε)·K((x - θ)/ε) (Rajamanoharan et al. 2024)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, theta: Tensor, eps: float) -> Tensor:
        ctx.save_for_backward(x, theta)
        ctx.eps = eps
        return x * (x > theta).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        x, theta = ctx.saved_tensors
        gx = grad * (x > theta).to(x.dtype)
        gt = -(theta / ctx.eps) * _rectangle((x - theta) / ctx.eps) * grad
        return gx, gt.reshape(-1, theta.numel()).sum(0).view_as(theta), None


class _Step(torch.autograd.Function):
    """``H(x - θ)``; ∂/∂x = 0, ∂/∂θ = -(1/ε)·K((x - θ)/ε)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, theta: Tensor, eps: float) -> Tensor:
        ctx.save_for_backward(x, theta)
        ctx.eps = eps
        return (x > theta).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        x, theta = ctx.saved_tensors
        gt = -(1.0 / ctx.eps) * _rectangle((x - theta) / ctx.eps) * grad
        return torch.zeros_like(x), gt.reshape(-1, theta.numel()).sum(0).view_as(theta), None


def jumprelu(x: Tensor, theta: Tensor, eps: float) -> Tensor:
    """JumpReLU with the rectangle-kernel pseudo-gradient for ``theta`` (per latent)."""
    return _JumpReLU.apply(x, theta, eps)


def step_fn(x: Tensor, theta: Tensor, eps: float) -> Tensor:
    """Heaviside ``H(x - theta)`` whose pseudo-gradient trains ``theta`` towards an L0 target."""
    return _Step.apply(x, theta, eps)


@register("jumprelu")
class JumpReLUSAE(SAE):
    """Per-latent thresholds θ (stored as ``log_threshold``): a latent is off below θ and
    unshrunk above it; the L0 penalty and θ are trained with straight-through estimators."""

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        self.log_threshold = nn.Parameter(
            torch.full((cfg.n_latents,), math.log(cfg.jumprelu_threshold_init))
        )

    @property
    def threshold(self) -> Tensor:
        return self.log_threshold.exp()

    def activate(self, pre: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        pre = F.relu(pre)
        return jumprelu(pre, self.threshold, self.cfg.jumprelu_bandwidth), {"pre": pre}

    def penalty(
        self, z: Tensor, aux: dict[str, Tensor], resid: Tensor, dead: Tensor | None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        l0 = step_fn(aux["pre"], self.threshold, self.cfg.jumprelu_bandwidth).sum(-1).mean()
        return self.cfg.jumprelu_l0_coef * l0, {"l0_penalty": l0.detach()}


# --------------------------------------------------------------------------- init


def geometric_median(x: Tensor, iters: int = 100, tol: float = 1e-6) -> Tensor:
    """Point minimising the summed Euclidean distance to the rows of ``x`` (Weiszfeld).

    Used for ``b_dec``: unlike the mean it is not dragged by a few huge-norm tokens. Iterates in
    float64 from the mean; stops when a step moves less than ``tol`` x the mean distance.
    """
    if x.ndim != 2 or x.shape[0] == 0:
        raise ConfigError(f"x: need a non-empty [T, d] tensor, got shape {tuple(x.shape)}")
    pts = x.detach().to(torch.float64)
    y = pts.mean(0)
    for _ in range(iters):
        dist = (pts - y).norm(dim=1)
        w = 1.0 / dist.clamp_min(1e-12)
        y_new = (w[:, None] * pts).sum(0) / w.sum()
        moved = float((y_new - y).norm())
        y = y_new
        if moved <= tol * float(dist.mean()):
            break
    return y.to(x.dtype)


# --------------------------------------------------------------------------- data


class ShuffleBuffer:
    """Mixes tokens across chunks (documents, sequences, shards) before they form batches.

    Consecutive tokens of one document are strongly correlated; training on them in order
    biases the SAE towards whatever the current document is about. Chunks are added with
    :meth:`add`; once ``capacity`` tokens are held, :meth:`batches` shuffles them all and
    returns batches until only ``capacity // 2`` remain, so a token can stay for several
    rounds and meet tokens from later chunks. Every token added comes out exactly once (the
    last batch of ``batches(final=True)`` may be short). Seeded, so the order is reproducible.
    """

    def __init__(self, capacity: int, batch_size: int, seed: int = 0) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size: must be >= 1, got {batch_size}")
        if capacity < 2 * batch_size:
            raise ConfigError(
                f"capacity: must be >= 2 * batch_size ({2 * batch_size}), got {capacity}"
            )
        self.capacity = capacity
        self.batch_size = batch_size
        self._gen = torch.Generator().manual_seed(seed)
        self._chunks: list[Tensor] = []
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def add(self, chunk: Tensor) -> None:
        """Hold the tokens of ``chunk [T, d]`` (kept on its device)."""
        if chunk.ndim != 2:
            raise ConfigError(f"chunk: need [T, d], got shape {tuple(chunk.shape)}")
        if self._chunks and chunk.shape[1] != self._chunks[0].shape[1]:
            raise ConfigError(f"chunk: width {chunk.shape[1]} != {self._chunks[0].shape[1]}")
        if chunk.shape[0]:
            self._chunks.append(chunk)
            self._n += chunk.shape[0]

    def state_dict(self) -> dict[str, Any]:
        """Held tokens and the generator state: a restored buffer continues identically."""
        data = torch.cat(self._chunks) if len(self._chunks) > 1 else (
            self._chunks[0] if self._chunks else None)  # fmt: skip
        return {"data": None if data is None else data.cpu(), "gen": self._gen.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        data = state["data"]
        self._chunks = [] if data is None or not len(data) else [data]
        self._n = 0 if data is None else int(data.shape[0])
        self._gen.set_state(state["gen"])

    def batches(self, final: bool = False) -> list[Tensor]:
        """Batches ready now (none until ``capacity`` tokens are held); ``final`` empties it."""
        if self._n == 0 or (self._n < self.capacity and not final):
            return []
        data = torch.cat(self._chunks) if len(self._chunks) > 1 else self._chunks[0]
        data = data[torch.randperm(self._n, generator=self._gen).to(data.device)]
        n_out = (
            self._n
            if final
            else (self._n - self.capacity // 2) // self.batch_size * self.batch_size
        )
        out = [data[i : min(i + self.batch_size, n_out)] for i in range(0, n_out, self.batch_size)]
        self._chunks = [data[n_out:]] if n_out < self._n else []
        self._n -= n_out
        return out


def shuffled(
    chunks: Iterable[Tensor], capacity: int, batch_size: int, seed: int = 0
) -> Iterator[Tensor]:
    """Batches from a stream of chunks (e.g. live activations) through a :class:`ShuffleBuffer`."""
    buf = ShuffleBuffer(capacity, batch_size, seed)
    for chunk in chunks:
        buf.add(chunk)
        yield from buf.batches()
    yield from buf.batches(final=True)


class StreamBatches:
    """Shuffled batches from an ordered stream of chunks, resumable at any step.

    ``chunks(start)`` yields chunk ``start``, ``start + 1``, ... (e.g. the activations of
    corpus shards recorded live by workers, in shard order). Passed to :func:`train`, the
    checkpoint stores the shuffle buffer and the index of the next chunk, so a resumed run
    asks for the stream from there (nothing is recomputed) and sees exactly the batches an
    uninterrupted run would. The buffer is held in the chunks' dtype (float16 halves it).
    """

    def __init__(self, chunks: Callable[[int], Iterable[Tensor]], capacity: int,
                 batch_size: int, seed: int = 0) -> None:  # fmt: skip
        self.chunks = chunks
        self.buffer = ShuffleBuffer(capacity, batch_size, seed)
        self.next_chunk = 0
        self.ready: list[Tensor] = []

    def __iter__(self) -> Iterator[Tensor]:
        source = iter(self.chunks(self.next_chunk))
        while True:
            while self.ready:
                yield self.ready.pop(0)  # popped first: state is consistent while suspended
            chunk = next(source, None)
            if chunk is None:
                self.ready = self.buffer.batches(final=True)
                if not self.ready:
                    return
                continue
            self.buffer.add(chunk)
            self.next_chunk += 1
            self.ready = self.buffer.batches()

    def state_dict(self) -> dict[str, Any]:
        return {"next_chunk": self.next_chunk, "ready": [b.cpu() for b in self.ready],
                "buffer": self.buffer.state_dict()}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.next_chunk = int(state["next_chunk"])
        self.ready = list(state["ready"])
        self.buffer.load_state_dict(state["buffer"])


def sample_batches(
    sample: Tensor | np.ndarray, batch_size: int, seed: int = 0, start_step: int = 0
) -> Iterator[Tensor]:
    """Endless float32 batches from a stored activation sample ``[T, d]``, a fresh permutation
    per epoch (the partial last batch is dropped). Batch ``s`` depends only on ``(seed, s)``, so
    a resumed run starts at ``start_step`` without replaying the ones before."""
    n = sample.shape[0]
    per_epoch = n // batch_size
    if per_epoch == 0:
        raise ConfigError(f"sample: {n} tokens is less than one batch of {batch_size}")
    step = start_step
    while True:
        epoch, i = divmod(step, per_epoch)
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        for j in range(i, per_epoch):
            idx = perm[j * batch_size : (j + 1) * batch_size]
            batch = sample[torch.from_numpy(idx)] if isinstance(sample, Tensor) else sample[idx]
            yield torch.as_tensor(batch).to(torch.float32)
        step = (epoch + 1) * per_epoch


# --------------------------------------------------------------------------- training


@dataclass
class TrainState:
    """Where training stands; saved with the model so that a run can resume exactly."""

    last_fired: Tensor
    """int64 ``[n_latents]``: training tokens since each latent last fired."""
    step: int = 0
    """Optimiser steps taken."""
    tokens_seen: int = 0
    optimizer: dict[str, Any] = field(default_factory=dict)
    """Adam's ``state_dict()``."""
    history: list[dict[str, float]] = field(default_factory=list)
    """Metrics logged during training (each with its ``step``)."""

    def dead_mask(self, dead_after_tokens: int) -> Tensor:
        return self.last_fired >= dead_after_tokens


def save_checkpoint(
    path: str | Path, sae: SAE, state: TrainState, data: dict[str, Any] | None = None
) -> None:
    """Write model, config, training state and the data stream's state (``data``, from a
    :class:`StreamBatches`) atomically: a crash leaves the old file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "cfg": sae.cfg.to_dict(),
        "model": sae.state_dict(),
        "step": state.step,
        "tokens_seen": state.tokens_seen,
        "last_fired": state.last_fired.cpu(),
        "optimizer": state.optimizer,
        "history": state.history,
        "data": data,
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def _read_checkpoint(path: Path) -> dict[str, Any]:
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if payload.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"checkpoint: {path} has format {payload.get('format')!r}, "
                         f"expected {CHECKPOINT_FORMAT}")  # fmt: skip
    return payload


def _state_from(payload: dict[str, Any], device: torch.device) -> TrainState:
    return TrainState(
        last_fired=payload["last_fired"].to(device),
        step=int(payload["step"]),
        tokens_seen=int(payload["tokens_seen"]),
        optimizer=payload["optimizer"],
        history=list(payload["history"]),
    )


def from_weights(weights: dict[str, Any], config: dict[str, Any]) -> SAE:
    """An SAE in eval mode from stored weights (numpy or tensors) and its config dict."""
    sae = build_sae(SAEConfig.from_dict(config))
    sae.load_state_dict({k: torch.as_tensor(np.array(v)) for k, v in weights.items()})
    return sae.eval()


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[SAE, TrainState]:
    """The SAE (in eval mode) and training state saved at ``path``."""
    payload = _read_checkpoint(Path(path))
    sae = build_sae(SAEConfig.from_dict(payload["cfg"])).to(device)
    sae.load_state_dict(payload["model"])
    return sae.eval(), _state_from(payload, torch.device(device))


Batches = Iterable[Tensor] | Callable[[int], Iterable[Tensor]] | StreamBatches


def train(
    sae: SAE,
    batches: Batches,
    *,
    steps: int | None = None,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 1000,
    log_every: int = 100,
    on_metrics: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainState:
    """Train ``sae`` with Adam (``sae.cfg``) until ``steps`` total steps or the data ends.

    ``batches`` is an iterable of ``[B, d_in]`` activation batches, or a function ``start_step ->
    iterable`` (such as ``lambda s: sample_batches(x, bs, seed, s)``), or a
    :class:`StreamBatches`. If ``checkpoint`` exists, model, optimiser and state are loaded from
    it and training continues at its step: a function is asked for batches from there, a
    :class:`StreamBatches` restores its saved buffer and stream position, and an iterable has its
    first ``step`` batches skipped. With the
    same data order the result equals an uninterrupted run. The checkpoint is written every
    ``checkpoint_every`` steps and at the end. Every ``log_every`` steps the batch metrics
    (loss parts, ``l0``, ``fvu``, ``dead_fraction``, ``tokens_seen``) go to
    ``state.history`` and ``on_metrics(step, metrics)``. The first batch initialises
    ``input_scale`` and ``b_dec`` unless the model already is (:meth:`SAE.init_from`). On CUDA
    with ``cfg.autocast`` the forward runs under bfloat16 autocast; parameters, gradients and
    Adam stay float32.
    """
    if checkpoint_every < 1 or log_every < 0:
        raise ConfigError(f"checkpoint_every/log_every: got {checkpoint_every}, {log_every}")
    cfg = sae.cfg
    device = sae.W_dec.device
    # fused: one kernel over all parameters, ~2x faster than the per-tensor loop on CPU
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr, fused=device.type in ("cpu", "cuda"))
    state = TrainState(last_fired=torch.zeros(cfg.n_latents, dtype=torch.int64, device=device))
    path = Path(checkpoint) if checkpoint is not None else None
    if path is not None and path.exists():
        payload = _read_checkpoint(path)
        saved = SAEConfig.from_dict(payload["cfg"]).to_dict()  # fields added since: defaults
        if saved != cfg.to_dict():
            diff = sorted(k for k, v in cfg.to_dict().items() if saved.get(k) != v)
            raise ConfigError(f"checkpoint: {path} was trained with different {diff}")
        sae.load_state_dict(payload["model"])
        state = _state_from(payload, device)
        if state.optimizer:
            opt.load_state_dict(state.optimizer)
        if isinstance(batches, StreamBatches) and state.step:
            if payload.get("data") is None:
                raise ConfigError(f"checkpoint: {path} has no stream state to resume from")
            batches.load_state_dict(payload["data"])
    saved_at = state.step
    if steps is not None and state.step >= steps:
        state.optimizer = opt.state_dict()
        return state

    if isinstance(batches, StreamBatches):
        it: Iterable[Tensor] = batches
    elif callable(batches):
        it = batches(state.step)
    else:
        it = islice(batches, state.step, None)

    def data_state() -> dict[str, Any] | None:
        return batches.state_dict() if isinstance(batches, StreamBatches) else None

    def amp() -> Any:
        if device.type == "cuda" and cfg.autocast:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    sae.train()
    # read once, not every step: on a GPU each read makes the host wait for the device
    initialized = bool(sae.initialized)
    for x in tqdm(it, desc="train SAE", unit="batch", initial=state.step, disable=None):
        x = x.to(device=device, dtype=sae.W_dec.dtype, non_blocking=True)
        if not initialized:
            sae.init_from(x)
            initialized = True
        with amp():
            out = sae._loss(sae.scale(x), state.dead_mask(cfg.dead_after_tokens))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        sae.remove_parallel_grad()
        opt.step()
        sae.normalize_decoder()
        sae.on_step(out)
        with torch.no_grad():
            state.last_fired.add_(x.shape[0]).masked_fill_(out.fired, 0)
        state.step += 1
        state.tokens_seen += x.shape[0]
        if log_every and state.step % log_every == 0:
            parts = dict(out.parts)
            parts["dead_fraction"] = state.dead_mask(cfg.dead_after_tokens).float().mean()
            values = torch.stack([v.float() for v in parts.values()]).tolist()
            m = {"step": float(state.step), "tokens_seen": float(state.tokens_seen)}
            m.update(zip(parts, values, strict=True))
            state.history.append(m)
            if on_metrics is not None:
                on_metrics(state.step, m)
        if path is not None and state.step % checkpoint_every == 0:
            state.optimizer = opt.state_dict()
            save_checkpoint(path, sae, state, data_state())
            saved_at = state.step
        if steps is not None and state.step >= steps:
            break
    state.optimizer = opt.state_dict()
    if path is not None and saved_at != state.step:
        save_checkpoint(path, sae, state, data_state())
    sae.eval()
    return state


# --------------------------------------------------------------------------- metrics


@torch.no_grad()
def metrics(
    sae: SAE,
    x: Tensor,
    fired: TrainState | Tensor | None = None,
    batch_size: int = 4096,
) -> dict[str, float]:
    """Quality of ``sae`` on activations ``x [T, d_in]`` (model units, inference mode).

    ``l0``: mean active latents per token; ``fvu``: ``Σ||x - x̂||² / Σ||x - mean(x)||²`` over
    all tokens; ``mse``: mean squared error per element; ``dead_fraction``: from a
    :class:`TrainState` (not fired within ``dead_after_tokens``), from firing counts ``[n]``
    (zero), or else latents that never fire on ``x``. Float64 sums, ``batch_size`` tokens at a
    time, so ``x`` can be the whole stored sample.
    """
    was_training = sae.training
    sae.eval()
    try:
        n_tok, d = x.shape
        if n_tok == 0:
            raise ConfigError("x: no tokens")
        mean = x.to(torch.float64).mean(0)
        sq_err = total = 0.0
        l0 = 0
        counts = torch.zeros(sae.cfg.n_latents, dtype=torch.int64, device=sae.W_dec.device)
        for i in range(0, n_tok, batch_size):
            xb = x[i : i + batch_size].to(sae.W_dec.device)
            z = sae.encode(xb)
            x_hat = sae.decode(z)
            xb64 = xb.to(torch.float64)
            sq_err += float((xb64 - x_hat.to(torch.float64)).pow(2).sum())
            total += float((xb64 - mean.to(xb.device)).pow(2).sum())
            active = z != 0
            l0 += int(active.sum())
            counts += active.sum(0)
    finally:
        sae.train(was_training)
    if isinstance(fired, TrainState):
        dead = fired.dead_mask(sae.cfg.dead_after_tokens)
    elif fired is not None:
        dead = fired == 0
    else:
        dead = counts == 0
    return {
        "l0": l0 / n_tok,
        "fvu": sq_err / total if total > 0 else float("nan"),
        "mse": sq_err / (n_tok * d),
        "dead_fraction": float(dead.float().mean()),
    }


def ce_loss_recovered(clean_loss: float, sae_loss: float, zero_loss: float) -> float:
    """Share of the CE-loss gap closed by splicing in the SAE: ``(zero - sae) / (zero - clean)``.

    1 = as good as the clean model, 0 = as bad as zero-ablating the site. NaN when ablation
    does not change the loss (the ratio is undefined). :func:`ce_losses` measures the three.
    """
    gap = zero_loss - clean_loss
    return (zero_loss - sae_loss) / gap if gap != 0 else float("nan")


def splice(sae: SAE) -> Callable[[Tensor], Tensor]:
    """The replacement that puts ``sae``'s reconstruction in place of an activation."""

    def fn(act: Tensor) -> Tensor:
        return sae(act.float().reshape(-1, act.shape[-1]))[0].reshape(act.shape)

    return fn


def ce_losses(loaded: Any, layer: int, sae: SAE, batches: list) -> dict[str, float]:
    """Clean, zero-ablated and SAE-spliced next-token loss at ``layer`` over ``batches``
    (``(ids, attention, recorded mask)``), and the share of the gap recovered."""
    loss = mean_losses(loaded, layer, batches,
                       {"clean": None, "zero": torch.zeros_like, "sae": splice(sae)})  # fmt: skip
    return loss | {"recovered": ce_loss_recovered(loss["clean"], loss["sae"], loss["zero"])}


def thin(rows: list, most: int) -> list:
    """At most ``most`` evenly spaced rows, first and last included (training curves)."""
    if len(rows) <= most:
        return rows
    idx = np.unique(np.linspace(0, len(rows) - 1, most).round().astype(int))
    return [rows[i] for i in idx]
