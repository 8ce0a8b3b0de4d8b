"""Steering: directions in a layer's MLP activation space (dictionary features, a
difference-in-means baseline between two corpus sources) evaluated at the same next-token
KL (``ops.steering``); used by the dictionaries stage and by ``neuronmap steer``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from flows.config import JobConfigError, SteeringConfig
from ops.engine import attention_mask
from ops.steering import SteeringEval, diff_in_means, steer
from storage.atlas import Atlas
from storage.layout import contrast_key, steering_key
from storage.store import Store


def eval_batches(atlas: Atlas, rows: np.ndarray, batch_size: int) -> list[tuple]:
    """Corpus ``rows`` as evaluation batches ``(ids, attention, recorded mask)``."""
    ids = atlas.corpus["tokens"].oindex[rows, :].astype(np.int64)
    m = atlas.corpus["mask"].oindex[rows, :]
    return [(torch.from_numpy(ids[a : a + batch_size]),
             torch.from_numpy(attention_mask(m[a : a + batch_size])),
             torch.from_numpy(m[a : a + batch_size]))
            for a in range(0, len(rows), batch_size)]  # fmt: skip


def steering_batches(atlas: Atlas, sequences: int, batch_size: int) -> list[tuple]:
    """``sequences`` corpus rows spread evenly over the corpus, as evaluation batches."""
    n = atlas.corpus["tokens"].shape[0]
    rows = np.unique(np.linspace(0, n - 1, sequences).round().astype(np.int64))
    return eval_batches(atlas, rows, batch_size)


def contrast_direction(atlas: Atlas, model: str, layer: int, contrast: list[str]) -> np.ndarray:
    """Mean sampled activation on sequences of source ``contrast[0]`` minus ``contrast[1]``."""
    names = list(atlas.corpus.attrs["source_names"])
    missing = [c for c in contrast if c not in names]
    if missing:
        raise JobConfigError(f"dictionaries.steering.contrast: {missing} not among the corpus "
                             f"sources {names}")  # fmt: skip
    shards = atlas.sample(model, layer)
    acts = np.concatenate([a for _, a, _ in shards])
    seq = np.concatenate([p for _, _, p in shards]) // int(atlas.corpus.attrs["seq_len"])
    labels = atlas.corpus["sources"][...][seq]
    a, b = (names.index(c) for c in contrast)
    for c, i in zip(contrast, (a, b), strict=True):
        if not np.any(labels == i):
            raise JobConfigError(f"dictionaries.steering.contrast: no sampled tokens from {c!r}; "
                                 "raise record.sample_tokens or corpus.max_tokens")  # fmt: skip
    return diff_in_means(acts, labels, a, b)


def steer_directions(loaded: Any, atlas: Atlas, layer: int, directions: dict[str, np.ndarray],
                     cfg: SteeringConfig, batch_size: int) -> dict[str, dict]:  # fmt: skip
    """Steering results (JSON-able) for ``directions`` (key -> ``[d_mlp]``) at ``cfg.target_kl``."""
    if not directions:
        return {}
    ev = SteeringEval(loaded, layer, steering_batches(atlas, cfg.sequences, batch_size))
    return {key: steer(ev, d, cfg.target_kl, cfg.tolerance, cfg.max_evals,
                       cfg.top_tokens).to_dict()
            for key, d in directions.items()}  # fmt: skip


def steer_feature(atlas_path: str, model: str, layer: int, cfg: SteeringConfig, *,
                  method: str | None = None, run: str | None = None, feature: int | None = None,
                  contrast: list[str] | None = None, batch_size: int = 8,
                  device: str | None = None) -> str:  # fmt: skip
    """Steer one stored feature (``method``/``run``/``feature``) or a ``contrast`` baseline live,
    store the result in the atlas, and return its key (``Atlas.steering`` reads it back)."""
    from ops.models import load_model

    atlas = Store.open(atlas_path).owner(model)
    if (feature is None) == (contrast is None):
        raise JobConfigError("steer: give a feature (with its method) or a contrast, not both")
    baseline: dict[str, np.ndarray] = {}
    if contrast is not None:
        key = contrast_key(*contrast)
        baseline[key] = direction = contrast_direction(atlas, model, layer, contrast)
    else:
        if method is None:
            raise JobConfigError("steer: --method (sae or snmf) is needed with --feature")
        g = atlas.dictionary(model, layer, method, run)
        dirs = atlas.feature_directions(g, method)
        if not 0 <= feature < len(dirs):
            raise JobConfigError(f"steer: feature {feature} out of range: {method}/{g.basename} "
                                 f"has {len(dirs)} features")  # fmt: skip
        key, direction = steering_key(method, g.basename, feature), dirs[feature]
    attrs = atlas.model_attrs(model)
    lm = load_model(attrs["source"], dtype="float32", device=device, revision=attrs.get("revision"),
                    with_tokenizer=False)  # fmt: skip
    res = steer_directions(lm, atlas, layer, {key: direction}, cfg, batch_size)
    atlas.write_steering(model, layer, res, baseline)
    return key


