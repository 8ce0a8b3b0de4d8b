"""Interventions at an MLP neuron site: replace or shift the activation, measure the LM loss.

Used to score dictionaries causally: the losses behind the CE loss recovered by splicing an
SAE's reconstruction into the model (``ops.sae.ce_loss_recovered``).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

if TYPE_CHECKING:  # ops.models imports transformers (seconds): configs import this
    from ops.models import LoadedModel


Replace = Callable[[torch.Tensor], torch.Tensor]


@contextmanager
def replace_mlp_activation(loaded: LoadedModel, layer: int, fn: Replace):
    """Within the block, the input of ``layer``'s MLP output projection is ``fn(act)``."""

    def hook(_m: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        act = args[0]
        return (fn(act).to(act.dtype), *args[1:])

    handle = loaded.down_projs()[layer].register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def next_token_loss(
    loaded: LoadedModel, ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor
) -> tuple[float, int]:
    """Summed next-token cross-entropy over positions where ``loss_mask`` is set, and their count.

    ``loss_mask[b, t]`` marks positions whose *next* token is predicted and counted.
    """
    dev = loaded.device
    out = loaded.model(
        input_ids=ids.to(dev), attention_mask=attention_mask.to(dev), use_cache=False
    )
    logits = out.logits[:, :-1].float()
    target = ids[:, 1:].to(dev)
    m = loss_mask[:, :-1].to(dev)
    ce = F.cross_entropy(logits[m], target[m], reduction="sum")
    return float(ce), int(m.sum())


def loss_mask(mask: torch.Tensor) -> torch.Tensor:
    """Positions whose next token is recorded too (BOS and padding are never predicted)."""
    return mask & torch.roll(mask, -1, dims=1)


def mean_losses(loaded: LoadedModel, layer: int,
                batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                replacements: dict[str, Replace | None]) -> dict[str, float]:  # fmt: skip
    """Mean next-token loss over ``batches`` (ids, attention, recorded mask) with ``layer``'s MLP
    activation replaced by each of ``replacements`` (``None``: the clean model)."""
    totals = {name: [0.0, 0] for name in replacements}
    for ids, attn, m in tqdm(batches, desc=f"CE loss L{layer}", unit="batch", disable=None):
        lm = loss_mask(m)
        for name, fn in replacements.items():
            if fn is None:
                ce, n = next_token_loss(loaded, ids, attn, lm)
            else:
                with replace_mlp_activation(loaded, layer, fn):
                    ce, n = next_token_loss(loaded, ids, attn, lm)
            totals[name][0] += ce
            totals[name][1] += n
    return {k: v[0] / max(v[1], 1) for k, v in totals.items()}
