"""Neuron taxonomy: what makes a neuron fire, counted in the activation pass, and the labels
and scores drawn from the counts (*Neurons in LLMs: Dead, N-gram, Positional*; the
language-neuron papers).

Per neuron and shard, :class:`Counters` keeps (all mergeable, merged in shard order):

- how often it fires ("fires": activation above the job's threshold) per **position
  bucket** of the sequence, and the tokens per bucket;
- how often it fires, and the sum of its activation, per **corpus source**;
- the **trigger tokens** and **(previous, current) bigrams** it fires on, in a bounded
  Misra–Gries summary of ``m`` entries per neuron (:class:`Sketch`). A summary is exact
  while a neuron has fired on at most ``m`` distinct items; beyond that, every count is an
  underestimate by at most the neuron's ``err`` (the summaries of Agarwal et al.,
  *Mergeable summaries*, 2012; DataSketches' frequent-items sketch is the same algorithm).

:func:`scores` turns merged counts into per-neuron scores and :func:`labels` into kinds:
dead, token and n-gram detectors, positional and source-selective neurons.

Pure numpy and torch: nothing here knows Ray, Prefect or Zarr.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

from ops import kernels
from ops.devices import to_device
from ops.errors import ConfigError

EMPTY = -1
"""Item id of an unused summary slot."""

ITEM_BITS = 40
"""Items (token ids, bigram ids) are below ``2**ITEM_BITS``; a unit and an item pack into one
int64 sort key (units below ``2**23``)."""

BIGRAM_BASE = 2**20
"""A bigram's item id is ``previous * BIGRAM_BASE + current``: token ids must be below
``2**20`` (a 1M-token vocabulary; the largest in use have 262k)."""


# ---------------------------------------------------------------------------- the summary


@dataclass
class Sketch:
    """Misra–Gries summaries of ``d`` units (neurons), ``m`` entries each.

    ``items``/``counts`` ``[d, m]`` are sorted by count (descending), then item (ascending);
    unused slots hold item :data:`EMPTY` and count 0. ``err [d]`` is the most any count of
    the unit underestimates the true one (0: the summary is exact).
    """

    items: np.ndarray  # int64 [d, m]
    counts: np.ndarray  # int64 [d, m]
    err: np.ndarray  # int64 [d]

    @classmethod
    def empty(cls, d: int, m: int) -> Sketch:
        return cls(np.full((d, m), EMPTY, np.int64), np.zeros((d, m), np.int64),
                   np.zeros(d, np.int64))  # fmt: skip

    @property
    def m(self) -> int:
        return self.items.shape[1]

    def triples(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(unit, item, count) of the used slots."""
        u, j = np.nonzero(self.items != EMPTY)
        return u, self.items[u, j], self.counts[u, j]


def reduce_events(d: int, m: int, units: np.ndarray, items: np.ndarray, counts: np.ndarray,
                  err: np.ndarray) -> Sketch:  # fmt: skip
    """The summary of weighted events ``(unit, item, count)`` (duplicates allowed): per unit,
    the counts of equal items are summed; when more than ``m`` items remain, the
    ``(m+1)``-th largest count is subtracted from every count and what falls to zero is
    dropped (Misra–Gries). ``err`` (the units' errors so far) grows by what was subtracted.
    Ties are broken by item id, so the result depends only on the events."""
    out = Sketch.empty(d, m)
    out.err[:] = err
    if len(units) == 0:
        return out
    units, items, counts = (np.asarray(a, np.int64) for a in (units, items, counts))
    # one int64 key per (unit, item): a single sort instead of a two-key lexsort
    key = (units << ITEM_BITS) | items
    order = np.argsort(key)  # equal keys are summed: their order does not matter
    key, c = key[order], counts[order]
    new = np.ones(len(key), bool)
    new[1:] = key[1:] != key[:-1]
    starts = np.flatnonzero(new)
    key, c = key[starts], np.add.reduceat(c, starts)
    u, it = key >> ITEM_BITS, key & ((1 << ITEM_BITS) - 1)
    order = _by_unit_and_count(u, c)  # items stay ascending within a count
    u, it, c = u[order], it[order], c[order]
    first = np.searchsorted(u, np.arange(d))
    rank = np.arange(len(u)) - first[u]
    cut = np.zeros(d, np.int64)  # the (m+1)-th largest count of each unit, 0 if none
    over = rank == m
    cut[u[over]] = c[over]
    c = c - cut[u]
    keep = (rank < m) & (c > 0)
    out.items[u[keep], rank[keep]] = it[keep]
    out.counts[u[keep], rank[keep]] = c[keep]
    out.err += cut
    return out


