"""The activation pass: one forward per batch, every layer's MLP activation to its consumers.

Every analysis that reads MLP activations (neuron statistics, the activation sample,
cross-model co-moments, the streamed SAE feed, dictionary-feature statistics) is a
:class:`Consumer`. An :class:`ActivationPass` holds the loaded model(s) of a stage; per
batch of token rows it runs each model once, just far enough for the deepest layer any
consumer reads, and hands each consumer the activation view of the site(s) it asked for.
So a stage that needs several consumers gets them all from **one** forward.

The consumer protocol:

- ``sites``: the ``(model index, layer)`` pairs it reads;
- ``update(acts, rows)``: ``acts`` holds one ``[N, d]`` view per site (the model's own
  flattened tensor for the whole batch, never a copy); ``rows`` (:class:`Rows`) the recorded
  rows of it (BOS and padding left out) and their flat corpus positions, on the device and
  on the host, so that no consumer copies back (on a GPU that copy would wait for the device);
- ``state()``: the mergeable partial on the host (numpy), for the shard or checkpoint;
- ``merge(states)`` (static): the fold of partials, in the order given (shard order);
- ``finalize(state)`` (static, optional): the result the atlas stores.

Consumers with one site are called from the hook, while the view is live, so a CPU
kernel can read the model's bfloat16 buffer in place. Consumers with several sites (the
co-moments of two models) are called once every model has run the batch: their ``acts``
are the recorded rows already gathered in float32, once per site and batch, shared by
every such consumer of the site.

On a GPU nothing in the per-batch path waits for the device: the rows go up by
non-blocking copies from pinned memory, the statistics run as fused kernels
(:mod:`ops.fused`) and consumers that keep activations on the host copy them
asynchronously into pinned buffers, read once per shard (``state()``).

Nothing here knows Ray, Prefect or Zarr; ``flows.engine`` runs passes on workers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ops.correlation import FamilyMoments
from ops.devices import HostRows, to_device
from ops.errors import ConfigError
from ops.models import LoadedModel, capture_mlp, forward_until
from ops.stats import HistSpec, NeuronAccumulator, StatsPartial, finalize, merge_partials
from ops.taxonomy import BIGRAM_BASE, CountersAccumulator, CountersPartial, merge_counters

Site = tuple[int, int]
"""``(model index in the pass, layer)``."""


# ---------------------------------------------------------------------------- batches


def attention_mask(mask: np.ndarray) -> np.ndarray:
    """Attend to every position up to a row's last recorded one (BOS included, right pads not).

    ``mask`` (recorded positions) excludes BOS as well as padding; padding is always at the
    end of a row.
    """
    return np.flip(np.logical_or.accumulate(np.flip(mask, 1), axis=1), 1).astype(np.int64)


@dataclass(frozen=True)
class Batch:
    """Token rows for one forward: ``rows`` index the flattened ``[B * S]`` batch, ``positions``
    are their flat corpus positions (``sequence * seq_len + t``)."""

    input_ids: torch.Tensor  # int64 [B, S]
    attention: torch.Tensor  # int64 [B, S]
    rows: np.ndarray  # int64 [T]
    positions: np.ndarray  # int64 [T]


def batches(tokens: np.ndarray, mask: np.ndarray, first_sequence: int, batch_size: int
            ) -> Iterator[Batch]:  # fmt: skip
    """The batches of a block of corpus rows that hold at least one recorded token."""
    seq_len = tokens.shape[1]
    for a in range(0, len(tokens), batch_size):
        m = mask[a : a + batch_size]
        rows = np.flatnonzero(m.reshape(-1))
        if len(rows):
            yield Batch(torch.from_numpy(tokens[a : a + batch_size].astype(np.int64)),
                        torch.from_numpy(attention_mask(m)), rows,
                        (first_sequence + a) * seq_len + rows)  # fmt: skip


@dataclass(frozen=True)
class Rows:
    """The recorded rows of a batch and their flat corpus positions, on the device (for
    kernels) and on the host (for lookups), both int64 ``[T]``."""

    index: torch.Tensor
    positions: torch.Tensor
    index_host: np.ndarray
    positions_host: np.ndarray

    @classmethod
    def of(cls, index: np.ndarray, positions: np.ndarray,
           device: torch.device | str = "cpu") -> Rows:  # fmt: skip
        index = np.ascontiguousarray(index, np.int64)
        positions = np.ascontiguousarray(positions, np.int64)
        return cls(to_device(index, device), to_device(positions, device), index, positions)


# ---------------------------------------------------------------------------- consumers


class Consumer:
    """One analysis fed by the activation pass (see the module docstring)."""

    sites: tuple[Site, ...] = ()

    def update(self, acts: Sequence[torch.Tensor], rows: Rows) -> None:
        raise NotImplementedError

    def state(self) -> Any:
        raise NotImplementedError

    @staticmethod
    def merge(states: Sequence[Any]) -> Any:
        raise NotImplementedError


class NeuronStats(Consumer):
    """Moments, min/max, activation frequency, histogram and top-k of every neuron of a site."""

    def __init__(self, site: Site, d: int, k: int, spec: HistSpec,
                 device: torch.device | str = "cpu", backend: str = "auto"):  # fmt: skip
        self.sites = (site,)
        self.acc = NeuronAccumulator(d, k, spec, device, backend)

    def update(self, acts, rows) -> None:  # noqa: ANN001
        self.acc.update_rows(acts[0], rows.index, rows.positions)

    def state(self) -> StatsPartial:
        return self.acc.partial()

    merge = staticmethod(merge_partials)
    finalize = staticmethod(finalize)


class ShardTokens:
    """What the counters need to know of a shard's rows: the token at, and before, each flat
    corpus position, its position bucket and its corpus source."""

    def __init__(self, tokens: np.ndarray, first_sequence: int, sources: np.ndarray,
                 buckets: np.ndarray, prepend_bos: bool):  # fmt: skip
        self.tokens = np.asarray(tokens, np.int64)  # [rows, seq_len] of the shard
        self.seq_len = self.tokens.shape[1]
        self.first = first_sequence * self.seq_len
        self.sources = np.asarray(sources)  # [rows]
        self.buckets = np.asarray(buckets, np.int64)  # [seq_len]
        self.prepend_bos = prepend_bos

    def lookup(self, positions: np.ndarray) -> tuple[np.ndarray, ...]:
        """(token, previous token or -1, bucket, source) of flat corpus positions."""
        local = positions - self.first
        flat = self.tokens.reshape(-1)
        t = local % self.seq_len
        prev = np.where(t > 0, flat[np.maximum(local - 1, 0)], -1)
        return flat[local], prev, self.buckets[t], self.sources[local // self.seq_len]


class NeuronCounters(Consumer):
    """Firing counts per position bucket and source, and trigger-token and bigram summaries
    of every neuron of a site (``ops.taxonomy``)."""

    def __init__(self, site: Site, d: int, shard: ShardTokens, sources: int, m: int,
                 threshold: float | np.ndarray, device: torch.device | str = "cpu"):  # fmt: skip
        self.sites = (site,)
        self.shard = shard
        if shard.tokens.size and int(shard.tokens.max()) >= BIGRAM_BASE:
            raise ConfigError(f"token id {int(shard.tokens.max())} is too large for the taxonomy's "
                              f"bigram ids (< {BIGRAM_BASE}); set record.taxonomy: null")  # fmt: skip
        n_buckets = int(shard.buckets.max()) + 1
        self.acc = CountersAccumulator(d, n_buckets, sources, m, threshold, device)

    @torch.no_grad()
    def update(self, acts, rows) -> None:  # noqa: ANN001
        self.acc.update(acts[0], *self.shard.lookup(rows.positions_host), rows=rows.index_host)

    def state(self) -> CountersPartial:
        return self.acc.partial()

    merge = staticmethod(merge_counters)


class FiringProbe(Consumer):
    """The per-neuron ``q``-quantile of a site's activations over the first ``max_rows``
    recorded tokens it sees: the firing threshold of neurons without a natural zero."""

    def __init__(self, site: Site, q: float, max_rows: int):
        self.sites = (site,)
        self.q, self.max_rows, self.parts, self.n = q, max_rows, HostRows(), 0

    @torch.no_grad()
    def update(self, acts, rows) -> None:  # noqa: ANN001
        if self.n < self.max_rows:
            take = rows.index[: self.max_rows - self.n]
            self.parts.add(acts[0].index_select(0, take).float())
            self.n += len(take)

    def state(self) -> np.ndarray:
        x = torch.cat(self.parts.read()).double().numpy()
        return np.quantile(x, self.q, axis=0)


class FeatureStats(Consumer):
    """Neuron-style statistics of dictionary features: ``encode([T, d]) -> [T, n]`` per token."""

    def __init__(self, site: Site, encode: Callable[[torch.Tensor], torch.Tensor], n: int,
                 k: int, spec: HistSpec, device: torch.device | str = "cpu", name: str = ""):  # fmt: skip
        self.sites = (site,)
        self.encode, self.name = encode, name
        self.acc = NeuronAccumulator(n, k, spec, device)

    @torch.no_grad()
    def update(self, acts, rows) -> None:  # noqa: ANN001
        x = acts[0].index_select(0, rows.index).float()
        self.acc.update(self.encode(x), rows.positions)

    def state(self) -> StatsPartial:
        return self.acc.partial()

    merge = staticmethod(merge_partials)
    finalize = staticmethod(finalize)


class ActivationSample(Consumer):
    """The raw activations (float16) at chosen corpus ``positions`` (sorted; -1 = empty slot).

    The state is one row per slot, in slot order: zeros where a slot is empty.
    """

    def __init__(self, site: Site, d: int, positions: np.ndarray):
        self.sites = (site,)
        self.want = np.asarray(positions, np.int64)
        self.d = d
        self.slots: list[np.ndarray] = []
        self.rows = HostRows()

    def update(self, acts, rows) -> None:  # noqa: ANN001
        pos = rows.positions_host
        slot = np.flatnonzero(np.isin(self.want, pos) & (self.want >= 0))
        if len(slot):
            take = rows.index_host[np.searchsorted(pos, self.want[slot])]
            self.slots.append(slot)
            self.rows.add(acts[0].index_select(0, to_device(take, acts[0].device))
                          .to(torch.float16))  # fmt: skip

    def state(self) -> np.ndarray:
        out = np.zeros((len(self.want), self.d), np.float16)
        for slot, x in zip(self.slots, self.rows.read(), strict=True):
            out[slot] = x.numpy()
        return out

    @staticmethod
    def merge(states: Sequence[np.ndarray]) -> np.ndarray:
        return np.concatenate(list(states))


class ActivationFeed(Consumer):
    """Every recorded row of a site, in corpus order, as float16 (the streamed SAE's input)."""

    def __init__(self, site: Site):
        self.sites = (site,)
        self.parts = HostRows()
        self.width = 0

    def update(self, acts, rows) -> None:  # noqa: ANN001
        self.width = acts[0].shape[-1]
        self.parts.add(acts[0].index_select(0, rows.index).to(torch.float16))

    def state(self) -> np.ndarray:
        parts = self.parts.read()
        if not parts:
            return np.zeros((0, self.width), np.float16)
        return torch.cat(parts).numpy()

    @staticmethod
    def merge(states: Sequence[np.ndarray]) -> np.ndarray:
        return np.concatenate(list(states))


class TileMoments(Consumer):
    """Co-moments of model pairs (and within-layer covariances) over every batch it is fed:
    ``ops.correlation.FamilyMoments``, read as a joint consumer of all its sites (a worker
    keeps one across the shards of its unit)."""

    def __init__(self, acc: FamilyMoments):
        self.acc = acc
        self.sites = acc.sites

    def update(self, acts, rows) -> None:  # noqa: ANN001
        # a joint consumer: ``acts`` are gathered float32 rows (see the module docstring)
        self.acc.update(dict(zip(self.sites, acts, strict=True)))

    def state(self) -> dict[str, np.ndarray]:
        return self.acc.raw()


# ---------------------------------------------------------------------------- the pass


@dataclass
class PassCount:
    """What a pass cost: recorded tokens (per model) and model forwards (over all models)."""

    tokens: int = 0
    forward_passes: int = 0

    def add(self, o: PassCount) -> None:
        self.tokens += o.tokens
        self.forward_passes += o.forward_passes


class ActivationPass:
    """Runs ``models`` (fed the same tokens) once per batch and feeds ``consumers``.

    Each model runs only up to the deepest layer its consumers read. A consumer whose sites
    is one site is called from the hook; one reading several is called after the last model
    has run the batch, with the gathered rows of its sites.
    """

    def __init__(self, models: Sequence[LoadedModel]):
        if not models:
            raise ConfigError("ActivationPass needs at least one model")
        self.models = list(models)
        self.device = self.models[0].device

    def run(self, batches_: Iterator[Batch] | Sequence[Batch],
            consumers: Sequence[Consumer]) -> PassCount:  # fmt: skip
        """Feed every batch to ``consumers``; returns the tokens and forwards it took."""
        count = PassCount()
        local: dict[Site, list[Consumer]] = {}
        joint: list[Consumer] = []
        for c in consumers:
            if len(c.sites) == 1:
                local.setdefault(c.sites[0], []).append(c)
            else:
                joint.append(c)
        layers: dict[int, set[int]] = {}
        for c in consumers:
            for m, layer in c.sites:
                layers.setdefault(m, set()).add(layer)
        cur: dict[str, Rows] = {}
        views: dict[Site, torch.Tensor] = {}
        keep = {s for c in joint for s in c.sites}

        def hook_for(m: int) -> Callable[[int, torch.Tensor], None]:
            def on_act(layer: int, act: torch.Tensor) -> None:
                flat = act.reshape(-1, act.shape[-1])
                for c in local.get((m, layer), ()):
                    c.update((flat,), cur["rows"])
                if (m, layer) in keep:
                    views[(m, layer)] = flat.index_select(0, cur["rows"].index).float()

            return on_act

        with ExitStack() as hooks:
            for m in sorted(layers):
                hooks.enter_context(capture_mlp(self.models[m], sorted(layers[m]), hook_for(m)))
            for b in batches_:
                cur["rows"] = Rows.of(b.rows, b.positions, self.device)
                for m in sorted(layers):
                    forward_until(self.models[m], b.input_ids, b.attention, max(layers[m]))
                    count.forward_passes += 1
                for c in joint:
                    c.update(tuple(views[s] for s in c.sites), cur["rows"])
                views.clear()
                count.tokens += len(b.rows)
        return count
