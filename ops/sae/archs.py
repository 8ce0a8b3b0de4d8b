"""SAE architectures: the :class:`SAE` base (encode, decode, loss, dead-latent counters,
init) and the registered kinds (``topk``, ``batchtopk``, ``relu``, ``jumprelu``). A new kind is a
subclass registered with :func:`register`."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ops.configs import ARCHITECTURES, SAEConfig
from ops.errors import ConfigError
from ops.sae.sparse import _dense_code, _row_code, sparse_decode

CHECKPOINT_FORMAT = 1
"""Bump when the checkpoint layout changes; older checkpoints are then refused, not misread."""

INIT_TOKENS = 16_384
"""Tokens :meth:`SAE.init_from` uses at most (scale and decoder-bias estimates)."""

_THRESHOLD_LR = 0.01  # BatchTopK inference threshold: EMA rate of the per-batch minimum (SAELens)
_EPS = 1e-12


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
