"""Preflight: everything about a job that is knowable in about a second, checked before
Prefect or Ray start.

Starting the local Prefect server and a Ray cluster takes 15-25 s, loading a model more,
and tokenizing the corpus longer still; a job that cannot work must not fail only after
that. So :func:`preflight` checks the atlas location and state, the corpus files and the
model files first (``neuronmap run`` calls it before it imports Prefect; the
``map_neurons`` flow calls it again first thing, for Python-API and deployment runs). It
imports nothing heavy (no torch, transformers, Prefect or Ray) and writes nothing into the
atlas.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import flows
from flows.config import JobConfig, JobConfigError, ModelConfig
from flows.plugins import check_plugins
from ops.corpus import BUNDLED_SOURCES, check_corpus
from ops.plan import Plan, default_budget, plan
from ops.sources import check_source, mlp_width, n_layers
from storage import location
from storage.atlas import Atlas, AtlasError
from storage.lease import Lease, lock_path
from storage.store import Store


def preflight(job: JobConfig, resume: bool = False, overwrite: bool = False) -> None:
    """Raise the user error (``JobConfigError``, ``ModelError``, ``CorpusError``,
    ``AtlasError``) that a run of ``job`` would otherwise meet only after start-up."""
    if resume and overwrite:
        raise JobConfigError("--resume and --overwrite contradict each other; pick one")
    check_plugins(job.resources.plugins)
    if job.resources.backend == "ray":
        check_ray_address(job.resources.ray_address)
    check_location(job.atlas)
    check_free(job.atlas)
    check_atlas(job, resume, overwrite)
    check_corpus(job.corpus.source, job.corpus.subsets)
    check_contrast(job)
    for m in job.models:
        config = check_source(m.source, m.revision)
        n = n_layers(config) if config is not None else None
        if n is not None:  # else (a hub id, SmolLM2 before its first use): prepare-corpus checks
            layers, _ = resolve_layers(job, m, n)
            d = job.dictionaries
            if d is not None and d.model == m.name and d.layer not in layers:
                raise JobConfigError(f"field 'dictionaries.layer': layer {d.layer} is not "
                                     f"recorded for model {m.name!r} (layers {layers})")  # fmt: skip
    check_universality_plan(job)


def check_ray_address(address: str | None, timeout: float = 3.0) -> None:
    """A Ray address the job names (``host:port`` or ``ray://host:port``) answers: a typo or
    a cluster that is down fails here, in seconds, not after ``ray.init`` retries for a
    minute. ``auto``/``local`` and no address (``$RAY_ADDRESS`` or a local instance) are
    left to Ray."""
    if not address or address in ("auto", "local"):
        return
    where = address.split("://", 1)[-1].rstrip("/")
    host, _, port = where.rpartition(":")
    if not host or not port.isdigit():
        raise JobConfigError(f"field 'resources.ray_address': {address!r} is not host:port or "
                             "ray://host:port")  # fmt: skip
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise JobConfigError(f"field 'resources.ray_address': no Ray cluster answers at "
                             f"{address!r} ({e.strerror or type(e).__name__})") from None  # fmt: skip


def job_plan(job: JobConfig, workers: int | None = None, gpus: bool = False,
             memory_gb: float | None = None) -> tuple[list[str], Plan] | None:  # fmt: skip
    """The universality plan of ``job`` from its config alone (the seed family's shape, or
    the compared models' ``config.json``): no torch, nothing loaded. None when the job
    compares nothing, or a model's shape is not known before it loads (a hub id, SmolLM2
    before its first use)."""
    cfg = job.universality
    if job.seeds is not None and (cfg is None or cfg.family is not None):
        sd = job.seeds
        names = [f"{sd.name}-s{i}" for i in range(sd.count)]
        layers, d = [list(range(sd.layers))] * sd.count, [sd.d_mlp] * sd.count
    elif cfg is not None and cfg.models is not None:
        names, layers, d = [], [], []
        for m in (m for m in job.models if m.name in cfg.models):
            config = check_source(m.source, m.revision)
            n = n_layers(config) if config is not None else None
            width = mlp_width(config) if config is not None else None
            if n is None or width is None:
                return None
            names.append(m.name)
            layers.append(resolve_layers(job, m, n)[0])
            d.append(width)
    else:
        return None
    w = workers or job.resources.workers
    mem = memory_gb if memory_gb is not None else (cfg.memory_gb if cfg is not None else None)
    return names, plan(layers, d, w, default_budget(mem, w, gpus), flush=gpus)


def check_universality_plan(job: JobConfig) -> None:
    """A universality plan that can never fit a worker fails now, naming the knob, not after
    hours of recording. Where the workers' kind is not known yet (``resources.gpus: auto``)
    only an explicit ``universality.memory_gb`` is checked."""
    cfg = job.universality
    if job.resources.gpus == "auto" and (cfg is None or cfg.memory_gb is None):
        return
    job_plan(job, gpus=job.resources.gpus is True)


# ------------------------------------------------------------------ the atlas


def _local(path: str) -> Path | None:
    """The local path of an atlas location; None for an object store (checked on open)."""
    return None if location.is_url(path) else location.local(path)


def _writable(d: Path) -> bool:
    return os.access(d, os.W_OK | os.X_OK)


def check_location(path: str) -> None:
    """The atlas can be written where the job says. A new atlas needs its nearest existing
    parent to be a writable directory; an existing one must be writable, and so must the
    directory around it (its lease file lives there, and ``--overwrite`` builds beside it).
    Found only when the atlas is created, this would fail after tokenizing the corpus."""
    p = _local(path)
    if p is None:
        return
    if p.exists():
        if p.is_dir() and not _writable(p):
            raise AtlasError(f"cannot write the atlas {path}: the directory is not writable")
        around = p.absolute().parent
        if not _writable(around):
            raise AtlasError(f"cannot write beside the atlas {path}: directory {around} is "
                             "not writable (it holds the atlas's lease file)")  # fmt: skip
        return
    parent = p.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise AtlasError(f"cannot create the atlas {path}: {parent} is not a directory")
    if not _writable(parent):
        raise AtlasError(f"cannot create the atlas {path}: directory {parent} is not writable")


def check_free(path: str) -> None:
    """A job still running on the atlas refuses this one now, naming it, before the atlas's
    state (which that job is changing) is judged. Only an existing lease file is probed (taken
    and given back at once)."""
    p = _local(path)
    if p is not None and lock_path(path).exists():
        with Lease(path):
            pass


def corpus_fingerprint(job: JobConfig) -> str:
    return job.fingerprint(
        "corpus", job.corpus.model_dump_json(), job.models[0].source, str(job.models[0].revision),
        str(job.record.sample_tokens), str(job.record.seed), flows.__version__,
    )  # fmt: skip


def check_atlas(job: JobConfig, resume: bool, overwrite: bool) -> Atlas | None:
    """The existing atlas this job continues, or None when a new one must be made.

    Writes nothing, so a refused job leaves the existing atlas untouched.
    """
    path = job.atlas
    if not Atlas.exists(path):
        if location.occupied(path):
            raise AtlasError(f"{path} exists and is not an atlas; refusing to write into it")
        return None
    if overwrite:
        return None
    atlas = Store.open(path)
    if atlas.attrs.get("corpus_fingerprint") != corpus_fingerprint(job):
        raise AtlasError(
            f"atlas {path} was built from a different corpus, tokenizer or sample "
            f"(its job: {atlas.attrs.get('job', {}).get('corpus')}); use another --atlas "
            "or pass --overwrite to replace it"
        )
    unfinished = [
        m.name for m in job.models
        if m.name in atlas.models and not atlas.model_attrs(m.name).get("complete")
    ]  # fmt: skip
    if unfinished and not resume:
        raise AtlasError(
            f"atlas {path} has an unfinished run for {unfinished}; pass --resume to "
            "continue it or --overwrite to start over"
        )
    return atlas


# ------------------------------------------------------------------ corpus and models


def check_contrast(job: JobConfig) -> None:
    """Steering's contrast names two corpus sources; for the bundled corpus they are known
    now (for files only once they are read)."""
    d = job.dictionaries
    contrast = d.steering.contrast if d is not None and d.steering is not None else None
    if not contrast or job.corpus.source != "bundled":
        return
    sources = job.corpus.subsets or list(BUNDLED_SOURCES)
    unknown = [s for s in contrast if s not in sources]
    if unknown:
        raise JobConfigError(f"field 'dictionaries.steering.contrast': {unknown} are not "
                             f"sources of the corpus ({sources})")  # fmt: skip


def resolve_layers(
    job: JobConfig, model: ModelConfig, n_layers: int
) -> tuple[list[int], list[int]]:
    """Layers to record and to sample, checked against the model."""
    layers = list(range(n_layers)) if job.layers == "all" else list(job.layers)
    bad = [i for i in layers if i >= n_layers]
    if bad:
        raise JobConfigError(
            f"field 'layers': {bad} out of range for model {model.name!r} "
            f"({model.source}) with {n_layers} layers"
        )
    sl = job.record.sample_layers
    sample = layers if sl == "all" else [i for i in sl if i in layers]
    if sl != "all" and len(sample) != len(sl):
        raise JobConfigError(
            f"field 'record.sample_layers': {sorted(set(sl) - set(layers))} are not recorded layers"
        )
    if job.record.sample_tokens == 0:
        sample = []
    return layers, sample
