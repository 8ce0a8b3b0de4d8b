"""What a sharded stage declares: :class:`Stage` (models, consumers per shard, persist,
merge), :class:`Shard` (what its hooks see on a worker), and for state held across shards,
:class:`Unit` and :class:`Span`.

Declarations only: the runtime (``flows.runtime``) runs them on its workers, the stage runner
(``flows.engine``) drives them. A stage module builds these and imports no other stage.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from flows.config import ModelConfig
from ops.engine import Consumer
from ops.models import LoadedModel
from storage.store import Store


@dataclass
class Shard:
    """What a stage's hooks see of the shard a worker is running."""

    index: int
    atlas: Store
    models: list[LoadedModel]
    setup: Any = None  # what ``Stage.setup`` made once on this worker

    @property
    def device(self) -> torch.device:
        return self.models[0].device


Build = Callable[[Shard], list[Consumer]]
Persist = Callable[[Shard, list[Consumer]], dict[str, Any]]


@dataclass
class Stage:
    """One sharded stage: which models run, which consumers each shard feeds, what persists.

    ``setup`` (once per worker, given the loaded models), ``build`` and ``persist`` run on the
    worker; they are module-level functions or partials of them, shipped once per actor.
    ``persist`` writes the shard's partials into the atlas and returns a small dict for the
    driver (an ordered stage may hand activations to the driver this way). ``merge`` runs in
    the driver once every shard is done: it folds the partials in shard order and writes the
    result; ``work`` names the ``_work`` groups dropped after it. A stage whose manifest entry
    is complete under the same ``key`` is skipped; otherwise only its missing shards run.
    """

    name: str
    key: str
    models: list[ModelConfig]
    build: Build
    persist: Persist
    batch_size: int
    setup: Callable[[list[LoadedModel]], Any] | None = None
    merge: Callable[[Store], dict[str, Any]] | None = None
    work: Sequence[str] = ()
    description: str = ""
    span: Span | None = None


@dataclass
class StageResult:
    """What a run of a sharded stage returns (``flows.engine.run_stage``)."""

    skipped: bool = False
    """The stage was complete under the same key already: nothing ran."""
    accounting: dict[str, Any] | None = None
    """What this run of the stage cost (tokens, forwards, seconds, workers); None when no
    shard ran."""
    merged: dict[str, Any] = field(default_factory=dict)
    """What the stage's ``merge`` returned."""


@dataclass
class UnitsResult:
    """What a run of a stage of units returns (``flows.engine.run_units``)."""

    units: dict[int, dict[str, Any]]
    """The ``close`` result of every unit run now, by index (finished units are skipped)."""
    accounting: dict[str, Any] | None
    """What this run of the stage cost; None when every unit was done already."""


@dataclass
class Rider:
    """A consumer that rides on another stage's pass instead of running one of its own (a
    streamed SAE on the record pass): the pipeline attaches it, the stage it rides on knows
    only this. ``consume`` gets that stage's shard results in shard order, each carrying the
    activations of ``layer`` under ``"acts"``; it may stop early (the stage finishes the rest)."""

    layer: int
    consume: Callable[[Iterator[dict[str, Any]]], None]


@dataclass(frozen=True)
class Unit:
    """Shards one worker runs in order, with state held across them (a :class:`Span`)."""

    key: str  # names the unit's checkpoint; unique within the stage
    shards: tuple[int, ...]
    spec: Any = None  # what the span's hooks are given (e.g. a tile group)


@dataclass
class Span:
    """What a stage keeps across the shards of a :class:`Unit` (the worker's long-lived state:
    co-moments that are too large to persist per shard).

    On the worker: ``open(shard_ctx, unit)`` builds the state (an object with a
    ``consumers`` list fed every batch besides the stage's per-shard consumers);
    ``restore(shard_ctx, unit, state)`` loads the unit's checkpoint into it and returns how
    many of its shards it already holds; ``save(shard_ctx, unit, state, cursor)`` writes an
    atomic checkpoint; ``close(shard_ctx, unit, state)`` ends the unit and returns a small
    result for the driver. A checkpoint is taken every ``every_shards`` shards or
    ``every_s`` seconds, whichever comes first (``None``: never), so a lost worker or a
    killed run loses at most one interval.
    """

    open: Callable[[Shard, Unit], Any]
    restore: Callable[[Shard, Unit, Any], int]
    save: Callable[[Shard, Unit, Any, int], None]
    close: Callable[[Shard, Unit, Any], dict[str, Any]]
    every_shards: int | None = None
    every_s: float | None = 1800.0

