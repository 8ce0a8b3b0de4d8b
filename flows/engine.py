"""The stage runner: every sharded stage runs the same way, on the job runtime's workers.

    token shards ─► Worker (flows.runtime: a Ray actor, or this process on the local backend;
                    holds its models for the whole job)
                      ops.engine.ActivationPass: one forward per batch ─► the stage's consumers
                      stage.persist: partials to the atlas's _work, small results back
    run_stage (driver, inside a Prefect task): content key · manifest · resume · progress ·
                      ordered merge · cleanup · run accounting

A :class:`Stage` (``flows.stage``) declares what is special about it (its models, the
consumers a shard needs, what a worker persists, how the driver merges); everything else is
done here, the same way for every stage. A new analysis is a consumer (``ops``) plus a stage
declaration.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import ray
from tqdm.auto import tqdm

from flows.config import ResourcesConfig
from flows.runtime import (  # noqa: F401  (the runtime's names that stage modules use)
    LOST,
    PROBE_EVERY_S,
    RESTART_WAIT_S,
    WorkersLost,
    bounded,
    ensure_ray,
    get,
    placeable,
    runtime_for,
    submit,
    token_auth,
    use_gpus,
    wait,
    worker_env,
)
from flows.stage import (  # noqa: F401
    Build,
    Persist,
    Shard,
    Span,
    Stage,
    StageResult,
    Unit,
    UnitsResult,
)
from storage.atlas import Atlas, AtlasError
from storage.store import Store


def iter_stage(stage: Stage, atlas_path: str, shards: Sequence[int],
               resources: ResourcesConfig, ordered: bool = False) -> Iterator[dict[str, Any]]:  # fmt: skip
    """Run ``shards`` of ``stage`` on the job's workers (the runtime's: :func:`flows.runtime.
    current`, or a temporary one outside a job) and yield each shard's result as it lands
    (``ordered``: in the order of ``shards``). Closing the generator drops queued work."""
    if not shards:
        return
    with runtime_for(resources) as rt:
        ws = rt.bind(stage, atlas_path, len(shards))

        def send(s: int, shard: int) -> Any:
            return submit(ws[s], "run", shard)

        def revive(s: int) -> Any:  # a restarted worker lost its binding: bind it again
            return submit(ws[s], "bind", stage, atlas_path)

        for _, out in bounded(shards, send, len(ws), resources.inflight_per_worker, ordered,
                              revive=revive):  # fmt: skip
            yield out


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
                "node": out["node"], "host": out.get("host"), "pid": out.get("pid"),
                "device": out["device"], "shards": []})  # fmt: skip
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
        self.summary: StageResult | None = None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        stage = self.stage
        atlas = Store.open(self.path)
        entry = atlas.done(stage.name)
        same = entry.get("fingerprint") == stage.key
        if same and entry.get("complete"):
            self.summary = StageResult(skipped=True)
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
        self.summary = StageResult(accounting=entry if todo else None, merged=result)

    def _record(self, entry: dict[str, Any]) -> None:
        assert self.ledger is not None
        try:
            self.ledger.record(entry)
        except Exception as e:  # never hides the error that ended the attempt
            logging.getLogger("neuronmap").warning("run accounting not recorded: %s", e)

    def finish(self) -> StageResult:
        for _ in self:
            pass
        assert self.summary is not None
        return self.summary


def run_stage(stage: Stage, atlas_path: str, resources: ResourcesConfig,
              ledger: Ledger | None = None) -> StageResult:  # fmt: skip
    """Run ``stage`` to the end (see :class:`StageRun`) and return its result."""
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
    what: str = ""  # begin | run | checkpoint | end | revive
    since_ckpt: int = 0
    ckpt_t: float = 0.0
    up: bool = True
    probe_at: float | None = None  # a lost worker Ray is restarting: when to ask again


def run_units(stage: Stage, atlas_path: str, units: Sequence[Unit], resources: ResourcesConfig,
              ledger: Ledger | None = None) -> UnitsResult:  # fmt: skip
    """Run ``units`` of a stage with a :class:`Span`: each on one worker, its shards in order
    into state the worker holds, checkpointed on the span's interval, closed on the worker
    (``close`` persists what the driver needs later: a resumed run skips finished units).
    Returns a :class:`UnitsResult`.

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
        return UnitsResult(results, None)
    acct = Accounting(stage.name, corpus_tokens=int(atlas.corpus.attrs["n_tokens"]))
    bar = tqdm(total=sum(len(units[i].shards) for i in todo),
               desc=stage.description or stage.name, unit="shard")  # fmt: skip
    log = run_logger()
    held = contextlib.ExitStack()  # the job's runtime, or a temporary one closed at the end
    held.callback(bar.close)
    try:
        rt = held.enter_context(runtime_for(resources))
        slots = [_Slot(a) for a in rt.bind(stage, atlas_path, len(todo))]
    except BaseException:
        held.close()
        raise

    def send(s: _Slot, what: str, *args: Any) -> None:
        s.what, s.ref = what, submit(s.actor, what, *args)

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

    def revive(s: _Slot) -> None:  # asked without waiting: the others keep working
        s.probe_at = None
        s.what, s.ref = "revive", submit(s.actor, "bind", stage, atlas_path)

    none_up_since: float | None = None
    try:
        while todo or any(s.unit is not None for s in slots):
            for s in slots:
                if s.up and s.unit is None and todo:
                    s.unit, s.cursor, s.since_ckpt, s.ckpt_t = todo.pop(0), 0, 0, time.monotonic()
                    send(s, "begin", units[s.unit])
            now = time.monotonic()
            for s in slots:
                if s.probe_at is not None and s.probe_at <= now:
                    revive(s)
            busy = [s for s in slots if s.unit is not None or s.what == "revive"]
            probing = [s for s in slots if s.probe_at is not None]
            if any(s.up for s in slots):
                none_up_since = None
            elif not busy and not probing:
                raise WorkersLost("every worker was lost and none can restart")
            else:
                none_up_since = none_up_since or now
                if now - none_up_since > RESTART_WAIT_S:
                    raise WorkersLost(f"every worker was lost and none came back within "
                                      f"{RESTART_WAIT_S:.0f} s")  # fmt: skip
            if not busy:
                time.sleep(max(0.0, min(s.probe_at for s in probing) - now))
                continue
            timeout = max(0.0, min(s.probe_at for s in probing) - now) if probing else None
            ready = wait([s.ref for s in busy], timeout=timeout)
            if not ready:
                continue
            s = next(x for x in busy if x.ref == ready[0])
            if s.what == "revive":  # a lost worker's restart answered
                s.what, s.ref = "", None
                try:
                    get(ready[0])
                except ray.exceptions.ActorUnavailableError:  # still restarting
                    s.probe_at = time.monotonic() + PROBE_EVERY_S
                except LOST as e:  # it will not come back
                    logging.getLogger("neuronmap").warning("worker cannot be restarted: %s", e)
                else:
                    s.up = True
                continue
            try:
                out = get(s.ref)
            except LOST as e:
                logging.getLogger("neuronmap").warning(
                    "worker lost during unit %s (%s): it resumes from its checkpoint on "
                    "the next free worker", units[s.unit].key, type(e).__name__)  # fmt: skip
                todo.insert(0, s.unit)
                s.unit, s.up = None, False
                revive(s)  # a restarted worker takes work again once bound (models loaded)
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
        held.close()  # the job's workers stay; a temporary runtime ends
    entry = acct.to_dict()
    if ledger is not None:
        ledger.record(entry)
    return UnitsResult(results, entry)
