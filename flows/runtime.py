"""The job runtime: who owns the workers, where they run, and the one scheduler.

    Runtime (one per job run)
      backend "ray":   the Ray connection (a local run starts its own instance; a cluster
                       only when an address is named) and `resources.workers` Worker actors,
                       started once and kept until the job ends
      backend "local": one Worker in this process: no Ray, no actors, the same numbers
      Worker:          keeps every model it loads for the whole job (`model_loads` counts
                       them), binds one stage at a time, runs its shards and units, and runs
                       one-off calls (weight properties, SAE training, seeds, SNMF shards)
      bounded():       the one scheduler: at most `inflight_per_worker` items per worker, a
                       lost worker's items go to the others, results in order when asked

Stages never start workers themselves: they ask the runtime of the job they run in
(:func:`current`); outside a job (a test calling a stage directly) a temporary runtime is
made for the call and closed after it.
"""

from __future__ import annotations

import bisect
import contextlib
import inspect
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import ray
import torch

from flows.config import ModelConfig, ResourcesConfig
from flows.plugins import import_plugins
from flows.stage import Shard, Stage, Unit
from ops.engine import ActivationPass, batches
from ops.errors import ConfigError, NeuronmapError
from ops.models import LoadedModel, load_model
from storage.atlas import AtlasError
from storage.location import storage_env
from storage.store import Store

log = logging.getLogger("neuronmap")

# ------------------------------------------------------------------ Ray connection


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


def ensure_ray(address: str | None, workers: int) -> bool:
    """Connect to ``address``/``$RAY_ADDRESS``, or start a local instance of our own; returns
    whether this call started one.

    Without an address a local run never attaches to another Ray instance running on the
    machine (``address="local"``): Ray would otherwise pick "the latest cluster" it finds, and
    refuse the CPU count given for a new one. An address that does not answer is a
    :class:`ConfigError` naming it."""
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        token_auth()
        try:
            ray.init(address=address, ignore_reinit_error=True, log_to_driver=True)
        except (ConnectionError, TimeoutError, ValueError, RuntimeError) as e:
            raise ConfigError(f"field 'resources.ray_address': no Ray cluster answers at "
                              f"{address!r} ({type(e).__name__}: {str(e).splitlines()[0]})") from None  # fmt: skip
        return False
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, workers),
             include_dashboard=False, ignore_reinit_error=True, log_to_driver=True)  # fmt: skip
    return True


def worker_env() -> dict[str, Any]:
    """Ray options handing this process's object-store settings (credentials, endpoint:
    ``storage.location.STORAGE_ENV``) to a task or actor, so that workers on any node reach
    the atlas the driver reaches. Empty when there are none (a local atlas)."""
    env = storage_env()
    return {"runtime_env": {"env_vars": env}} if env else {}


def use_gpus(resources: ResourcesConfig) -> bool:
    """Whether workers take a GPU each: ``resources.gpus``, where "auto" = the Ray cluster
    has GPUs (Ray must be up), or this machine has one (local backend)."""
    if resources.gpus != "auto":
        return bool(resources.gpus)
    if resources.backend == "local":
        return torch.cuda.is_available()
    return ray.cluster_resources().get("GPU", 0) >= 1


def placeable(n: int, gpus: bool, scale_down: bool) -> int:
    """How many one-CPU (or one-GPU) worker actors to start: ``n``, checked against what the
    cluster has before any work is queued (an actor that can never be placed would leave the
    stage waiting at 0 shards forever). Fewer, with a warning, under ``scale_down``."""
    kind = "GPU" if gpus else "CPU"
    have = int(ray.cluster_resources().get(kind, 0))
    if n <= have:
        return n
    if scale_down and have >= 1:
        log.warning("the Ray cluster has %d %ss: running %d workers instead of %d",
                    have, kind, have, n)  # fmt: skip
        return have
    raise ConfigError(
        f"field 'resources.workers': {n} workers need {n} {kind}s but the Ray cluster has "
        f"{have}; lower resources.workers (--workers), add nodes, or set "
        "resources.scale_down: true to run with what fits"
    )


