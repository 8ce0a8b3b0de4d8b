"""The engine's distributed side: one worker actor, one bounded pool, one stage runner.

    token shards ─► PassWorker (Ray actor: holds the stage's model[s], one per GPU / CPU slot)
                      ops.engine.ActivationPass: one forward per batch ─► the stage's consumers
                      stage.persist: partials to the atlas's _work, small results back
    run_stage (driver, inside a Prefect task): content key · manifest · resume · progress ·
                      ordered merge · cleanup · run accounting

A :class:`Stage` declares what is special about it (its models, the consumers a shard
needs, what a worker persists, how the driver merges); everything else is done here, the
same way for every stage. A new analysis is a consumer (``ops``) plus a stage declaration.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import ray
import torch
from tqdm.auto import tqdm

from flows.config import ModelConfig, ResourcesConfig
from ops.engine import ActivationPass, Consumer, batches
from ops.errors import ConfigError, NeuronmapError
from ops.models import LoadedModel, load_model
from storage.atlas import Atlas, AtlasError
from storage.location import storage_env
from storage.store import Store


def ensure_ray(address: str | None, workers: int) -> None:
    """Connect to ``address``/``$RAY_ADDRESS``, or start an in-process local cluster."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        token_auth()
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=True)
    else:
        ray.init(num_cpus=max(os.cpu_count() or 1, workers), include_dashboard=False,
                 ignore_reinit_error=True, log_to_driver=True)  # fmt: skip


def token_auth() -> bool:
    """Send this machine's Ray token to the cluster about to be reached, when there is one.

    Ray (2.5x-2.60) starts clusters with token authentication on once a token exists
    (``~/.ray/auth_token``, ``$RAY_AUTH_TOKEN_PATH`` or ``$RAY_AUTH_TOKEN``), but a driver or
    Jobs API client given an explicit address sends its token only under
    ``RAY_AUTH_MODE=token``: without it, ``ray.init`` retries ``InvalidAuthToken`` for ~45 s
    and fails. So, unless ``RAY_AUTH_MODE`` says otherwise, a token found turns the mode on
    for this process (a cluster without token auth ignores the token). Returns whether
    token auth is on."""
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is not None:
        return mode.lower() == "token"
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:  # a Ray without token auth
        return False
    quiet = logging.getLogger("ray._private.authentication.authentication_token_setup")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its "enabled for this Ray cluster" warning is not news
    try:
        return bool(maybe_enable_token_auth_if_token_available(warn_if_disabled=False))
    except ray.exceptions.AuthenticationError as e:  # e.g. RAY_AUTH_TOKEN_PATH names no file
        raise ConfigError(f"Ray token: {str(e).split('. Note:')[0]}") from None
    finally:
        quiet.setLevel(level)


def worker_env() -> dict[str, Any]:
    """Ray options handing this process's object-store settings (credentials, endpoint:
    ``storage.location.STORAGE_ENV``) to a task or actor, so that workers on any node reach
    the atlas the driver reaches. Empty when there are none (a local atlas)."""
    env = storage_env()
    return {"runtime_env": {"env_vars": env}} if env else {}


