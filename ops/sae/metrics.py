"""How good an SAE is: reconstruction (FVU, L0, dead fraction) on held-out activations, and
the next-token loss recovered when it replaces the layer's MLP activations."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ops.errors import ConfigError
from ops.interventions import mean_losses
from ops.sae.archs import SAE
from ops.sae.training import TrainState

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