# ------------------------------------------------------------------ the worker


def model_label(m: ModelConfig) -> str:
    """How ``model_loads`` names a loaded model: what was loaded, not the job's name for it."""
    rev = f"@{m.revision}" if m.revision else ""
    return f"{m.source}{rev} ({m.dtype})"


class Worker:
    """One job worker: a Ray actor (``RayWorker``) or, on the local backend, this process.

    It keeps every model it loads until the job ends (one load per model and worker:
    ``model_loads``), runs the shards and units of the stage bound last (:meth:`bind`), one-off
    calls (:meth:`call`) and objects held across calls (:meth:`hold`, :meth:`invoke`)."""

    def __init__(self, device: str, threads: int | None, plugins: Sequence[str] = (),
                 in_ray: bool = True):  # fmt: skip
        self.failed: Exception | None = None
        # Bad input met while starting (a plugin that does not import) is reported by ready()
        # as itself: raised here it would kill the actor, and Ray would restart it, only to end
        # in an ActorDiedError that hides the message.
        try:
            import_plugins(plugins)
        except NeuronmapError as e:
            self.failed = e
        if threads:
            torch.set_num_threads(threads)
        self.device = device
        self.loaded: dict[str, LoadedModel] = {}
        self.loads: dict[str, int] = {}
        self.stores: dict[str, Store] = {}
        self.held: dict[str, Any] = {}
        self.stage: Stage | None = None
        self.unit: Unit | None = None
        self.unit_state: Any = None
        node = ray.get_runtime_context().get_node_id() if in_ray else "local"
        dev = torch.device(device)
        name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else ""
        # where this worker runs, sent with every shard's result: made once
        self.where = {"node": node, "pid": os.getpid(), "host": socket.gethostname(),
                      "device": f"{dev} ({name})" if name else str(dev)}  # fmt: skip

    # -- what it holds

    def model(self, m: ModelConfig) -> LoadedModel:
        """``m`` loaded on this worker's device, once for the whole job."""
        label = model_label(m)
        lm = self.loaded.get(label)
        if lm is None:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # one bar per worker per load is noise
            lm = load_model(m.source, dtype=m.dtype, device=self.device, revision=m.revision,
                            with_tokenizer=False)  # fmt: skip
            self.loaded[label] = lm
            self.loads[label] = self.loads.get(label, 0) + 1
        return lm

    def store(self, path: str) -> Store:
        if path not in self.stores:
            self.stores[path] = Store.open(path)
        return self.stores[path]

    def ready(self) -> dict[str, Any]:
        if self.failed is not None:
            raise self.failed
        return self.where

    def model_loads(self) -> dict[str, Any]:
        return self.where | {"model_loads": dict(self.loads)}

    # -- a stage's shards

    def bind(self, stage: Stage, atlas_path: str) -> dict[str, Any]:
        """Take ``stage`` as the one this worker runs: its models (loaded once per job), its
        setup, the atlas. Bad input (a model that does not load, a setup that refuses it) is
        raised as itself."""
        self.ready()
        self.stage = None
        models = [self.model(m) for m in stage.models]
        self.models = models
        self.setup = stage.setup(models) if stage.setup is not None else None
        self.atlas = self.store(atlas_path)
        self.engine = ActivationPass(models) if models else None
        self.stage = stage
        self.unit = self.unit_state = None
        return self.where

    def _ctx(self, index: int) -> Shard:
        return Shard(index, self.atlas, self.models, self.setup)

    def run(self, shard: int) -> dict[str, Any]:
        stage = self.stage
        assert stage is not None and self.engine is not None, "run before bind"
        tokens, mask = self.atlas.read_shard(shard)
        first, _ = self.atlas.shard_ranges()[shard]
        ctx = self._ctx(shard)
        consumers = stage.build(ctx)
        held = list(self.unit_state.consumers) if self.unit is not None else []
        count = self.engine.run(batches(tokens, mask, first, stage.batch_size), consumers + held)
        out = stage.persist(ctx, consumers) if consumers else {}
        return {"shard": shard, "tokens": count.tokens, "forward_passes": count.forward_passes,
                **self.where, **out}  # fmt: skip

    def begin(self, unit: Unit) -> int:
        """Open ``unit`` (from its checkpoint, if any); returns how many of its shards the
        state already holds."""
        assert self.stage is not None and self.stage.span is not None
        ctx = self._ctx(-1)
        self.unit, self.unit_state = unit, self.stage.span.open(ctx, unit)
        return self.stage.span.restore(ctx, unit, self.unit_state)

    def checkpoint(self, cursor: int) -> None:
        assert self.stage is not None and self.stage.span is not None and self.unit is not None
        self.stage.span.save(self._ctx(-1), self.unit, self.unit_state, cursor)

    def end(self) -> dict[str, Any]:
        assert self.stage is not None and self.stage.span is not None and self.unit is not None
        out = self.stage.span.close(self._ctx(-1), self.unit, self.unit_state)
        self.unit = self.unit_state = None
        return {**out, **self.where}

    # -- one-off work

    def call(self, fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        """``fn(*args, **kwargs)`` in this worker's process (``device=`` its device where
        ``fn`` takes one); the thread count it may set is put back after."""
        self.ready()
        if "device" not in kwargs and "device" in inspect.signature(fn).parameters:
            kwargs = kwargs | {"device": self.device}
        threads = torch.get_num_threads()
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    def hold(self, name: str, factory: Callable[..., Any], args: tuple, kwargs: dict) -> None:
        """Keep ``factory(*args, device=<this worker's device>, **kwargs)`` under ``name``."""
        self.ready()
        self.held[name] = factory(*args, device=self.device, **kwargs)

    def invoke(self, name: str, method: str, args: tuple) -> Any:
        return getattr(self.held[name], method)(*args)

    def release(self, name: str) -> None:
        self.held.pop(name, None)


RayWorker = ray.remote(Worker)


# ------------------------------------------------------------------ local calls as refs


class LocalRef:
    """The result of a call on the local backend, made at once: what ``get`` returns or
    raises. It lets the one scheduler (:func:`bounded`) and the unit runner drive both
    backends."""

    __slots__ = ("error", "value")

    def __init__(self, fn: Callable[[], Any]):
        self.value: Any = None
        self.error: BaseException | None = None
        try:
            self.value = fn()
        except Exception as e:
            self.error = e


def get(refs: Any, timeout: float | None = None) -> Any:
    """``ray.get`` for either backend, with a user error raised in a worker re-raised as
    itself: one clear line in the CLI, and never retried by Prefect (a Ray-wrapped copy would
    print the remote traceback)."""
    if isinstance(refs, LocalRef):
        if refs.error is not None:
            raise refs.error
        return refs.value
    if isinstance(refs, list) and refs and isinstance(refs[0], LocalRef):
        return [get(r) for r in refs]
    try:
        return ray.get(refs, timeout=timeout)
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, NeuronmapError | AtlasError):
            raise e.cause from None
        raise