def worker_model(model: ModelConfig, device: str | None = None) -> LoadedModel:
    """A job model loaded in a worker (no tokenizer, no per-load progress bar: one bar per
    worker per load is noise in the driver)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    return load_model(model.source, dtype=model.dtype, device=device, revision=model.revision,
                      with_tokenizer=False)  # fmt: skip


# ------------------------------------------------------------------ stages


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


@ray.remote
class PassWorker:
    """The one worker actor: holds a stage's models and runs its shards through one pass."""

    def __init__(self, stage: Stage, atlas_path: str, device: str, threads: int | None):
        if threads:
            torch.set_num_threads(threads)
        self.stage = stage
        self.failed: Exception | None = None
        # Bad input met while setting up (a model that does not load, a stage setup that
        # refuses it, an unreadable atlas) is reported by ready() as itself: raised here it
        # would kill the actor, and Ray would restart it and Prefect retry the task, only to
        # end in an ActorDiedError that hides the message.
        try:
            self.models = [worker_model(m, device) for m in stage.models]
            self.setup = stage.setup(self.models) if stage.setup is not None else None
            self.atlas = Store.open(atlas_path)
        except (NeuronmapError, AtlasError) as e:
            self.failed = e
            return
        self.engine = ActivationPass(self.models)
        dev = self.models[0].device
        name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else ""
        self.where = {"node": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
                      "host": socket.gethostname(),
                      "device": f"{dev} ({name})" if name else str(dev)}  # fmt: skip

    def ready(self) -> dict[str, Any]:
        if self.failed is not None:
            raise self.failed
        return self.where

    def run(self, shard: int) -> dict[str, Any]:
        tokens, mask = self.atlas.read_shard(shard)
        first, _ = self.atlas.shard_ranges()[shard]
        ctx = Shard(shard, self.atlas, self.models, self.setup)
        consumers = self.stage.build(ctx)
        held = list(self.unit_state.consumers) if self.unit is not None else []
        count = self.engine.run(batches(tokens, mask, first, self.stage.batch_size),
                                consumers + held)  # fmt: skip
        out = self.stage.persist(ctx, consumers) if consumers else {}
        return {"shard": shard, "tokens": count.tokens, "forward_passes": count.forward_passes,
                **self.where, **out}  # fmt: skip

    # a unit: state held across shards (Stage.span)
    unit: Unit | None = None
    unit_state: Any = None

    def begin(self, unit: Unit) -> int:
        """Open ``unit`` (from its checkpoint, if any); returns how many of its shards the
        state already holds."""
        assert self.stage.span is not None
        ctx = Shard(-1, self.atlas, self.models, self.setup)
        self.unit, self.unit_state = unit, self.stage.span.open(ctx, unit)
        return self.stage.span.restore(ctx, unit, self.unit_state)

    def checkpoint(self, cursor: int) -> None:
        assert self.stage.span is not None and self.unit is not None
        self.stage.span.save(Shard(-1, self.atlas, self.models, self.setup), self.unit,
                             self.unit_state, cursor)  # fmt: skip

    def end(self) -> dict[str, Any]:
        assert self.stage.span is not None and self.unit is not None
        out = self.stage.span.close(Shard(-1, self.atlas, self.models, self.setup), self.unit,
                                    self.unit_state)  # fmt: skip
        self.unit = self.unit_state = None
        return {**out, **self.where}


# ------------------------------------------------------------------ bounded scheduling


def get(refs: Any) -> Any:
    """``ray.get``, with a user error raised in a worker re-raised as itself: one clear line
    in the CLI, and never retried by Prefect (a Ray-wrapped copy would print the remote
    traceback)."""
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, NeuronmapError | AtlasError):
            raise e.cause from None
        raise


RESTART_WAIT_S = 600.0
"""How long a pool whose every worker was lost waits for one to come back (a restarted
actor loads its model first) before the stage fails."""

PROBE_EVERY_S = 2.0
"""How often a lost worker that Ray is restarting is asked again whether it is back."""

LOST = (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError)
"""What a lost worker (its process or its node) leaves a pending result with."""


class WorkersLost(RuntimeError):
    """Every worker of a pool is gone and none came back: retryable (Prefect retries the task,
    which resumes from the manifest)."""


