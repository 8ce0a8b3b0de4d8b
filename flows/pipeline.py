"""The ``map_neurons`` Prefect flow: corpus -> record (Ray) -> merge -> summary.

Tasks are coarse and idempotent, keyed by content through the atlas manifest: a task
whose fingerprint is already complete in the atlas returns at once, so a finished job
rerun is a no-op and ``--resume`` continues a crashed one shard by shard. Arrays never
travel through Prefect: tasks pass paths and small summaries.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np
import ray
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from tqdm.auto import tqdm

import flows
from flows.config import JobConfig, JobConfigError, ModelConfig, UniversalityConfig
from flows.record import drive
from flows.tasks import TASK
from ops.corpus import bundled_documents, read_documents, tokenize_documents, vocab_bytes
from ops.models import load_tokenizer, model_info
from ops.stats import StatsPartial, finalize, hist_spec, merge_partials
from storage.atlas import Atlas, AtlasError

# ------------------------------------------------------------------ fingerprints


def corpus_fingerprint(job: JobConfig) -> str:
    return job.fingerprint(
        "corpus", job.corpus.model_dump_json(), job.models[0].source, str(job.models[0].revision),
        str(job.record.sample_tokens), str(job.record.seed), flows.__version__,
    )  # fmt: skip


def model_fingerprint(job: JobConfig, model: ModelConfig, layers: list[int]) -> str:
    return job.fingerprint(
        "model", corpus_fingerprint(job), model.model_dump_json(), str(layers),
        job.record.model_dump_json(), flows.__version__,
    )  # fmt: skip


# ------------------------------------------------------------------ atlas set-up


def check_atlas(job: JobConfig, resume: bool, overwrite: bool) -> Atlas | None:
    """The existing atlas this job continues, or None when a new one must be made.

    Writes nothing, so a refused job leaves the existing atlas untouched.
    """
    path = job.atlas
    if not Atlas.exists(path):
        p = Path(path)
        if p.exists() and (not p.is_dir() or any(p.iterdir())):
            raise AtlasError(f"{path} exists and is not an atlas; refusing to write into it")
        return None
    if overwrite:
        return None
    atlas = Atlas.open(path, mode="r+")
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


def _stratified_sample(mask: np.ndarray, shard_rows: int, total: int, seed: int) -> np.ndarray:
    """Same number of sample tokens from each shard, uniform within it; -1 pads short shards."""
    n_seq, seq_len = mask.shape
    n_shards = math.ceil(n_seq / shard_rows)
    if total <= 0:
        return np.zeros(0, np.int64)
    per = math.ceil(total / n_shards)
    out = np.full((n_shards, per), -1, np.int64)
    for s in range(n_shards):
        a = s * shard_rows
        valid = np.flatnonzero(mask[a : a + shard_rows].reshape(-1)) + a * seq_len
        rng = np.random.default_rng([seed, s])
        pick = np.sort(rng.choice(valid, size=min(per, len(valid)), replace=False))
        out[s, : len(pick)] = pick
    return out.reshape(-1)


@task(name="prepare-corpus", **TASK)
def prepare_corpus(job: JobConfig, resume: bool = False, overwrite: bool = False) -> dict:
    """Validate models, then tokenize the corpus once into ``corpus/`` (shared by all models).

    Everything that can fail on bad input (models, layers, tokenizers, corpus files) runs
    before the atlas is created or replaced.
    """
    log = get_run_logger()
    atlas = check_atlas(job, resume, overwrite)
    if atlas is not None and "corpus" in atlas.root:
        log.info("corpus already in %s", job.atlas)
        return dict(atlas.corpus.attrs)
    for m in job.models:
        resolve_layers(job, m, model_info(m.source, m.revision)["n_layers"])
    tok = load_tokenizer(job.models[0].source, job.models[0].revision)
    vocab = vocab_bytes(tok)
    for m in job.models[1:]:
        if vocab_bytes(load_tokenizer(m.source, m.revision)) != vocab:
            raise JobConfigError(
                f"models {job.models[0].name!r} and {m.name!r} have different tokenizers; "
                "one job maps models that share a tokenizer (use one job per tokenizer)"
            )
    c = job.corpus
    docs = (
        bundled_documents(c.subsets, seed=c.seed)
        if c.source == "bundled"
        else read_documents(c.source, text_field=c.text_field, source_field=c.source_field)
    )
    tc = tokenize_documents(docs, tok, c.seq_len, c.max_tokens, prepend_bos=c.prepend_bos)
    mask = tc.mask(exclude_bos=c.exclude_bos)
    rows = min(c.shard_sequences, len(tc.tokens))
    sample = _stratified_sample(mask, rows, job.record.sample_tokens, job.record.seed)
    if Atlas.exists(job.atlas):  # only reached with --overwrite
        Atlas.remove(job.atlas)
    atlas = Atlas.create(
        job.atlas,
        {"job": job.model_dump(mode="json"), "code_version": flows.__version__,
         "corpus_fingerprint": corpus_fingerprint(job), "tokenizer": job.models[0].source},
    )  # fmt: skip
    atlas.write_corpus(
        tc.tokens, tc.doc_ids, tc.sources, tc.source_names, mask, vocab, rows, sample,
        attrs={"tokenizer": job.models[0].source, "documents": len(docs),
               "bos_token_id": tok.bos_token_id, "prepend_bos": c.prepend_bos,
               "exclude_bos": c.exclude_bos},
    )  # fmt: skip
    log.info("corpus: %d sequences x %d, %d tokens", *tc.tokens.shape, tc.n_tokens)
    return dict(atlas.corpus.attrs)


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


@task(name="prepare-model", **TASK)
def prepare_model(job: JobConfig, model: ModelConfig) -> dict:
    """Pre-size the model's arrays from its config (no weights loaded here)."""
    info = model_info(model.source, model.revision)
    layers, sample_layers = resolve_layers(job, model, info["n_layers"])
    atlas = Atlas.open(job.atlas, mode="r+")
    fp = model_fingerprint(job, model, layers)
    if model.name in atlas.models and atlas.model_attrs(model.name).get("fingerprint") != fp:
        raise AtlasError(
            f"model {model.name!r} in {job.atlas} was mapped with a different configuration; "
            "use another model name, another --atlas, or --overwrite"
        )
    spec = hist_spec(job.record.hist_bins, job.record.hist_min, job.record.hist_max)
    if model.name not in atlas.models:
        atlas.init_model(
            model.name,
            {
                "source": model.source, "revision": model.revision,
                "architecture": info["model_type"], "n_layers": info["n_layers"],
                "d_mlp": info["d_mlp"], "hook_site": info["site"], "dtype": model.dtype,
                "fingerprint": fp, "complete": False, "topk": job.record.topk,
            },
            layers, info["d_mlp"], job.record.topk, spec.edges(), sample_layers,
        )  # fmt: skip
    return {"layers": layers, "sample_layers": sample_layers, "fingerprint": fp, **info}