def wait(refs: list[Any], timeout: float | None = None) -> list[Any]:
    """The refs of ``refs`` that are ready (at least one, unless ``timeout`` passes)."""
    local = [r for r in refs if isinstance(r, LocalRef)]
    if local:
        return local[:1]
    ready, _ = ray.wait(refs, num_returns=1, timeout=timeout)
    return ready


def submit(worker: Any, method: str, *args: Any) -> Any:
    """Call ``method`` of ``worker`` (a Ray actor handle or a local :class:`Worker`)."""
    if isinstance(worker, Worker):
        return LocalRef(lambda: getattr(worker, method)(*args))
    return getattr(worker, method).remote(*args)


# ------------------------------------------------------------------ the one scheduler

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
    """Run ``submit(slot, item) -> ref`` for every item with at most ``per_slot`` refs in
    flight per slot, and yield ``(item, result)`` as results land (``ordered``: in the order
    of ``items``; results waiting for an earlier item count against the same budget, so a
    consumer of large results holds a bounded number of them). Closing the generator cancels
    what is still in flight.

    With ``revive`` (slot -> ref that resolves once the slot's worker is up again), a lost
    worker does not fail the run: its items go back to the queue and run on the slots that
    are up (items must be idempotent), and the slot takes work again once ``revive`` resolves
    (asked every :data:`PROBE_EVERY_S` while Ray restarts it). A worker that cannot come back
    (no restarts left), or whose restart Ray cannot place on what is left of the cluster,
    leaves the others to finish. Only when no slot is up for :data:`RESTART_WAIT_S` does the
    run fail (:class:`WorkersLost`). Refs may be Ray's or :class:`LocalRef` (done at once)."""
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
            ready = wait(pending, timeout=timeout)
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
                    log.warning("worker %d was lost (%s); its work goes to the others",
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
            if not isinstance(ref, LocalRef):
                with contextlib.suppress(Exception):
                    ray.cancel(ref)  # workers belong to the runtime; this drops queued work


# ------------------------------------------------------------------ the runtime

_current: Runtime | None = None
_current_lock = threading.Lock()


def current() -> Runtime | None:
    """The runtime of the job running in this process, if any."""
    return _current


@contextlib.contextmanager
def runtime_for(resources: ResourcesConfig) -> Iterator[Runtime]:
    """The job's runtime when one is running, else a temporary one closed on exit (a stage
    called on its own, outside a job)."""
    rt = _current
    if rt is not None:
        yield rt
        return
    with Runtime(resources) as rt:
        yield rt


class Runtime:
    """What a job run owns: the backend, its workers, and their placement.

    Use as a context manager around the job (``with Runtime(job.resources):``): while it is
    open it is :func:`current`, so every stage of the job shares its workers; on exit the
    workers are stopped, and a local Ray instance the runtime started is shut down."""

    def __init__(self, resources: ResourcesConfig):
        self.resources = resources
        self.backend = resources.backend
        self._workers: list[Any] = []
        self._started_ray = False
        self._rr = 0
        self._held = 0
        self._gpus: bool | None = None

    # -- life

    def __enter__(self) -> Runtime:
        global _current
        self.start()
        with _current_lock:
            self._previous, _current = _current, self
        return self

    def __exit__(self, *exc: Any) -> None:
        global _current
        with _current_lock:
            _current = self._previous
        self.close()

    def start(self) -> None:
        """Plugins are imported here, so the driver's checks see what they register. Ray is
        reached (or started) and the workers placed on first use (:meth:`workers`): a job
        with nothing left to do starts neither."""
        import_plugins(self.resources.plugins)

    def _connect(self) -> None:
        if self._gpus is not None:
            return
        if self.backend == "ray":
            self._started_ray = ensure_ray(self.resources.ray_address, self.resources.workers)
        self._gpus = use_gpus(self.resources)

    @property
    def gpus(self) -> bool:
        """Whether the workers take a GPU each (Ray is reached to know)."""
        self._connect()
        assert self._gpus is not None
        return self._gpus

    @property
    def device(self) -> str:
        return "cuda" if self.gpus else "cpu"

    def close(self) -> None:
        for w in self._workers:
            if not isinstance(w, Worker):
                with contextlib.suppress(Exception):
                    ray.kill(w)
        self._workers = []
        if self._started_ray and ray.is_initialized():
            ray.shutdown()
            self._started_ray = False

    # -- workers

    def workers(self, n: int | None = None) -> list[Any]:
        """The job's workers (started on first use, then kept): the first ``n`` of them."""
        if not self._workers:
            self._workers = self._start()
        return self._workers[: max(1, n) if n is not None else None]

    def _start(self) -> list[Any]:
        res = self.resources
        if self.backend == "local":
            return [Worker(self.device, None, res.plugins, in_ray=False)]
        n = placeable(res.workers, self.gpus, res.scale_down)
        opts: dict[str, Any] = {
            # Ray restarts a crashed worker where it fits; its items are not retried on it
            # (that would wait for a restart a smaller cluster may never place): the
            # scheduler sends them to the workers that are up (an item is idempotent) and
            # takes the restarted worker back once it is bound again.
            "max_restarts": res.max_restarts,
            "max_task_retries": 0,
            "num_cpus": 1,
            "num_gpus": 1 if self.gpus else 0,
            "scheduling_strategy": "SPREAD",  # over the nodes: one node lost costs one worker
        }
        threads = None if self.gpus else 1
        actors = [RayWorker.options(**opts, **worker_env()).remote(
            self.device, threads, list(res.plugins)) for _ in range(n)]  # fmt: skip
        try:
            get([a.ready.remote() for a in actors])  # a plugin that fails, before any work
        except BaseException:
            for a in actors:
                ray.kill(a)
            raise
        return actors

    def bind(self, stage: Stage, atlas_path: str, n: int) -> list[Any]:
        """Up to ``n`` workers with ``stage`` bound (its models loaded where they are not yet);
        a load error is raised as itself. A worker lost earlier in the job (its node gone, or
        restarting) is left out of this stage; only when none is left does it fail
        (:class:`WorkersLost`)."""
        refs = [(w, submit(w, "bind", stage, atlas_path)) for w in self.workers()]
        up, lost = [], None
        for w, ref in refs:
            try:
                get(ref)
            except (*LOST, ray.exceptions.ActorUnavailableError) as e:
                lost = e
                log.warning("a worker of this job is lost (%s): %s runs without it",
                            type(e).__name__, stage.name)  # fmt: skip
                continue
            up.append(w)
        if not up:
            raise WorkersLost(f"every worker of this job was lost before {stage.name}: {lost}")
        return up[: max(1, n)]

    # -- one-off work

    def call_async(self, fn: Callable[..., Any], *args: Any, worker: int | None = None,
                   **kwargs: Any) -> Any:  # fmt: skip
        """``fn(*args, **kwargs)`` on a worker (round robin, or ``worker``): a ref for
        :func:`get`. Functions that take ``device`` get the worker's."""
        ws = self.workers()
        i = worker if worker is not None else self._rr
        self._rr = (i + 1) % len(ws)
        return submit(ws[i % len(ws)], "call", fn, args, kwargs)

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` on a worker, waited for; a worker lost earlier in the job
        passes it on to the next one."""
        n = len(self.workers())
        for tries in range(n):
            try:
                return get(self.call_async(fn, *args, **kwargs))
            except (*LOST, ray.exceptions.ActorUnavailableError):
                if tries == n - 1:
                    raise
        raise AssertionError("unreachable")

    def hold(self, factory: Callable[..., Any], *args: Any, worker: int, **kwargs: Any
             ) -> Held:  # fmt: skip
        """An object made by ``factory(*args, device=..., **kwargs)`` kept on worker
        ``worker`` until released: its methods are called through :class:`Held`."""
        self._held += 1
        name = f"held-{self._held}"
        w = self.workers()[worker % len(self.workers())]
        get(submit(w, "hold", name, factory, args, kwargs))
        return Held(w, name)

    def model_loads(self, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Per worker that still answers: where it runs and how many times it loaded each
        model (a worker lost with its node, or restarting, is left out)."""
        out = []
        for ref in [submit(w, "model_loads") for w in self._workers]:
            try:
                out.append(get(ref, timeout=timeout))
            except (*LOST, ray.exceptions.ActorUnavailableError, ray.exceptions.GetTimeoutError):
                continue
        return out


class Held:
    """An object held on a worker (:meth:`Runtime.hold`)."""

    def __init__(self, worker: Any, name: str):
        self.worker, self.name = worker, name

    def submit(self, method: str, *args: Any) -> Any:
        return submit(self.worker, "invoke", self.name, method, args)

    def release(self) -> None:
        with contextlib.suppress(Exception):
            get(submit(self.worker, "release", self.name))
