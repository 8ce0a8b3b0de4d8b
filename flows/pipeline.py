"""The ``map_neurons`` Prefect flow: the job as an ordered list of stages.

1. ``prepare-corpus``: tokenize the corpus once into the atlas (``flows.prepare``)
2. per model: ``prepare-model`` (pre-sized arrays), ``record`` (statistics + sample, and
   a streamed SAE's first epoch, from one forward per batch, merged in shard order;
   ``flows.record``), ``properties`` (weights)
3. with ``seeds``: ``train_seeds`` (``flows.seeds``), then the family in
   ``families/<name>``: corpus, arrays and properties as in 1-2, and ``record-family``:
   every member's statistics and the co-moments of every neuron pair across members from
   the same forwards, then partners, rotation baseline and labels (``flows.universality``)
4. or ``universality`` over job models: their co-moments in a pass of their own
5. ``dictionaries``: SAEs and SNMF of one layer, their features over the corpus (one pass
   for all of them), CE loss recovered and steering (``flows.dictionaries``)

Every sharded stage runs through one runner (``flows.engine``): content key, manifest,
resume, progress, ordered merge, cleanup, and the run accounting that ``neuronmap info``
shows under ``runs``. Tasks are idempotent: a stage already complete under the same key
returns at once, so a finished job rerun is a no-op and ``--resume`` continues a crashed
one shard by shard. Arrays never travel through Prefect: tasks pass paths and summaries.
"""

from __future__ import annotations

import contextlib
import shutil
import time
import uuid
from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flows.config import JobConfig, ModelConfig, UniversalityConfig
from flows.dictionaries import learn_dictionaries, streamed_rider
from flows.engine import Ledger
from flows.local_server import install as install_local_server
from flows.preflight import preflight
from flows.prepare import prepare_corpus, prepare_model, staging_path, swap_in
from flows.record import model_properties, record_model
from flows.runtime import Runtime, runtime_for
from flows.seeds import train_seeds
from flows.universality import record_family, universality
from ops.configs import TAXONOMY_KINDS as KINDS
from storage.atlas import Atlas, AtlasError
from storage.layout import family_path
from storage.lease import Lease
from storage.location import is_url
from storage.store import Store

install_local_server()  # before a flow of this module starts Prefect's temporary server


def _summary_markdown(job: JobConfig, rows: list[dict], uni: dict | None, ledger: Ledger) -> str:
    lines = [f"# neuronmap: {job.atlas}", "", "| model | tokens | tok/s | dead frac per layer |",
             "|---|---|---|---|"]  # fmt: skip
    for r in rows:
        dead = ", ".join(f"L{k}: {v:.3f}" for k, v in (r.get("dead_frac") or {}).items())
        tps = f"{r['tok_s']:,.0f}" if r.get("tok_s") else "-"
        lines.append(f"| {r['model']} | {r.get('tokens', 0):,} | {tps} | {dead or 'unchanged'} |")
    kinds = [(r["model"], r["kinds"]) for r in rows if r.get("kinds")]
    if kinds:
        names = KINDS
        lines += ["", "## Neuron kinds (fraction of each layer)", "",
                  "| model | layer | " + " | ".join(names) + " |", "|---" * (2 + len(names)) + "|"]  # fmt: skip
        for model, per in kinds:
            for layer, f in per.items():
                lines.append(f"| {model} | {layer} | " + " | ".join(f"{f[k]:.3f}" for k in names) + " |")
    if uni:
        lines += ["", "## Universality", "",
                  f"universal neurons: **{100 * uni['universal_frac']:.2f}%** "
                  f"(mean best-partner r {uni['mean_max_corr']:.3f}, rotation baseline "
                  f"{uni['baseline']:.3f}, mean excess {uni['mean_excess_corr']:.3f}, "
                  f"{uni['tokens']:,} tokens)"]  # fmt: skip
    run = next((r for r in Atlas.open(job.atlas).runs() if r["run"] == ledger.run), None)
    if run:
        lines += ["", "## What it cost", "", "| stage | tokens | forwards | passes/token | "
                  "seconds | tok/s | workers |", "|---|---|---|---|---|---|---|"]  # fmt: skip
        for st in run["stages"]:
            lines.append(f"| {st['stage']} | {st['tokens']:,} | {st['forward_passes']:,} | "
                         f"{st.get('passes_per_token', '-')} | {st['seconds']:.1f} | "
                         f"{st['tokens_per_s'] or '-'} | {len(st['workers'])} |")  # fmt: skip
    return "\n".join(lines)


def _map_models(job: JobConfig, ledger: Ledger, resume: bool, overwrite: bool
                ) -> tuple[dict, list[dict]]:  # fmt: skip
    """Corpus, then record (merge included) and properties of every model of ``job``."""
    corpus = prepare_corpus(job, resume=resume, overwrite=overwrite)
    rows = []
    for model in job.models:
        prep = prepare_model(job, model)
        # a streamed SAE over this model rides on its record pass (no forward of its own)
        rec = record_model(job, model, prep, ledger, rider=streamed_rider(job, model, prep, ledger))
        model_properties(job, model, prep)
        rows.append({"model": model.name, "tokens": rec.tokens,
                     "tok_s": (rec.accounting or {}).get("tokens_per_s"),
                     "dead_frac": rec.dead_frac, "kinds": rec.kinds})  # fmt: skip
    return corpus, rows