def bounded(items: Sequence[Any], submit: Callable[[int, Any], Any], slots: int,
            per_slot: int = 1, ordered: bool = False,
            revive: Callable[[int], Any] | None = None) -> Iterator[tuple[Any, Any]]:  # fmt: skip
    """Run ``submit(slot, item) -> ObjectRef`` for every item with at most ``per_slot`` refs
    in flight per slot, and yield ``(item, result)`` as results land (``ordered``: in the
    order of ``items``; results waiting for an earlier item count against the same budget,
    so a consumer of large results holds a bounded number of them). Closing the generator
    cancels what is still in flight.

    With ``revive`` (slot -> ObjectRef that resolves once the slot's worker is up again), a
    lost worker does not fail the run: its items go back to the queue and run on the slots
    that are up (items must be idempotent), and the slot takes work again once ``revive``
    resolves (asked every :data:`PROBE_EVERY_S` while Ray restarts it). A worker that cannot
    come back (no restarts left), or whose restart Ray cannot place on what is left of the
    cluster, leaves the others to finish. Only when no slot is up for :data:`RESTART_WAIT_S`
    does the run fail (:class:`WorkersLost`)."""
    budget = slots * per_slot
    todo = list(enumerate(items))  # (index, item), kept in index order
    inflight: dict[Any, tuple[int, int]] = {}  # ref -> (slot, index)
    load = [0] * slots
    up = [True] * slots
    probes: dict[Any, int] = {}  # revive ref -> slot
    due: dict[int, float] = {}  # slot -> when to ask it again
    waiting: dict[int, Any] = {}
    next_out = 0
    lost: Exception | None = None
    none_up_since: float | None = None
    log = logging.getLogger("neuronmap")
    try:
        while todo or inflight:
            for s in range(slots):
                # in order, the item everything waits for is sent even over the budget
                while up[s] and todo and load[s] < per_slot and (
                        len(inflight) + len(waiting) < budget or todo[0][0] == next_out):  # fmt: skip
                    j, item = todo.pop(0)
                    inflight[submit(s, item)] = (s, j)
                    load[s] += 1
            now = time.monotonic()
            for s, t in list(due.items()):
                if t <= now:
                    del due[s]
                    assert revive is not None
                    probes[revive(s)] = s
            if any(up):
                none_up_since = None
            else:
                if not probes and not due:
                    raise WorkersLost(f"every worker was lost and none can restart: {lost}")
                none_up_since = none_up_since or now
                if now - none_up_since > RESTART_WAIT_S:
                    raise WorkersLost(f"every worker was lost and none came back within "
                                      f"{RESTART_WAIT_S:.0f} s: {lost}")  # fmt: skip
            timeout = max(0.0, min(due.values()) - now) if due else None
            if not inflight and timeout is None:
                timeout = PROBE_EVERY_S  # only probes pending: check the deadline now and then
            pending = [*inflight, *probes]
            if not pending:  # only probes to send again, later
                time.sleep(timeout or 0)
                continue
            ready, _ = ray.wait(pending, num_returns=1, timeout=timeout)
            if not ready:
                continue
            ref = ready[0]
            if ref in probes:
                s = probes.pop(ref)
                try:
                    get(ref)
                except ray.exceptions.ActorUnavailableError:  # restarting, or not yet placed
                    due[s] = time.monotonic() + PROBE_EVERY_S
                except LOST as e:  # it will not come back
                    lost = e
                    log.warning("worker %d cannot be restarted: %s", s, e)
                else:
                    up[s] = True
                    log.warning("worker %d is back", s)
                continue
            s, j = inflight.pop(ref)
            load[s] -= 1
            try:
                out = get(ref)
            except LOST as e:
                if revive is None:
                    raise
                lost = e
                bisect.insort(todo, (j, items[j]), key=lambda t: t[0])
                if up[s]:
                    up[s] = False
                    log.warning("worker %d was lost (%s); its shards go to the others",
                                s, type(e).__name__)  # fmt: skip
                    probes[revive(s)] = s
                continue
            if not ordered:
                yield items[j], out
                continue
            waiting[j] = out
            while next_out in waiting:
                yield items[next_out], waiting.pop(next_out)
                next_out += 1
    finally:
        for ref in [*inflight, *probes]:
            with contextlib.suppress(Exception):
                ray.cancel(ref)  # actors are killed by their owner; this drops queued work


