"""A growing corpus: a scheduled job whose files gain documents records only the new shards,
and ends with the atlas a fresh run over the whole corpus gives; an unchanged corpus is a
no-op that reads no file; a corpus that changed other than by growing is refused."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from ops.corpus import bundled_documents
from storage.atlas import Atlas, AtlasError
from storage.integrity import verify
from tests.flows.test_pipeline import _arrays, _job, _run


def _write_docs(path: Path, docs: list[str]) -> None:
    path.write_text("\n\n".join(d.replace("\n\n", "\n") for d in docs) + "\n")


@pytest.fixture(scope="module")
def grown(tmp_path_factory, tiny_model_dir, ray_cluster, prefect_harness) -> dict:
    tmp = tmp_path_factory.mktemp("growth")
    docs = [d.text[:400] for d in bundled_documents(["wiki-en", "wiki-fr"])[:60]]
    corpus = tmp / "corpus"
    corpus.mkdir()
    _write_docs(corpus / "a.txt", docs[:23])

    def job(atlas: Path, source: Path) -> dict:
        # no weight properties (a Ray task of ~8 s per run that growth does not touch); the
        # default taxonomy stays: its quantile thresholds and counts are compared below
        return _job(atlas, tiny_model_dir,
                    corpus={"source": str(source), "max_tokens": None, "seq_len": 24,
                            "shard_sequences": 16},
                    record={"properties": False})  # fmt: skip

    first = _run(job(tmp / "grown.zarr", corpus))
    before = Atlas.open(tmp / "grown.zarr")
    n_old = before.corpus.attrs["n_sequences"]
    old_tokens = before.corpus["tokens"][...]
    _write_docs(corpus / "b.txt", docs[23:])
    second = _run(job(tmp / "grown.zarr", corpus), resume=True)
    # the same files mapped at once, for comparison
    whole = tmp / "whole"
    shutil.copytree(corpus, whole)
    fresh = _run(job(tmp / "fresh.zarr", whole))
    return {"tmp": tmp, "corpus": corpus, "job": job, "first": first, "second": second,
            "fresh": fresh, "n_old": n_old, "old_tokens": old_tokens}  # fmt: skip


def _record_shards(atlas: Atlas, run: str) -> list[int]:
    """Shards the record stage of ``run`` recorded (a run that did nothing has no entry)."""
    return sorted(s for r in atlas.runs() if r["run"] == run for st in r["stages"]
                  if st["stage"] == "record/tiny" for w in st["workers"] for s in w["shards"])  # fmt: skip


def test_grown_corpus_records_only_new_shards_and_equals_a_fresh_run(grown) -> None:
    tmp = grown["tmp"]
    atlas, fresh = Atlas.open(tmp / "grown.zarr"), Atlas.open(tmp / "fresh.zarr")
    n_old, rows = grown["n_old"], atlas.corpus.attrs["shard_sequences"]
    n = atlas.corpus.attrs["n_sequences"]
    assert n == fresh.corpus.attrs["n_sequences"] > n_old
    # the stored sequences are kept, the new ones appended
    np.testing.assert_array_equal(atlas.corpus["tokens"][:n_old], grown["old_tokens"])
    # the second run recorded the old short shard and the new ones, nothing before
    n_shards = len(atlas.shard_ranges())
    assert _record_shards(atlas, grown["second"]["run"]) == list(range(n_old // rows, n_shards))
    assert _record_shards(atlas, grown["first"]["run"]) == list(range(-(-n_old // rows)))
    assert atlas.attrs["complete"] and atlas.model_attrs("tiny")["complete"]
    # statistics, top-k and taxonomy: bit for bit those of one run over the whole corpus
    a, b = _arrays(tmp / "grown.zarr"), _arrays(tmp / "fresh.zarr")
    compared = [k for k in b if any(f"/{g}/" in k for g in ("stats", "topk", "taxonomy"))
                or k.startswith("corpus/") and "sample" not in k]  # fmt: skip
    assert any("/taxonomy/" in k for k in compared)
    for key in compared:
        assert a[key] == b[key], key
    # the grown sample keeps its first run's rate per shard, and the new shards are filled
    per = atlas.sample_rows_per_shard()
    assert atlas.corpus["sample_positions"].shape == (n_shards * per,)
    sample = atlas.layer_group("tiny", 0)["sample"][...]
    assert sample.shape[0] == n_shards * per and np.abs(sample[-per:]).sum() > 0
    assert verify(str(tmp / "grown.zarr"))["ok"]


def test_unchanged_corpus_is_a_no_op_and_a_rewritten_one_is_refused(grown) -> None:
    tmp, corpus, job = grown["tmp"], grown["corpus"], grown["job"]
    path = tmp / "grown.zarr"
    before = _arrays(path)
    again = _run(job(path, corpus), resume=True)
    assert _record_shards(Atlas.open(path), again["run"]) == []
    assert again["models"][0]["tokens"] == 0  # nothing recorded
    # a document changed in the middle: refused, naming the first sequence that differs
    text = (corpus / "a.txt").read_text()
    (corpus / "a.txt").write_text("Changed words here.\n\n" + text)
    with pytest.raises(AtlasError, match=r"changed, not only grew: sequence 0 differs"):
        _run(job(path, corpus), resume=True)
    after = _arrays(path)
    assert {k: v for k, v in after.items() if not k.startswith("_")} == \
           {k: v for k, v in before.items() if not k.startswith("_")}  # fmt: skip
