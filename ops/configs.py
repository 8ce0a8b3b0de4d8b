"""The configs of ``ops`` computations, and the SAE architecture registry, without torch.

Job files are validated against these (``flows.config`` composes them) before anything
heavy is imported: loading torch alone takes seconds, and a typo in a job must fail at
once. Every knob has its default here, once.

:data:`ARCHITECTURES` is the one SAE registry: name -> class. A class is imported the first
time it is looked up (the entry names the module whose ``@register`` decorators fill it in),
so names can be checked without importing torch.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import numpy as np

from ops.errors import ConfigError

__all__ = ["ARCHITECTURES", "Registry", "SAEConfig", "SNMFConfig", "SteeringSearch"]


class Registry(Mapping[str, Any]):
    """Name -> class; an entry may be the name of the module that registers the class on
    import (``register``), and is resolved on first lookup."""

    def __init__(self, kind: str, lazy: Mapping[str, Any], field: str | None = None):
        self.kind = kind
        self.field = field  # the config field that names an entry (errors say it)
        self._items: dict[str, Any] = dict(lazy)

    def register(self, name: str, obj: Any) -> None:
        current = self._items.get(name)
        if current is not None and not isinstance(current, str) and current is not obj:
            where = f"{self.field}: " if self.field else ""
            raise ConfigError(f"{where}{self.kind} {name!r} is already registered to {current}")
        self._items[name] = obj

    def unregister(self, name: str) -> None:
        """Forget ``name`` (a test's temporary entry)."""
        self._items.pop(name, None)

    def __getitem__(self, name: str) -> Any:
        v = self._items[name]
        if isinstance(v, str):
            importlib.import_module(v)
            v = self._items[name]
            if isinstance(v, str):
                raise ConfigError(f"{self.kind} {name!r}: module {v} did not register it")
        return v

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items


ARCHITECTURES = Registry("SAE architecture", field="arch", lazy={n: "ops.sae" for n in
                                             ("topk", "batchtopk", "relu", "jumprelu")})  # fmt: skip
"""Registered SAE classes by ``SAEConfig.arch`` name (built-ins live in ``ops.sae``)."""

BDecInit = Literal["geometric_median", "mean", "zeros"]


# --------------------------------------------------------------------------- SAE


@dataclass(frozen=True, kw_only=True)
class SAEConfig:
    """Everything that decides an SAE and its training; validated on construction."""

    arch: str = "topk"
    """Architecture, a key of :data:`ARCHITECTURES`."""
    d_in: int
    """Width of the activations (the layer's ``d_mlp``)."""
    n_latents: int
    """Dictionary size; 8-32x ``d_in`` is usual."""
    k: int = 32
    """Active latents per token (``topk``), or per token on average over a batch (``batchtopk``)."""
    l1_coef: float = 1e-3
    """``relu``: weight of ``Σ |z_i| ||W_dec[i]||`` (per token, on unit-mean-square inputs)."""
    jumprelu_threshold_init: float = 1e-3
    """``jumprelu``: initial threshold of every latent."""
    jumprelu_bandwidth: float = 1e-3
    """``jumprelu``: width ε of the rectangle kernel in the threshold's pseudo-gradient."""
    jumprelu_l0_coef: float = 1e-3
    """``jumprelu``: weight of the L0 penalty (active latents per token)."""
    lr: float = 1e-3
    """Adam learning rate."""
    batch_size: int = 1024
    """Tokens per optimiser step, for the batch producers (:func:`sample_batches`, buffers)."""
    auxk: int = 256
    """``topk``/``batchtopk``: dead latents per token that AuxK uses to model the residual."""
    auxk_coef: float = 1 / 32
    """Weight of the AuxK loss; 0 turns it off."""
    dead_after_tokens: int = 10_000_000
    """A latent is dead once it has not fired for this many training tokens."""
    b_dec_init: BDecInit = "geometric_median"
    """Decoder bias from the first batch: its geometric median (robust to outlier tokens such
    as BOS-like massive activations), its mean, or zeros."""
    normalize_input: bool = True
    """Scale inputs to unit mean squared norm (scale from the first batch, stored in the
    model), so that loss coefficients and learning rate transfer across layers and models."""
    seed: int = 0
    """Seed of the weight initialisation (nothing else is random in training)."""
    autocast: bool = True
    """Train on CUDA under ``torch.autocast(bfloat16)``: the encoder GEMMs, most of a step, then
    run at bf16 tensor-core speed, while parameters, Adam state, the sparse decoder and the loss
    stay float32 (fp32 master weights). No effect on CPU, which trains in float32."""

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ConfigError(
                f"arch: unknown architecture {self.arch!r}; registered: {sorted(ARCHITECTURES)}"
            )
        for name in ("d_in", "n_latents", "k", "batch_size", "dead_after_tokens"):
            _check_int(self, name, minimum=1)
        for name in ("auxk", "seed"):
            _check_int(self, name, minimum=0)
        for name in ("lr", "jumprelu_threshold_init", "jumprelu_bandwidth"):
            _check_float(self, name, positive=True)
        for name in ("l1_coef", "jumprelu_l0_coef", "auxk_coef"):
            _check_float(self, name, positive=False)
        if self.b_dec_init not in ("geometric_median", "mean", "zeros"):
            raise ConfigError(
                "b_dec_init: must be 'geometric_median', 'mean' or 'zeros', "
                f"got {self.b_dec_init!r}"
            )
        for name in ("normalize_input", "autocast"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}: must be a bool, got {getattr(self, name)!r}")
        ARCHITECTURES[self.arch].validate(self)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON- and ``torch.load(weights_only=True)``-safe) for attrs/checkpoints."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SAEConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error rather than silently dropped."""
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ConfigError(f"SAEConfig: unknown fields {sorted(unknown)}")
        return cls(**d)