def placeable(n: int, gpus: bool, scale_down: bool) -> int:
    """How many one-CPU (or one-GPU) worker actors to start: ``n``, checked against what the
    cluster has before any work is queued (an actor that can never be placed would leave the
    stage waiting at 0 shards forever). Fewer, with a warning, under ``scale_down``."""
    kind = "GPU" if gpus else "CPU"
    have = int(ray.cluster_resources().get(kind, 0))
    if n <= have:
        return n
    if scale_down and have >= 1:
        logging.getLogger("neuronmap").warning(
            "the Ray cluster has %d %ss: running %d workers instead of %d", have, kind, have, n
        )
        return have
    raise ConfigError(
        f"field 'resources.workers': {n} workers need {n} {kind}s but the Ray cluster has "
        f"{have}; lower resources.workers (--workers), add nodes, or set "
        "resources.scale_down: true to run with what fits"
    )


def iter_stage(stage: Stage, atlas_path: str, shards: Sequence[int],
               resources: ResourcesConfig, ordered: bool = False) -> Iterator[dict[str, Any]]:  # fmt: skip
    """Run ``shards`` of ``stage`` on ``resources.workers`` :class:`PassWorker` actors and yield
    each shard's result as it lands (``ordered``: in the order of ``shards``). Closing the
    generator stops the actors."""
    if not shards:
        return
    actors = start_workers(stage, atlas_path, len(shards), resources)
    try:
        submit = lambda s, shard: actors[s].run.remote(shard)  # noqa: E731
        revive = lambda s: actors[s].ready.remote()  # noqa: E731
        for _, out in bounded(shards, submit, len(actors), resources.inflight_per_worker,
                              ordered, revive=revive):  # fmt: skip
            yield out
    finally:
        for a in actors:
            ray.kill(a)


def use_gpus(resources: ResourcesConfig) -> bool:
    """Whether workers take a GPU each: ``resources.gpus``, where "auto" = the Ray cluster
    has GPUs (Ray must be up)."""
    if resources.gpus == "auto":
        return ray.cluster_resources().get("GPU", 0) >= 1
    return bool(resources.gpus)


def placement(resources: ResourcesConfig) -> tuple[dict[str, Any], str]:
    """Ray options and device of a one-off worker task or actor (SAE training, SNMF): one
    GPU where workers take GPUs, else one CPU."""
    gpus = use_gpus(resources)
    return {"num_cpus": 1, "num_gpus": 1 if gpus else 0, **worker_env()}, "cuda" if gpus else "cpu"


def start_workers(stage: Stage, atlas_path: str, items: int, resources: ResourcesConfig
                  ) -> list[Any]:  # fmt: skip
    """Start ``min(resources.workers, items)`` :class:`PassWorker` actors (checked against the
    cluster) and wait until their models are loaded; a setup error is raised as itself."""
    ensure_ray(resources.ray_address, resources.workers)
    gpus = use_gpus(resources)
    n = placeable(max(1, min(resources.workers, items)), gpus, resources.scale_down)
    opts: dict[str, Any] = {
        # Ray restarts a crashed worker where it fits; its shards are not retried on it (that
        # would wait for a restart that a smaller cluster may never place): the pool sends
        # them to the workers that are up (a shard is idempotent) and takes the restarted
        # worker back once its model is loaded.
        "max_restarts": resources.max_restarts,
        "max_task_retries": 0,
        "num_cpus": 1,
        "num_gpus": 1 if gpus else 0,
        "scheduling_strategy": "SPREAD",  # over the nodes: one node lost costs one worker
    }
    device, threads = ("cuda", None) if gpus else ("cpu", 1)
    actors = [PassWorker.options(**opts, **worker_env()).remote(stage, atlas_path, device, threads)
              for _ in range(n)]  # fmt: skip
    try:
        get([a.ready.remote() for a in actors])  # surface load errors before queueing work
    except BaseException:
        for a in actors:
            ray.kill(a)
        raise
    return actors