@task(name="record", **TASK)
def record_model(job: JobConfig, model: ModelConfig, prep: dict) -> dict:
    """The Ray driver: record every shard not yet in the manifest."""
    log = get_run_logger()
    atlas = Atlas.open(job.atlas, mode="r+")
    stage = f"record/{model.name}"
    fp = prep["fingerprint"]
    entry = atlas.done(stage)
    done = set(entry.get("shards", [])) if entry.get("fingerprint") == fp else set()
    shards = [s for s in range(len(atlas.shard_ranges())) if s not in done]
    if not shards:
        log.info("%s: all shards already recorded", model.name)
        return {"tokens": 0, "seconds": 0.0, "shards": 0}
    t0 = time.perf_counter()
    bar = tqdm(total=len(shards), desc=f"record {model.name}", unit="shard")
    tokens = 0

    def on_done(out: dict) -> None:
        nonlocal tokens
        atlas.mark(stage, fp, [out["shard"]])
        tokens += out["tokens"]
        bar.update(1)
        bar.set_postfix(tok_s=f"{tokens / (time.perf_counter() - t0):,.0f}")

    try:
        drive(job, model, job.atlas, prep["layers"], prep["sample_layers"], shards, on_done)
    finally:
        bar.close()
    dt = time.perf_counter() - t0
    log.info("%s: %d tokens in %.1fs (%.0f tok/s)", model.name, tokens, dt, tokens / dt)
    return {"tokens": tokens, "seconds": dt, "shards": len(shards)}