def _check_int(cfg: SAEConfig, name: str, minimum: int) -> None:
    v = getattr(cfg, name)
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ConfigError(f"{name}: must be an integer >= {minimum}, got {v!r}")


def _check_float(cfg: SAEConfig, name: str, positive: bool) -> None:
    v = getattr(cfg, name)
    ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    if not ok or (v <= 0 if positive else v < 0):
        raise ConfigError(
            f"{name}: must be a finite number {'> 0' if positive else '>= 0'}, got {v!r}"
        )


# --------------------------------------------------------------------------- SNMF


@dataclass(frozen=True)
class SNMFConfig:
    """Hyper-parameters of one factorisation; validated on construction."""

    #: Number of features (columns of ``Z``, rows of ``Y``).
    k: int
    #: Fraction of neurons kept per feature by hard top-|z| sparsification (at least one);
    #: 0.01 as in the paper, i.e. a feature is ~1% of the layer's neurons.
    keep_fraction: float = 0.01
    #: Maximum number of iterations (one Z step and one Y step each).
    iters: int = 200
    #: Stop after this many iterations without progress (the factors of the best loss are
    #: returned either way: sparsification makes the loss go up and down).
    patience: int = 20
    #: Progress = a loss more than ``tol`` (relative) below the loss at the last progress, so
    #: a slow steady descent still counts once its gains add up to ``tol``.
    tol: float = 1e-4
    #: Initialisation: "svd" (top singular vectors of a sample, Ding et al.'s SVD init),
    #: "kmeans" (centroids of a sample; Y = assignment + 0.2), "random" (Gaussian Z).
    init: Literal["random", "svd", "kmeans"] = "svd"
    #: Seed of the random init, the k-means init and the choice of init sample columns.
    seed: int = 0
    #: Guards divisions (multiplicative update), floors the initial Y (a multiplicative
    #: update cannot move a zero) and, times the mean of diag(Y Yᵀ), is the ridge of the Z solve.
    eps: float = 1e-9
    #: Tokens (columns of A) drawn for the svd / k-means init; see :func:`init_sample_columns`.
    init_tokens: int = 8192

    def __post_init__(self) -> None:
        if not (isinstance(self.k, int | np.integer) and self.k > 0):
            raise ConfigError(f"SNMFConfig.k must be a positive int, got {self.k!r}")
        if not 0.0 < self.keep_fraction <= 1.0:
            raise ConfigError(
                f"SNMFConfig.keep_fraction must be in (0, 1], got {self.keep_fraction}"
            )
        if self.iters < 1:
            raise ConfigError(f"SNMFConfig.iters must be >= 1, got {self.iters}")
        if self.patience < 1:
            raise ConfigError(f"SNMFConfig.patience must be >= 1, got {self.patience}")
        if not self.tol >= 0.0:
            raise ConfigError(f"SNMFConfig.tol must be >= 0, got {self.tol}")
        if self.init not in ("random", "svd", "kmeans"):
            raise ConfigError(f"SNMFConfig.init must be random, svd or kmeans, got {self.init!r}")
        if not self.eps > 0.0:
            raise ConfigError(f"SNMFConfig.eps must be > 0, got {self.eps}")
        if self.init_tokens < 1:
            raise ConfigError(f"SNMFConfig.init_tokens must be >= 1, got {self.init_tokens}")

    def keep(self, d: int) -> int:
        """Neurons kept per feature: ``ceil(keep_fraction * d)``, at least 1.

        The product is rounded first so that e.g. 0.07 * 100 keeps 7, not 8.
        """
        return max(1, math.ceil(round(self.keep_fraction * d, 9)))


@dataclass(frozen=True)
class SteeringSearch:
    """Defaults of the steering search (``ops.steering.steer``)."""

    #: Mean next-token KL(clean || steered) that alpha is searched for (nats).
    target_kl: float = 0.5
    #: Accepted ``|KL - target| / target``.
    tolerance: float = 0.1
    #: Forward passes allowed per search.
    max_evals: int = 24
    #: Promoted and suppressed tokens reported.
    top: int = 10


TAXONOMY_KINDS = ("dead", "token", "ngram", "positional", "source", "massive")
"""Neuron kinds of the taxonomy (``ops.taxonomy``), in the order they are stored; here, in a
torch-free module, so the CLI can offer them without loading torch."""

TAXONOMY_SCORES = {"dead": None, "token": "token_top1", "ngram": "ngram_top1",
                   "positional": "pos_nmi", "source": "source_selectivity", "massive": None}  # fmt: skip
"""The score each kind is ranked by (dead and massive: by the statistics)."""