# ------------------------------------------------------------------ accounting


@dataclass
class Accounting:
    """Tokens, forwards, seconds and placement of one stage run (part of the atlas)."""

    stage: str
    tokens: int = 0
    forward_passes: int = 0
    workers: dict[str, dict[str, Any]] = field(default_factory=dict)
    corpus_tokens: int | None = None
    _t0: float = field(default_factory=time.perf_counter, repr=False)

    def add(self, out: dict[str, Any]) -> None:
        self.tokens += int(out.get("tokens", 0))
        self.forward_passes += int(out.get("forward_passes", 0))
        if "node" in out:
            w = self.workers.setdefault(f"{out['node']}/{out.get('pid', '')}/{out['device']}", {
                "node": out["node"], "host": out.get("host"), "device": out["device"],
                "shards": []})  # fmt: skip
            if "shard" in out:
                w["shards"].append(int(out["shard"]))

    def elapsed(self) -> float:
        return max(time.perf_counter() - self._t0, 1e-9)

    def to_dict(self) -> dict[str, Any]:
        seconds = self.elapsed()
        out = {"stage": self.stage, "tokens": self.tokens, "forward_passes": self.forward_passes,
               "seconds": round(seconds, 3), "tokens_per_s": round(self.tokens / seconds, 1),
               "workers": [dict(w, shards=sorted(w["shards"])) for w in self.workers.values()]}  # fmt: skip
        if self.corpus_tokens:
            # how many times this stage ran the corpus through each of its models
            out["passes_per_token"] = round(self.tokens / self.corpus_tokens, 4)
        return out


@dataclass(frozen=True)
class Ledger:
    """Where a job's run accounting goes: the root atlas (also for its families) and the run."""

    atlas: str
    run: str

    def record(self, entry: dict[str, Any]) -> None:
        Store.open(self.atlas).record_stage(self.run, entry)


# ------------------------------------------------------------------ the runner


def run_logger() -> logging.LoggerAdapter | None:
    """Prefect's logger of the current flow or task run (what it logs shows in the Prefect UI
    and API), or None outside a run."""
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return None


