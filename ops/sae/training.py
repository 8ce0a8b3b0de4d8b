"""Training: the loop, its state and checkpoints (model, optimiser and dead-latent counters
together: a resumed run equals an uninterrupted one on the same data order)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ops.configs import SAEConfig
from ops.errors import ConfigError
from ops.sae.archs import CHECKPOINT_FORMAT, SAE, build_sae
from ops.sae.data import StreamBatches

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
