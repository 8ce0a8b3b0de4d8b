"""Atlas set-up tasks: content keys, the checks that refuse a wrong atlas before anything is
written, the tokenized corpus (shared by every model of a job) and each model's pre-sized
arrays. Everything that can fail on bad input runs here, before any recording.
"""

from __future__ import annotations

import os

import numpy as np
from prefect import get_run_logger, task

import flows
from flows.config import JobConfig, JobConfigError, ModelConfig
from flows.preflight import check_atlas, corpus_fingerprint, resolve_layers
from flows.tasks import TASK
from ops.corpus import (
    TokenizedCorpus,
    bundled_documents,
    read_documents,
    source_signature,
    stratified_sample,
    tokenize_documents,
    vocab_bytes,
)
from ops.models import load_tokenizer, model_info
from ops.stats import hist_spec
from storage.atlas import AtlasError
from storage.store import Store

# ------------------------------------------------------------------ fingerprints


def model_fingerprint(job: JobConfig, model: ModelConfig, layers: list[int]) -> str:
    return job.fingerprint(
        "model", corpus_fingerprint(job), model.model_dump_json(), str(layers),
        job.record.model_dump_json(), flows.__version__,
    )  # fmt: skip


# ------------------------------------------------------------------ atlas set-up


def staging_path(path: str) -> str:
    """Where an ``--overwrite`` job builds its atlas until the whole job has succeeded: a
    sibling of the old atlas, so that swapping it in is a rename on one filesystem."""
    return f"{str(path).rstrip('/')}.overwrite"


def swap_in(staged: str, path: str) -> None:
    """Replace the atlas at ``path`` by the finished one at ``staged``; the old atlas is
    removed only after the new one is in place."""
    old = f"{str(path).rstrip('/')}.replaced-{os.getpid()}"
    os.rename(path, old)
    os.rename(staged, path)
    Store.remove(old)


@task(name="prepare-corpus", **TASK)
def prepare_corpus(job: JobConfig, resume: bool = False, overwrite: bool = False) -> dict:
    """Validate models, then tokenize the corpus once into ``corpus/`` (shared by all models).

    Everything that can fail on bad input (models, layers, tokenizers, corpus files) runs
    before the atlas is created or replaced.
    """
    log = get_run_logger()
    atlas = check_atlas(job, resume, overwrite)
    if atlas is not None and "corpus" in atlas.root:
        return grow_corpus(job, Store.open(job.atlas))
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
    signature = source_signature(c.source)  # before reading: a file growing meanwhile is seen next time
    docs, tc = _tokenize(job, tok)
    mask = tc.mask(exclude_bos=c.exclude_bos)
    rows = min(c.shard_sequences, len(tc.tokens))
    sample = stratified_sample(mask, rows, job.record.sample_tokens, job.record.seed)
    atlas = Store.create(
        job.atlas,  # where the atlas lives is not part of it: it may be moved (or swapped in)
        {"job": job.model_dump(mode="json", exclude={"atlas"}), "code_version": flows.__version__,
         "corpus_fingerprint": corpus_fingerprint(job), "tokenizer": job.models[0].source},
    )  # fmt: skip
    atlas.write_corpus(
        tc.tokens, tc.doc_ids, tc.sources, tc.source_names, mask, vocab, rows, sample,
        attrs={"tokenizer": job.models[0].source, "documents": len(docs),
               "bos_token_id": tok.bos_token_id, "prepend_bos": c.prepend_bos,
               "exclude_bos": c.exclude_bos, "source_signature": signature},
    )  # fmt: skip
    log.info("corpus: %d sequences x %d, %d tokens", *tc.tokens.shape, tc.n_tokens)
    return dict(atlas.corpus.attrs)


def _tokenize(job: JobConfig, tok) -> tuple[list, TokenizedCorpus]:
    c = job.corpus
    docs = (
        bundled_documents(c.subsets, seed=c.seed)
        if c.source == "bundled"
        else read_documents(c.source, text_field=c.text_field, source_field=c.source_field)
    )
    return docs, tokenize_documents(docs, tok, c.seq_len, c.max_tokens, prepend_bos=c.prepend_bos)


def grow_corpus(job: JobConfig, atlas: Store) -> dict:
    """Continue an atlas whose file corpus has grown: documents added at the end of the
    corpus (lines appended to a file, files added after the last one in reading order)
    become new sequences, and the shards they fill are recorded by the stages that follow,
    which continue from the merged state of the rest (``flows.statistics.record_merge``).

    Unchanged files (size and mtime, :func:`ops.corpus.source_signature`) are not read
    again, so a scheduled run of a finished job stays a fast no-op. A corpus that changed
    other than by growing is refused, naming the first sequence that differs."""
    log = get_run_logger()
    c, attrs = job.corpus, dict(atlas.corpus.attrs)
    signature = source_signature(c.source)
    if signature is None or signature == attrs.get("source_signature"):
        log.info("corpus already in %s", job.atlas)
        return attrs
    n_old = int(attrs["n_sequences"])
    tok = load_tokenizer(job.models[0].source, job.models[0].revision)
    docs, tc = _tokenize(job, tok)
    old = atlas.corpus["tokens"][...]
    names = list(attrs["source_names"])
    new = tc.tokens[:n_old]
    differs = np.flatnonzero((new != old[: len(new)]).any(axis=1)) if len(new) == n_old else [len(new)]
    if len(differs) or tc.source_names[: len(names)] != names:
        at = int(differs[0]) if len(differs) else 0
        raise AtlasError(
            f"the corpus of {job.atlas} changed, not only grew: sequence {at} differs from the "
            f"stored one ({c.source}); a growing corpus may only gain documents at its end. "
            "Map it into another --atlas, or pass --overwrite to start over"
        )
    if len(tc.tokens) == n_old:
        atlas.corpus.attrs["source_signature"] = signature
        log.info("corpus of %s: files changed, no new sequences", job.atlas)
        return dict(atlas.corpus.attrs)
    mask = tc.mask(exclude_bos=c.exclude_bos)
    rows = int(attrs["shard_sequences"])
    first = n_old // rows
    tail = stratified_sample(mask, rows, job.record.sample_tokens, job.record.seed,
                             per=atlas.sample_rows_per_shard(), first=first)  # fmt: skip
    atlas.extend_corpus(tc.tokens, tc.doc_ids, tc.sources, tc.source_names, mask, tail,
                        {"documents": len(docs), "source_signature": signature})  # fmt: skip
    log.info("corpus of %s grew: %d -> %d sequences (%d tokens); shards %d.. are recorded",
             job.atlas, n_old, len(tc.tokens), int(mask.sum()), first)  # fmt: skip
    return dict(atlas.corpus.attrs)


@task(name="prepare-model", **TASK)
def prepare_model(job: JobConfig, model: ModelConfig) -> dict:
    """Pre-size the model's arrays from its config (no weights loaded here)."""
    info = model_info(model.source, model.revision)
    layers, sample_layers = resolve_layers(job, model, info["n_layers"])
    atlas = Store.open(job.atlas)
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