class StageRun:
    """One run of a stage: iterate it to get each shard's result as it lands (``ordered``:
    in shard order), or call :meth:`finish` to run it to the end. Shards already in the
    manifest under the stage's key are skipped; each finished shard is marked at once, so a
    killed run resumes shard by shard. Once every shard is done the driver merges (shard
    order), marks the stage complete, drops its partials and records what it cost; the
    result is then in :attr:`summary` (``{"skipped": True}`` for a stage already complete).
    """

    def __init__(self, stage: Stage, atlas_path: str, resources: ResourcesConfig,
                 ledger: Ledger | None = None, ordered: bool = False):  # fmt: skip
        self.stage, self.path, self.resources = stage, atlas_path, resources
        self.ledger, self.ordered = ledger, ordered
        self.summary: dict[str, Any] | None = None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        stage = self.stage
        atlas = Store.open(self.path)
        entry = atlas.done(stage.name)
        same = entry.get("fingerprint") == stage.key
        if same and entry.get("complete"):
            self.summary = {"skipped": True}
            return
        n_shards = len(atlas.shard_ranges())
        done = set(entry.get("shards", [])) if same else set()
        todo = [s for s in range(n_shards) if s not in done]
        acct = Accounting(stage.name, corpus_tokens=int(atlas.corpus.attrs["n_tokens"]))
        bar = tqdm(total=len(todo), desc=stage.description or stage.name, unit="shard")
        log = run_logger()  # the bar goes to stderr only; these lines reach Prefect's logs
        try:
            for i, out in enumerate(iter_stage(stage, self.path, todo, self.resources,
                                               self.ordered), 1):  # fmt: skip
                atlas.mark(stage.name, stage.key, [out["shard"]])
                acct.add(out)
                bar.update(1)
                bar.set_postfix(tok_s=f"{acct.tokens / acct.elapsed():,.0f}")
                if log is not None:
                    log.info("%s: shard %d/%d done (%s tok/s)", stage.name,
                             n_shards - len(todo) + i, n_shards,
                             f"{acct.tokens / acct.elapsed():,.0f}")  # fmt: skip
                yield out
        except BaseException as e:
            # What this attempt did is part of the run; a retry (Prefect's, or --resume)
            # accounts only the shards it runs itself, so no shard is counted twice.
            if self.ledger is not None and acct.tokens:
                self._record(acct.to_dict() | {"interrupted": type(e).__name__})
            raise
        finally:
            bar.close()
        missing = sorted(set(range(n_shards)) - set(atlas.done(stage.name).get("shards", [])))
        if missing:
            raise AtlasError(f"stage {stage.name}: shards {missing[:10]} were not recorded")
        result = stage.merge(atlas) if stage.merge is not None else {}
        atlas.mark(stage.name, stage.key, complete=True)
        for w in stage.work:
            atlas.drop_partials(w)
        entry = acct.to_dict()
        if self.ledger is not None and todo:
            self.ledger.record(entry)
        self.summary = {"accounting": entry, **result}

    def _record(self, entry: dict[str, Any]) -> None:
        assert self.ledger is not None
        try:
            self.ledger.record(entry)
        except Exception as e:  # never hides the error that ended the attempt
            logging.getLogger("neuronmap").warning("run accounting not recorded: %s", e)

    def finish(self) -> dict[str, Any]:
        for _ in self:
            pass
        assert self.summary is not None
        return self.summary


def run_stage(stage: Stage, atlas_path: str, resources: ResourcesConfig,
              ledger: Ledger | None = None) -> dict[str, Any]:  # fmt: skip
    """Run ``stage`` to the end (see :class:`StageRun`) and return its summary."""
    return StageRun(stage, atlas_path, resources, ledger).finish()


def stream_stage(stage: Stage, atlas_path: str, order: Iterable[int],
                 resources: ResourcesConfig, ledger: Ledger | None = None
                 ) -> Iterator[dict[str, Any]]:  # fmt: skip
    """A stage the driver consumes in shard order as it runs, with no manifest: the consumer
    keeps its own resume point (a streamed SAE's checkpoint). Accounted when it ends."""
    atlas = Atlas.open(atlas_path)
    acct = Accounting(stage.name, corpus_tokens=int(atlas.corpus.attrs["n_tokens"]))
    try:
        for out in iter_stage(stage, atlas_path, list(order), resources, ordered=True):
            acct.add(out)
            yield out
    finally:
        if ledger is not None and acct.tokens:
            ledger.record(acct.to_dict())


# ------------------------------------------------------------------ units (state across shards)


@dataclass
class _Slot:
    actor: Any
    unit: int | None = None  # index into the units
    cursor: int = 0  # shards of the unit the worker's state holds
    ref: Any = None
    what: str = ""  # begin | run | checkpoint | end
    since_ckpt: int = 0
    ckpt_t: float = 0.0
    up: bool = True


