"""Steering: the causal check of a feature direction.

Adding ``alpha * direction`` to an MLP activation at every position moves the model's
next-token distribution; how far depends on the direction and on ``alpha``, so directions
are only comparable at a fixed effect size. :func:`steer` finds by bisection the ``alpha``
at which the mean next-token KL(clean || steered) hits a target, then reports the tokens
whose next-token probability the shift raises and lowers the most on average. A feature
whose promoted tokens match its top examples is doing what its examples suggest.

Probabilities, not log-probabilities: a log-probability change is largest for tokens the
model never predicts (-20 -> -15 is +5 nats of nothing), so it ranks junk subwords first;
the change in probability mass says what the model now actually says more or less often.

The baseline direction is a difference in means between two labelled sub-corpora
(:func:`diff_in_means`, e.g. ``wiki-fr`` minus ``wiki-en``), evaluated the same way.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

if TYPE_CHECKING:  # ops.models imports transformers (seconds): configs import this
    from ops.models import LoadedModel

from ops.configs import SteeringSearch
from ops.errors import ConfigError
from ops.interventions import replace_mlp_activation

__all__ = ["SteeringEval", "SteeringResult", "diff_in_means", "steer"]


def diff_in_means(acts: np.ndarray, labels: np.ndarray, a: int, b: int) -> np.ndarray:
    """``mean(acts[labels == a]) - mean(acts[labels == b])`` in float64, ``[d]``."""
    for name, lab in (("a", a), ("b", b)):
        if not np.any(labels == lab):
            raise ConfigError(f"diff_in_means: no rows with label {name}={lab}")
    x = np.asarray(acts, dtype=np.float64)
    return x[labels == a].mean(0) - x[labels == b].mean(0)


@dataclass
class SteeringResult:
    """Where the bisection landed and what the shift does there."""

    alpha: float
    """Multiplier of the unit-norm direction (activation units)."""
    alpha_rel: float
    """``alpha`` over the mean activation norm at the site: 1 = as large as a typical token."""
    kl: float
    """Mean next-token KL(clean || steered) in nats at ``alpha``."""
    target_kl: float
    converged: bool
    """Whether ``kl`` is within the tolerance of ``target_kl``."""
    promoted: list[tuple[int, float]] = field(default_factory=list)
    """(token id, mean change of next-token probability), largest increase first."""
    suppressed: list[tuple[int, float]] = field(default_factory=list)
    """(token id, mean change of next-token probability), largest decrease first."""
    evaluations: list[tuple[float, float]] = field(default_factory=list)
    """Every (alpha, kl) the search tried, in order."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class SteeringEval:
    """Clean next-token log-probabilities of some batches, kept to compare steered runs with.

    ``batches`` are ``(input_ids, attention_mask, loss_mask)`` with ``loss_mask[b, t]`` set
    where the prediction made at ``t`` counts. The clean pass also measures the mean
    activation norm at the site, the scale ``alpha`` is searched on.
    """

    def __init__(self, loaded: LoadedModel, layer: int,
                 batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:  # fmt: skip
        if not batches:
            raise ConfigError("steering: no evaluation batches")
        self.loaded, self.layer = loaded, layer
        self.batches = batches
        norms: list[torch.Tensor] = []

        def measure(act: torch.Tensor) -> torch.Tensor:
            norms.append(act.float().norm(dim=-1).reshape(-1))
            return act

        self.clean: list[torch.Tensor] = []
        with replace_mlp_activation(loaded, layer, measure):
            for ids, attn, m in batches:
                self.clean.append(self._logprobs(ids, attn, m))
        self.n_positions = sum(c.shape[0] for c in self.clean)
        if self.n_positions == 0:
            raise ConfigError("steering: the evaluation batches have no counted positions")
        self.act_norm = float(torch.cat(norms).mean())

    @torch.no_grad()
    def _logprobs(self, ids: torch.Tensor, attn: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        dev = self.loaded.device
        out = self.loaded.model(input_ids=ids.to(dev), attention_mask=attn.to(dev),
                                use_cache=False)  # fmt: skip
        return torch.log_softmax(out.logits[m.to(dev)].float(), dim=-1)

    @torch.no_grad()
    def evaluate(self, direction: torch.Tensor, alpha: float,
                 with_delta: bool = False) -> tuple[float, torch.Tensor | None]:  # fmt: skip
        """Mean KL(clean || steered) over counted positions, and optionally the mean change of
        every token's next-token probability ``[vocab]``."""
        shift = (alpha * direction).to(self.loaded.device)
        kl_sum = 0.0
        delta = None
        with replace_mlp_activation(self.loaded, self.layer, lambda a: a + shift.to(a.dtype)):
            for (ids, attn, m), clean in zip(self.batches, self.clean, strict=True):
                steered = self._logprobs(ids, attn, m)
                kl_sum += float((clean.exp() * (clean - steered)).sum())
                if with_delta:
                    d = (steered.exp() - clean.exp()).sum(0, dtype=torch.float64)
                    delta = d if delta is None else delta + d
        if delta is not None:
            delta = delta / self.n_positions
        return kl_sum / self.n_positions, delta


def steer(
    ev: SteeringEval,
    direction: np.ndarray | torch.Tensor,
    target_kl: float = SteeringSearch.target_kl,
    tolerance: float = SteeringSearch.tolerance,
    max_evals: int = SteeringSearch.max_evals,
    top: int = SteeringSearch.top,
) -> SteeringResult:
    """Find ``alpha >= 0`` with KL within ``tolerance * target_kl`` of ``target_kl``.

    KL grows with ``alpha`` (it is 0 at 0), so the search doubles ``alpha`` from the mean
    activation norm until it overshoots, then bisects the bracket geometrically (effects scale
    roughly with log alpha). After ``max_evals`` evaluations it keeps the closest ``alpha``.
    """
    if target_kl <= 0 or tolerance <= 0 or max_evals < 2:
        raise ConfigError(f"steer: need target_kl > 0, tolerance > 0, max_evals >= 2; got "
                         f"{target_kl}, {tolerance}, {max_evals}")  # fmt: skip
    d = torch.as_tensor(np.asarray(direction), dtype=torch.float32).reshape(-1)
    norm = float(d.norm())
    if not math.isfinite(norm) or norm == 0:
        raise ConfigError("steer: the direction is zero or not finite")
    d = d / norm
    evals: list[tuple[float, float]] = []
    bar = tqdm(total=max_evals, desc=f"steer to KL {target_kl}", unit="eval", disable=None)

    def kl_at(alpha: float) -> float:
        kl = ev.evaluate(d, alpha)[0]
        evals.append((alpha, kl))
        bar.update(1)
        bar.set_postfix(alpha=f"{alpha:.3g}", kl=f"{kl:.3f}")
        return kl

    def close(kl: float) -> bool:
        return abs(kl - target_kl) <= tolerance * target_kl

    lo, hi = 0.0, max(ev.act_norm, 1e-6) / 4
    kl_hi = kl_at(hi)
    while kl_hi < target_kl and not close(kl_hi) and len(evals) < max_evals:
        lo, hi = hi, hi * 2
        kl_prev, kl_hi = kl_hi, kl_at(hi)
        if kl_hi < kl_prev * 1.01:
            break  # saturated: behind a norm, a huge shift only sets the direction's effect
    while not close(evals[-1][1]) and len(evals) < max_evals and kl_hi >= target_kl:
        mid = math.sqrt(lo * hi) if lo > 0 else hi / 2
        kl = kl_at(mid)
        if kl < target_kl:
            lo = mid
        else:
            hi, kl_hi = mid, kl
    bar.close()
    alpha, kl = min(evals, key=lambda e: abs(e[1] - target_kl))
    _, delta = ev.evaluate(d, alpha, with_delta=True)
    assert delta is not None
    k = min(top, delta.numel())
    up = torch.topk(delta, k)
    down = torch.topk(-delta, k)
    return SteeringResult(
        alpha=alpha,
        alpha_rel=alpha / ev.act_norm if ev.act_norm > 0 else float("nan"),
        kl=kl,
        target_kl=target_kl,
        converged=close(kl),
        promoted=[(int(i), float(v)) for v, i in zip(up.values, up.indices, strict=True)],
        suppressed=[(int(i), -float(v)) for v, i in zip(down.values, down.indices, strict=True)],
        evaluations=evals,
    )