def _by_unit_and_count(u: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Stable order by unit, then count descending, of arrays sorted by (unit, item): two
    16-bit radix sorts when unit and count fit (4x faster than a 64-bit stable sort)."""
    if len(c) and c.max() < 2**15 and u.max() < 2**16:
        o1 = np.argsort((-c).astype(np.int16), kind="stable")
        return o1[np.argsort(u[o1].astype(np.uint16), kind="stable")]
    return np.lexsort((-c, u))


def merge_sketches(parts: Sequence[Sketch]) -> Sketch:
    """Fold summaries left to right (each step is :func:`reduce_events` of the union)."""
    if not parts:
        raise ConfigError("merge_sketches needs at least one summary")
    acc = parts[0]
    d, m = acc.items.shape
    for p in parts[1:]:
        ua, ia, ca = acc.triples()
        ub, ib, cb = p.triples()
        acc = reduce_events(d, m, np.concatenate([ua, ub]), np.concatenate([ia, ib]),
                            np.concatenate([ca, cb]), acc.err + p.err)  # fmt: skip
    return acc


# ---------------------------------------------------------------------------- the counters


@dataclass
class CountersPartial:
    """Mergeable counts of one layer (a leading layer axis may be stacked in front)."""

    tokens: np.ndarray  # int64 []        recorded tokens
    fires: np.ndarray  # int64 [d]        tokens the neuron fired on
    pos_tokens: np.ndarray  # int64 [B]   tokens per position bucket
    pos_fires: np.ndarray  # int64 [d, B]
    pos_sum: np.ndarray  # float64 [d, B] sum of activations per position bucket
    src_tokens: np.ndarray  # int64 [S]   tokens per corpus source
    src_fires: np.ndarray  # int64 [d, S]
    src_sum: np.ndarray  # float64 [d, S] sum of activations per source
    tok_items: np.ndarray  # int64 [d, m] trigger-token summary (Sketch)
    tok_counts: np.ndarray
    tok_err: np.ndarray
    bi_items: np.ndarray  # bigram summary: item = previous * BIGRAM_BASE + current
    bi_counts: np.ndarray
    bi_err: np.ndarray

    def to_arrays(self, prefix: str = "") -> dict[str, np.ndarray]:
        return {prefix + f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_arrays(cls, a: dict[str, np.ndarray], prefix: str = "") -> CountersPartial:
        return cls(**{f.name: np.asarray(a[prefix + f.name]) for f in fields(cls)})

    def sketch(self, which: str) -> Sketch:
        return Sketch(getattr(self, f"{which}_items"), getattr(self, f"{which}_counts"),
                      getattr(self, f"{which}_err"))  # fmt: skip


def _layers(p: CountersPartial) -> list[CountersPartial]:
    """A stacked partial as one partial per layer (an unstacked one as itself)."""
    if p.fires.ndim == 1:
        return [p]
    return [CountersPartial(**{f.name: getattr(p, f.name)[i] for f in fields(p)})
            for i in range(p.fires.shape[0])]  # fmt: skip


def stack_counters(parts: Sequence[CountersPartial]) -> CountersPartial:
    return CountersPartial(**{f.name: np.stack([getattr(p, f.name) for p in parts])
                              for f in fields(CountersPartial)})  # fmt: skip


def merge_counters(parts: Sequence[CountersPartial]) -> CountersPartial:
    """Fold partials left to right (shard order); stacked partials merge layer by layer."""
    if not parts:
        raise ConfigError("merge_counters needs at least one partial")
    per_layer = [_layers(p) for p in parts]
    out = []
    for layer in zip(*per_layer, strict=True):
        first = layer[0]
        acc = {f.name: getattr(first, f.name).copy() for f in fields(first)}
        for name in ("tokens", "fires", "pos_tokens", "pos_fires", "pos_sum", "src_tokens",
                     "src_fires", "src_sum"):  # fmt: skip
            for p in layer[1:]:
                acc[name] = acc[name] + getattr(p, name)
        for which in ("tok", "bi"):
            s = merge_sketches([p.sketch(which) for p in layer])
            acc[f"{which}_items"], acc[f"{which}_counts"], acc[f"{which}_err"] = (
                s.items,
                s.counts,
                s.err,
            )
        out.append(CountersPartial(**acc))
    return out[0] if parts[0].fires.ndim == 1 else stack_counters(out)


def position_buckets(seq_len: int, n: int) -> np.ndarray:
    """Bucket of every position of a sequence: ``n`` equal ranges of ``0..seq_len-1``."""
    n = max(1, min(n, seq_len))
    return (np.arange(seq_len) * n // seq_len).astype(np.int64)


def group_sums(x: torch.Tensor, group: torch.Tensor, n_groups: int,
               gemm: bool | None = None) -> torch.Tensor:  # fmt: skip
    """``out[g] = Σ x[t]`` over the rows ``t`` with ``group[t] == g``: float32 ``[n_groups, d]``.

    On the CPU an ``index_add_`` (sequential, so reproducible). On a GPU ``index_add_`` adds
    with atomics in whatever order the threads arrive: the float32 sums, and so the atlas,
    would differ from run to run. There the sums are one GEMM of a one-hot ``[G, T]`` matrix
    with ``x``: a fixed reduction order, so the same bits every run on the same device and
    library, and no atomics (``2 G T d`` FLOPs: small for the few dozen (bucket, source)
    groups of a job). The products are exact (by 0 or 1), so the result is a float32 sum
    like ``index_add_``'s. TF32 would round ``x`` to 10 bits: where the caller has turned it
    on, the GEMM runs in float64 instead. ``gemm`` forces one way or the other (default: the
    GEMM on CUDA).
    """
    if not (x.device.type == "cuda" if gemm is None else gemm):
        return torch.zeros(n_groups, x.shape[1], device=x.device).index_add_(0, group, x)
    onehot = group[None, :] == torch.arange(n_groups, device=x.device)[:, None]
    if torch.backends.cuda.matmul.allow_tf32:
        return (onehot.double() @ x.double()).float()
    return onehot.float() @ x


class CountersAccumulator:
    """Counts of one layer over batches: fed the recorded rows' activations, the tokens of
    those rows, their previous tokens, position buckets and sources.

    Fire events are buffered and folded into the summaries once ``flush_events`` (default
    ``4 d m``) are pending: reducing a summary of ``d m`` entries every batch would cost more
    than the batch's forward on a CPU. On a GPU a batch's events are read on the host when
    the next batch is fed (or at ``partial()``), so the device never waits for the host;
    ``event_capacity`` is their first buffer size (it grows when a batch fires more)."""

    def __init__(self, d: int, buckets: int, sources: int, m: int,
                 threshold: float | np.ndarray = 0.0, device: torch.device | str = "cpu",
                 flush_events: int | None = None, event_capacity: int = 1 << 20):  # fmt: skip
        self.d, self.m = d, m
        self.B, self.S = buckets, sources
        self.threshold = torch.tensor(np.array(threshold, np.float32), device=device)
        self.tokens = 0
        G = buckets * sources  # every (bucket, source) group; per-bucket/-source sums at the end
        self.grp_tokens = np.zeros(G, np.int64)
        self.grp_fires = np.zeros(G * d, np.int64)
        self.grp_sum = torch.zeros(G, d, dtype=torch.float64, device=device)
        self.tok = Sketch.empty(d, m)
        self.bi = Sketch.empty(d, m)
        self._pending: list[tuple[np.ndarray, ...]] = []
        self._n_pending = 0
        self.flush_events = flush_events or 4 * d * m
        self._thr_np = np.ascontiguousarray(np.broadcast_to(self.threshold.cpu().numpy(), (d,)),
                                            np.float32)  # fmt: skip
        self._scratch = np.empty(d, np.int32)  # one widened row (ops.kernels)
        self._events = np.empty(0, np.int64)
        # device path: batches whose fire events are still on their way to the host
        self._inflight: list[tuple[torch.Tensor, Any, torch.Tensor, tuple[np.ndarray, ...]]] = []
        self._capacity = event_capacity

    @torch.no_grad()
    def update(self, x: torch.Tensor, token: np.ndarray, prev: np.ndarray, bucket: np.ndarray,
               source: np.ndarray, rows: np.ndarray | None = None) -> None:  # fmt: skip
        """``x [N, d]``: activations; ``rows [T]`` the recorded ones (default: every row), and
        the other arguments ``[T]`` describe those (``prev`` is -1 where a row has no previous
        token). Taking the whole batch view saves gathering the recorded rows first.

        One dense pass per batch (a numba kernel on the CPU, reading the batch in place):
        the comparison with the thresholds and the sums of ``x`` per (bucket, source) group;
        everything else is counted from the fire events (~1% of the values under the default
        rule)."""
        N, T = x.shape[0], len(token)
        G = len(self.grp_tokens)
        rows = np.arange(N) if rows is None else np.asarray(rows, np.int64)
        group = np.asarray(bucket, np.int64) * self.S + np.asarray(source, np.int64)
        self.tokens += T
        self.grp_tokens += np.bincount(group, minlength=G)
        if x.device.type == "cpu" and kernels.AVAILABLE:  # one fused pass (ops.kernels)
            t, n = self._fire_kernel(x, rows, group)
            self._count_events(t, n, group, token, prev)
        else:  # events come back a batch later: nothing waits for the device
            self._fire_device(x, rows, group, (group, token, prev))
            self._drain(keep=1)

    def _count_events(self, t: np.ndarray, n: np.ndarray, group: np.ndarray, token: np.ndarray,
                      prev: np.ndarray) -> None:  # fmt: skip
        """Fire events (row ``t`` of the batch, neuron ``n``) into the per-group fire counts
        and the summaries' pending items."""
        if len(t):
            self.grp_fires += np.bincount(group[t] * self.d + n, minlength=len(self.grp_fires))
            has = prev[t] >= 0
            self._pending.append((n, token[t], n[has], prev[t[has]] * BIGRAM_BASE + token[t[has]]))
            self._n_pending += len(t)
            if self._n_pending >= self.flush_events:
                self._flush()

    def _fire_kernel(self, x: torch.Tensor, rows: np.ndarray, group: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        """Group sums and fire events in one numba pass, reading the batch in place."""
        x = x.contiguous()
        if x.dtype == torch.bfloat16:
            a, wide = x.view(torch.int16).numpy(), False
        else:
            a, wide = x.to(torch.float32).numpy(), True
        sums = self.grp_sum.numpy()
        if self._events.shape[0] < len(rows) * self.d // 16:
            self._events = np.empty(len(rows) * self.d // 16, np.int64)
        k = kernels.fire_rows(a, wide, rows, group, self._thr_np, sums, self._scratch, self._events)
        if k > self._events.shape[0]:  # more fired than the buffer holds: collect them again
            self._events = np.empty(k, np.int64)
            xs = torch.from_numpy(a).index_select(0, torch.from_numpy(rows))
            xs = xs.view(torch.bfloat16).float() if not wide else xs
            flat = np.flatnonzero(xs.numpy() > self._thr_np)
        else:
            flat = self._events[:k]
        return flat // self.d, flat % self.d

    def _fire_device(self, x: torch.Tensor, rows: np.ndarray, group: np.ndarray,
                     meta: tuple[np.ndarray, ...]) -> None:  # fmt: skip
        """The same in torch (the GPU path, or without numba), with no host sync: group sums
        on the device; the fire events as flat indices ``r * d + j`` of a fixed-size buffer
        (``nonzero_static``) copied to pinned host memory without waiting, with their count.
        The fire mask is kept until the events are read, in case there were more than the
        buffer held (then they are collected again from it, and the buffer grows)."""
        dev = x.device
        xs = x.index_select(0, to_device(rows, dev)).float()
        g = to_device(group, dev)
        self.grp_sum += group_sums(xs, g, len(self.grp_tokens)).to(self.grp_sum)
        fired = (xs > self.threshold).view(-1)
        cap = max(self._capacity, 1)
        flat = torch.nonzero_static(fired, size=cap, fill_value=-1).view(-1)
        count = fired.sum(dtype=torch.int64).view(1)
        if dev.type == "cuda":
            host = torch.empty(cap + 1, dtype=torch.int64, pin_memory=True)
            host[:cap].copy_(flat, non_blocking=True)
            host[cap:].copy_(count, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        else:
            host, done = torch.cat([flat, count]), None
        self._inflight.append((host, done, fired, meta))

    def _drain(self, keep: int = 0) -> None:
        """Count the fire events of every batch in flight but the last ``keep``, in order."""
        while len(self._inflight) > keep:
            host, done, fired, (group, token, prev) = self._inflight.pop(0)
            if done is not None:
                done.synchronize()  # long finished when a batch later
            cap = host.shape[0] - 1
            k = int(host[cap])
            if k > cap:  # more than the buffer held: read them from the mask, grow the buffer
                flat = torch.nonzero(fired).view(-1).cpu().numpy()
                self._capacity = 2 * k
            else:
                flat = host[:k].numpy()
            self._count_events(flat // self.d, flat % self.d, group, token, prev)

    def _flush(self) -> None:
        """Fold the buffered fire events into the summaries (one reduction for many batches:
        the summaries stay valid, and the result depends only on the batches fed)."""
        if not self._pending:
            return
        for which, (ui, ii) in (("tok", (0, 1)), ("bi", (2, 3))):
            sk: Sketch = getattr(self, which)
            u, it, c = sk.triples()
            units = np.concatenate([u, *(p[ui] for p in self._pending)])
            items = np.concatenate([it, *(p[ii] for p in self._pending)])
            counts = np.concatenate([c, np.ones(len(units) - len(u), np.int64)])
            setattr(self, which, reduce_events(self.d, self.m, units, items, counts, sk.err))
        self._pending, self._n_pending = [], 0

    def partial(self) -> CountersPartial:
        self._drain()
        self._flush()
        B, S, d = self.B, self.S, self.d
        gt = self.grp_tokens.reshape(B, S)
        gf = self.grp_fires.reshape(B, S, d)
        gs = self.grp_sum.cpu().numpy().reshape(B, S, d)
        return CountersPartial(
            tokens=np.asarray(self.tokens, np.int64), fires=gf.sum((0, 1)),
            pos_tokens=gt.sum(1), pos_fires=gf.sum(1).T.copy(),
            pos_sum=gs.sum(1).T.copy(),
            src_tokens=gt.sum(0), src_fires=gf.sum(0).T.copy(), src_sum=gs.sum(0).T.copy(),
            tok_items=self.tok.items, tok_counts=self.tok.counts, tok_err=self.tok.err,
            bi_items=self.bi.items, bi_counts=self.bi.counts, bi_err=self.bi.err,
        )  # fmt: skip


def pad_sources(p: CountersPartial, sources: int) -> CountersPartial:
    """``p`` with its per-source arrays widened to ``sources`` (a corpus that grew may have
    gained a source after a shard was counted)."""
    extra = sources - p.src_tokens.shape[-1]
    if extra <= 0:
        return p

    def pad(a: np.ndarray) -> np.ndarray:
        return np.concatenate([a, np.zeros((*a.shape[:-1], extra), a.dtype)], axis=-1)

    return CountersPartial(**{f.name: getattr(p, f.name) for f in fields(p)} | {
        "src_tokens": pad(p.src_tokens), "src_fires": pad(p.src_fires), "src_sum": pad(p.src_sum)})  # fmt: skip


def firing_rule(threshold: float | None, quantile: float | None, activation: str) -> dict:
    """When a neuron fires: ``{"rule": "threshold", "value": x}`` or ``{"rule": "quantile",
    "q": q}`` (per neuron). Unset: ``> 0`` for ReLU activations, whose zero is a real
    "off"; the 0.99 quantile for GELU/SiLU ones, which are rarely exactly zero."""
    if threshold is not None:
        return {"rule": "threshold", "value": float(threshold)}
    if quantile is not None:
        return {"rule": "quantile", "q": float(quantile)}
    if "relu" in activation.lower():
        return {"rule": "threshold", "value": 0.0}
    return {"rule": "quantile", "q": 0.99}


# ---------------------------------------------------------------------------- scores and labels


def _entropy(p: np.ndarray, axis: int = -1) -> np.ndarray:
    """Shannon entropy (nats) of distributions along ``axis`` (0 log 0 = 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.sum(np.where(p > 0, p * np.log(p), 0.0), axis=axis)


def scores(p: CountersPartial) -> dict[str, np.ndarray]:
    """Per-neuron scores of one layer from its merged counts (all in [0, 1] unless noted):

    - ``fire_rate``: fires / tokens;
    - ``token_top1``/``token_top5``: share of fires on the most frequent 1 / 5 trigger
      tokens (lower bounds when the summary is inexact); ``token_entropy``: entropy (nats)
      of the trigger-token distribution, the fires outside the summary counted as one more
      item; ``ngram_top1``/``ngram_top5``/``ngram_entropy``: the same over bigrams;
    - ``pos_mi``: mutual information (nats) between position bucket and firing;
      ``pos_nmi``: that over the entropy of firing (the share of what firing says that the
      position already says, in [0, 1]); ``pos_var``: share of the variance of the firing
      indicator explained by the bucket (η²); ``pos_rate [d, B]``: firing rate per
      bucket; ``pos_mean [d, B]``: mean activation per bucket;
    - ``source_selectivity``: 1 - entropy of the per-source firing probabilities
      (normalised to sum to one) / log(sources), as language-neuron work ranks them;
      ``source_favoured``: index of the source it fires most on (by probability);
      ``source_rate [d, S]``: firing probability per source; ``source_mean [d, S]``: mean
      activation per source.
    """
    n = max(int(p.tokens), 1)
    fires = p.fires.astype(np.float64)
    safe = np.maximum(fires, 1)
    out: dict[str, np.ndarray] = {"fire_rate": fires / n}
    for which, name in (("tok", "token"), ("bi", "ngram")):
        c = getattr(p, f"{which}_counts").astype(np.float64)
        out[f"{name}_top1"] = c[:, 0] / safe
        out[f"{name}_top5"] = c[:, :5].sum(1) / safe
        rest = np.maximum(fires - c.sum(1), 0)
        dist = np.concatenate([c, rest[:, None]], axis=1) / safe[:, None]
        out[f"{name}_entropy"] = _entropy(dist)
    # position: joint of (bucket, fired)
    nb = p.pos_tokens.astype(np.float64)
    pb = nb / n
    f1 = p.pos_fires.astype(np.float64)  # [d, B]
    with np.errstate(divide="ignore", invalid="ignore"):
        rate_b = np.where(nb > 0, f1 / np.maximum(nb, 1), 0.0)  # P(fire | b)
        q = fires / n  # P(fire)
        h_f = _entropy(np.stack([q, 1 - q], -1))
        h_f_given_b = (pb * _entropy(np.stack([rate_b, 1 - rate_b], -1))).sum(-1)
        out["pos_mi"] = np.maximum(h_f - h_f_given_b, 0.0)
        between = (nb * (rate_b - q[:, None]) ** 2).sum(-1)
        total = n * q * (1 - q)
        out["pos_var"] = np.where(total > 0, between / np.where(total > 0, total, 1), 0.0)
        out["pos_nmi"] = np.where(h_f > 0, out["pos_mi"] / np.where(h_f > 0, h_f, 1), 0.0)
        mean_b = np.where(nb > 0, p.pos_sum / np.maximum(nb, 1), 0.0)
    out["pos_rate"] = rate_b
    out["pos_mean"] = mean_b
    ns = p.src_tokens.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        rate_s = np.where(ns > 0, p.src_fires / np.maximum(ns, 1), 0.0)
        out["source_mean"] = np.where(ns > 0, p.src_sum / np.maximum(ns, 1), 0.0)
    out["source_rate"] = rate_s
    S = int((ns > 0).sum())
    tot = rate_s.sum(-1, keepdims=True)
    if S > 1:
        dist = np.where(tot > 0, rate_s / np.where(tot > 0, tot, 1), 1.0 / S)
        out["source_selectivity"] = np.where(tot[:, 0] > 0, 1 - _entropy(dist) / np.log(S), 0.0)
    else:
        out["source_selectivity"] = np.zeros(len(fires))
    out["source_favoured"] = rate_s.argmax(-1).astype(np.int64)
    return out


@dataclass(frozen=True)
class Thresholds:
    """When a score makes a label (see :func:`labels`)."""

    min_fires: int = 20
    """Fewer fires than this: no label but dead (too few to judge)."""
    token: float = 0.5
    """token_top1 at least this: a token detector."""
    ngram: float = 0.5
    """ngram_top1 at least this, and above token_top1: an n-gram detector."""
    positional: float = 0.3
    """pos_nmi (mutual information of position bucket and firing over the entropy of
    firing) at least this: positional."""
    source: float = 0.5
    """source_selectivity at least this: source-selective."""


def labels(sc: dict[str, np.ndarray], dead: np.ndarray, massive: np.ndarray,
           t: Thresholds = Thresholds(), fires: np.ndarray | None = None) -> dict[str, np.ndarray]:  # fmt: skip
    """Boolean kind labels of one layer's neurons (a neuron may have several)."""
    enough = np.ones_like(dead, bool) if fires is None else fires >= t.min_fires
    return {
        "dead": np.asarray(dead, bool),
        "token": enough & (sc["token_top1"] >= t.token),
        "ngram": enough & (sc["ngram_top1"] >= t.ngram) & (sc["ngram_top1"] > sc["token_top1"]),
        "positional": enough & (sc["pos_nmi"] >= t.positional),
        "source": enough & (sc["source_selectivity"] >= t.source),
        "massive": np.asarray(massive, bool),
    }