def run_units(stage: Stage, atlas_path: str, units: Sequence[Unit], resources: ResourcesConfig,
              ledger: Ledger | None = None) -> dict[str, Any]:  # fmt: skip
    """Run ``units`` of a stage with a :class:`Span`: each on one worker, its shards in order
    into state the worker holds, checkpointed on the span's interval, closed on the worker
    (``close`` persists what the driver needs later: a resumed run skips finished units).
    Returns ``{"units": close results of the units run now by index, "accounting": what this
    run of the stage cost (None when every unit was done)}``.

    Units finished under the stage's key are skipped (the manifest lists them); an
    unfinished one resumes from its checkpoint. A lost worker's unit goes back to the queue
    and resumes from its checkpoint on the next free worker; the stage fails only when every
    worker is lost (:class:`WorkersLost`)."""
    span = stage.span
    assert span is not None
    atlas = Store.open(atlas_path)
    entry = atlas.done(stage.name)
    same = entry.get("fingerprint") == stage.key
    done_units = set(entry.get("shards", [])) if same else set()
    results: dict[int, dict[str, Any]] = {}
    todo = [i for i in range(len(units)) if i not in done_units]
    if not todo:
        return {"units": results, "accounting": None}
    acct = Accounting(stage.name, corpus_tokens=int(atlas.corpus.attrs["n_tokens"]))
    bar = tqdm(total=sum(len(units[i].shards) for i in todo),
               desc=stage.description or stage.name, unit="shard")  # fmt: skip
    log = run_logger()
    slots = [_Slot(a) for a in start_workers(stage, atlas_path, len(todo), resources)]

    def send(s: _Slot, what: str, *args: Any) -> None:
        s.what, s.ref = what, getattr(s.actor, what).remote(*args)

    def next_call(s: _Slot) -> None:
        u = units[s.unit]
        if s.cursor >= len(u.shards):
            send(s, "end")
            return
        due = (span.every_shards is not None and s.since_ckpt >= span.every_shards) or (
            span.every_s is not None and time.monotonic() - s.ckpt_t >= span.every_s
        )
        if due and s.since_ckpt:
            send(s, "checkpoint", s.cursor)
        else:
            send(s, "run", u.shards[s.cursor])

    try:
        while todo or any(s.unit is not None for s in slots):
            for s in slots:
                if s.up and s.unit is None and todo:
                    s.unit, s.cursor, s.since_ckpt, s.ckpt_t = todo.pop(0), 0, 0, time.monotonic()
                    send(s, "begin", units[s.unit])
            busy = [s for s in slots if s.unit is not None]
            if not busy:
                raise WorkersLost("every worker was lost")
            ready, _ = ray.wait([s.ref for s in busy], num_returns=1)
            s = next(x for x in busy if x.ref == ready[0])
            try:
                out = get(s.ref)
            except LOST as e:
                logging.getLogger("neuronmap").warning(
                    "worker lost during unit %s (%s): it resumes from its checkpoint",
                    units[s.unit].key, type(e).__name__)  # fmt: skip
                todo.insert(0, s.unit)
                s.unit = None
                try:  # a restarted worker takes work again once its models are loaded
                    ray.get(s.actor.ready.remote(), timeout=RESTART_WAIT_S)
                except Exception:
                    s.up = False
                continue
            if s.what == "begin":
                s.cursor = int(out)
                bar.update(s.cursor)
            elif s.what == "run":
                s.cursor += 1
                s.since_ckpt += 1
                acct.add(out)
                bar.update(1)
                bar.set_postfix(tok_s=f"{acct.tokens / acct.elapsed():,.0f}")
                if log is not None:
                    log.info("%s: unit %s, shard %d/%d done", stage.name, units[s.unit].key,
                             s.cursor, len(units[s.unit].shards))  # fmt: skip
            elif s.what == "checkpoint":
                s.since_ckpt, s.ckpt_t = 0, time.monotonic()
            else:  # end
                results[s.unit] = out
                done_units.add(s.unit)
                atlas.mark(stage.name, stage.key, [s.unit])
                s.unit = None
                continue
            next_call(s)
    except BaseException as e:
        if ledger is not None and acct.tokens:
            with contextlib.suppress(Exception):
                ledger.record(acct.to_dict() | {"interrupted": type(e).__name__})
        raise
    finally:
        bar.close()
        for s in slots:
            ray.kill(s.actor)
    entry = acct.to_dict()
    if ledger is not None:
        ledger.record(entry)
    return {"units": results, "accounting": entry}