@task(name="merge", **TASK)
def merge_model(job: JobConfig, model: ModelConfig, prep: dict, rec: dict) -> dict:
    """Fold shard partials in shard order (deterministic), write stats and top-k."""
    atlas = Atlas.open(job.atlas, mode="r+")
    if atlas.model_attrs(model.name).get("complete"):
        return {"merged": False}
    n_shards = len(atlas.shard_ranges())
    stage = f"record/{model.name}"
    entry = atlas.done(stage)
    missing = sorted(set(range(n_shards)) - set(entry.get("shards", [])))
    if missing or entry.get("fingerprint") != prep["fingerprint"]:
        raise AtlasError(f"cannot merge {model.name!r}: shards {missing[:10]} not recorded")
    acc: StatsPartial | None = None
    for s in tqdm(range(n_shards), desc=f"merge {model.name}", unit="shard"):
        part = StatsPartial.from_arrays(atlas.read_partial(model.name, s))
        acc = part if acc is None else merge_partials([acc, part])
    assert acc is not None
    stats = finalize(acc, job.record.dead_frequency, job.record.massive_threshold)
    dead_frac = {}
    for i, layer in enumerate(prep["layers"]):
        atlas.write_layer_stats(
            model.name, layer, {k: v[i] for k, v in stats.items()},
            acc.top_values[i], acc.top_positions[i],
        )  # fmt: skip
        dead_frac[layer] = float(stats["dead"][i].mean())
    tok_s = rec["tokens"] / rec["seconds"] if rec.get("seconds") else None
    g = atlas.model_group(model.name)
    g.attrs.update({"complete": True, "tokens": int(acc.n), "tokens_per_second": tok_s})
    atlas.mark(stage, prep["fingerprint"], complete=True)
    atlas.drop_partials(model.name)
    atlas.touch()
    return {"merged": True, "tokens": int(acc.n), "dead_frac": dead_frac}


@ray.remote(num_cpus=1)
def _properties(source: str, revision: str | None, layers: list[int], top: int) -> dict:
    """Weight-derived properties of every layer, computed where the model can be loaded."""
    import torch

    from ops.models import load_model
    from ops.props import label_neurons, neuron_properties, unembedding

    torch.set_num_threads(os.cpu_count() or 1)  # runs alone: the record workers are gone
    lm = load_model(source, dtype="float32", device="cpu", revision=revision, with_tokenizer=False)
    w_u = unembedding(lm.model)
    out = {}
    for layer in layers:
        props = neuron_properties(lm.model, layer, top=top, w_u=w_u)
        out[layer] = props | {k: v for k, v in label_neurons(props).items() if k != "dead"}
    return out


@task(name="properties", **TASK)
def model_properties(job: JobConfig, model: ModelConfig, prep: dict) -> dict:
    """W_in/W_out norms and cosine, vocabulary composition, prediction/suppression labels."""
    atlas = Atlas.open(job.atlas, mode="r+")
    if not job.record.properties or atlas.model_attrs(model.name).get("props_complete"):
        return {}
    from flows.record import ensure_ray

    ensure_ray(job.resources.ray_address, job.resources.workers)
    ref = _properties.remote(model.source, model.revision, prep["layers"], job.record.top_tokens)
    per_layer = ray.get(ref)
    counts = {}
    for layer, arrays in per_layer.items():
        atlas.write_props(model.name, layer, arrays)
        counts[layer] = {
            k: int(arrays[k].sum()) for k in ("prediction", "suppression") if k in arrays
        }
    atlas.model_group(model.name).attrs.update({"props_complete": True})
    return counts