def _map_family(job: JobConfig, cfg: UniversalityConfig, ledger: Ledger, resume: bool
                ) -> tuple[list[dict], dict]:  # fmt: skip
    """A family's corpus and arrays, weight properties, then one stage that records every
    member and correlates them from the same forwards."""
    prepare_corpus(job, resume=resume)
    preps = [prepare_model(job, m) for m in job.models]
    for m, prep in zip(job.models, preps, strict=True):
        model_properties(job, m, prep)
    out = record_family(job, cfg, preps, ledger)
    tok_s = (out.get("accounting") or {}).get("tokens_per_s")
    rows = [{"model": m.name, "tokens": out["models"].get(m.name, {}).get("tokens", 0),
             "tok_s": tok_s, "dead_frac": out["models"].get(m.name, {}).get("dead_frac")}
            for m in job.models]  # fmt: skip
    uni = {k: v for k, v in out.items() if k not in ("models", "accounting")}
    return rows, uni


def family_job(job: JobConfig, models: list[dict]) -> JobConfig:
    """The sub-job mapping a trained family into its own atlas inside the job's atlas."""
    assert job.seeds is not None
    return JobConfig(
        atlas=family_path(job.atlas, job.seeds.name),
        corpus=job.corpus,
        models=[ModelConfig(name=m["name"], source=m["source"]) for m in models],
        layers="all",
        record=job.record.model_copy(update={"sample_tokens": 0, "sample_layers": "all"}),
        resources=job.resources,
    )


@flow(name="map_neurons", log_prints=True)
def map_neurons(job: JobConfig, resume: bool = False, overwrite: bool = False) -> dict:
    """Map every MLP neuron of the job's models over its corpus into the atlas.

    With a ``seeds`` section, also train (or reuse) the seed family, map it into
    ``families/<name>`` of the same atlas, and compare its members' neurons.

    ``overwrite`` builds the new atlas beside an existing one and swaps it in only once the
    whole job has succeeded: a job that fails or is killed leaves the old atlas as it was.
    """
    preflight(job, resume=resume, overwrite=overwrite)  # the CLI ran it already: cheap
    label = f"{', '.join(m.name for m in job.models)} on {job.corpus.source}"
    # the runtime first: a cluster that does not answer or cannot place the workers fails
    # before anything is written
    with Runtime(job.resources), Lease(job.atlas, job=label):  # the staging copy included
        return _replace_or_map(job, resume, overwrite)


def _replace_or_map(job: JobConfig, resume: bool, overwrite: bool) -> dict:
    """Map into ``job.atlas``, or with ``overwrite`` into a staging copy swapped in at the end."""
    if not (overwrite and Atlas.exists(job.atlas)):
        return _map(job, resume, overwrite)
    if is_url(job.atlas):  # refused before anything is written
        raise AtlasError(
            f"--overwrite of {job.atlas}: an object store has no atomic rename to swap a new "
            "atlas in safely; map into a new URL and delete the old atlas once it is done"
        )
    staged = staging_path(job.atlas)
    if Path(staged).exists():  # what a failed or killed earlier overwrite left
        Store.remove(staged)
    try:
        out = _map(job.model_copy(update={"atlas": staged}), resume=False, overwrite=False)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    swap_in(staged, job.atlas)
    return out | {"atlas": job.atlas}


def _map(job: JobConfig, resume: bool, overwrite: bool) -> dict:
    """The stages of :func:`map_neurons`, in order, into ``job.atlas``, on one runtime: the
    job's workers start once and keep their models from the first stage to the last."""
    ledger = Ledger(job.atlas, uuid.uuid4().hex[:12])
    with runtime_for(job.resources) as rt:
        if not (Atlas.exists(job.atlas) and Atlas.open(job.atlas).attrs.get("complete")):
            # a job with work to do places its workers (and imports their plugins) before
            # its first stage writes; a finished one rerun (a schedule's no-op) starts none
            rt.workers()
        try:
            return _stages(job, resume, overwrite, ledger)
        finally:
            loads = rt.model_loads()
            if loads and Atlas.exists(job.atlas):
                with contextlib.suppress(Exception):  # never hides the job's own error
                    Store.open(job.atlas).record_model_loads(ledger.run, loads)


def _stages(job: JobConfig, resume: bool, overwrite: bool, ledger: Ledger) -> dict:
    t0 = time.perf_counter()
    corpus, rows = _map_models(job, ledger, resume, overwrite)
    uni = None
    if job.seeds is not None:
        fam = train_seeds(job.seeds, texts_source=job.corpus.source, subsets=job.corpus.subsets,
                          resources=job.resources, ledger=ledger)  # fmt: skip
        fjob = family_job(job, fam["models"])
        Store.open(job.atlas).ensure_families_group()
        ucfg = job.universality or UniversalityConfig(family=job.seeds.name)
        fam_rows, uni = _map_family(fjob, ucfg, ledger, resume)
        rows += fam_rows
    elif job.universality is not None:
        assert job.universality.models is not None
        chosen = [m for m in job.models if m.name in job.universality.models]
        uni = universality(job, chosen, job.universality, ledger)
    dicts = None
    if job.dictionaries is not None:
        dicts = learn_dictionaries(job, job.dictionaries, ledger)
    Store.open(job.atlas).finish(ledger.run)
    create_markdown_artifact(_summary_markdown(job, rows, uni, ledger), key="neuronmap-summary",
                             description=f"map_neurons into {job.atlas}")  # fmt: skip
    return {"atlas": job.atlas, "corpus_tokens": corpus["n_tokens"], "models": rows,
            "universality": uni, "dictionaries": dicts, "run": ledger.run,
            "seconds": time.perf_counter() - t0}  # fmt: skip