def _summary_markdown(job: JobConfig, rows: list[dict], uni: dict | None) -> str:
    lines = [f"# neuronmap: {job.atlas}", "", "| model | tokens | tok/s | dead frac per layer |",
             "|---|---|---|---|"]  # fmt: skip
    for r in rows:
        dead = ", ".join(f"L{k}: {v:.3f}" for k, v in (r.get("dead_frac") or {}).items())
        tps = f"{r['tok_s']:,.0f}" if r.get("tok_s") else "-"
        lines.append(f"| {r['model']} | {r.get('tokens', 0):,} | {tps} | {dead or 'unchanged'} |")
    if uni:
        lines += ["", "## Universality", "",
                  f"universal neurons: **{100 * uni['universal_frac']:.2f}%** "
                  f"(mean best-partner r {uni['mean_max_corr']:.3f}, rotation baseline "
                  f"{uni['baseline']:.3f}, mean excess {uni['mean_excess_corr']:.3f}, "
                  f"{uni['tokens']:,} tokens)"]  # fmt: skip
    return "\n".join(lines)


def _map_models(job: JobConfig, resume: bool, overwrite: bool) -> tuple[dict, list[dict]]:
    """Corpus, then record and merge every model of ``job`` (one atlas, one tokenizer)."""
    corpus = prepare_corpus(job, resume=resume, overwrite=overwrite)
    rows = []
    for model in job.models:
        prep = prepare_model(job, model)
        rec = record_model(job, model, prep)
        merged = merge_model(job, model, prep, rec)
        model_properties(job, model, prep)
        rows.append({"model": model.name, "tokens": merged.get("tokens", 0),
                     "tok_s": rec["tokens"] / rec["seconds"] if rec["seconds"] else None,
                     "dead_frac": merged.get("dead_frac")})  # fmt: skip
    return corpus, rows


def family_job(job: JobConfig, models: list[dict]) -> JobConfig:
    """The sub-job mapping a trained family into its own atlas inside the job's atlas."""
    assert job.seeds is not None
    return JobConfig(
        atlas=Atlas.family_path(job.atlas, job.seeds.name),
        corpus=job.corpus,
        models=[ModelConfig(name=m["name"], source=m["source"]) for m in models],
        layers="all",
        record=job.record.model_copy(update={"sample_tokens": 0, "sample_layers": "all"}),
        resources=job.resources,
    )


def _universality(job: JobConfig, models: list[ModelConfig], cfg: UniversalityConfig) -> dict:
    from flows.universality import merge_correlations, record_correlations

    atlas = Atlas.open(job.atlas)
    fp = job.fingerprint(
        "universality", cfg.model_dump_json(),
        *(atlas.model_attrs(m.name)["fingerprint"] for m in models),
    )  # fmt: skip
    record_correlations(job, models, fp)
    return merge_correlations(job, models, cfg, fp)


@flow(name="map_neurons", log_prints=True)
def map_neurons(job: JobConfig, resume: bool = False, overwrite: bool = False) -> dict:
    """Map every MLP neuron of the job's models over its corpus into the atlas.

    With a ``seeds`` section, also train (or reuse) the seed family, map it into
    ``families/<name>`` of the same atlas, and compare its members' neurons.
    """
    t0 = time.perf_counter()
    corpus, rows = _map_models(job, resume, overwrite)
    uni = None
    if job.seeds is not None:
        from flows.seeds import train_seeds

        fam = train_seeds(job.seeds, texts_source=job.corpus.source, subsets=job.corpus.subsets,
                          ray_address=job.resources.ray_address)  # fmt: skip
        fjob = family_job(job, fam["models"])
        Atlas.open(job.atlas, mode="r+").ensure_families_group()
        rows += _map_models(fjob, resume, overwrite=False)[1]
        ucfg = job.universality or UniversalityConfig(family=job.seeds.name)
        uni = _universality(fjob, list(fjob.models), ucfg)
    elif job.universality is not None:
        assert job.universality.models is not None
        chosen = [m for m in job.models if m.name in job.universality.models]
        uni = _universality(job, chosen, job.universality)
    dicts = None
    if job.dictionaries is not None:
        from flows.dictionaries import learn_dictionaries

        dicts = learn_dictionaries(job, job.dictionaries)
    create_markdown_artifact(_summary_markdown(job, rows, uni), key="neuronmap-summary",
                             description=f"map_neurons into {job.atlas}")  # fmt: skip
    return {"atlas": job.atlas, "corpus_tokens": corpus["n_tokens"], "models": rows,
            "universality": uni, "dictionaries": dicts,
            "seconds": time.perf_counter() - t0}  # fmt: skip
