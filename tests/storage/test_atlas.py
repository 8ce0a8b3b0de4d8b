"""Tests for storage.atlas: a small atlas built through the write API, then queried back."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ops.stats import hist_spec
from storage.atlas import Atlas
from storage.errors import AtlasError
from storage.integrity import ChunkError
from storage.layout import STAT_NAMES
from storage.store import Store

# ---------------------------------------------------------------------------- toy atlas

MODEL = "toy"
INCOMPLETE = "half"
D_MLP = 3
K = 3
BINS = 8

# id -> bytes; " caf" + b"\xc3" + b"\xa9" decodes to " café" (é split over two tokens)
VOCAB = [b"<s>", b" the", b" cat", b"\xc3", b"\xa9", b" sat", b"<pad>", b" caf", b".", b" on"]
BOS, PAD = 0, 6
TOKENS = np.array(
    [
        [0, 1, 2, 5, 9, 1, 2, 8],  # " the cat sat on the cat."
        [0, 1, 7, 3, 4, 8, 6, 6],  # " the café." + 2 pad
        [0, 9, 1, 2, 8, 6, 6, 6],  # " on the cat." + 3 pad
        [0, 2, 5, 8, 6, 6, 6, 6],  # " cat sat." + 4 pad
        [0, 1, 2, 9, 1, 7, 3, 4],  # " the cat on the café"
        [0, 5, 9, 1, 2, 8, 6, 6],  # " sat on the cat." + 2 pad
    ],
    dtype=np.int32,
)
MASK = (TOKENS != BOS) & (TOKENS != PAD)
DOC_IDS = np.array([0, 1, 1, 2, 3, 3])
SOURCES = np.array([0, 1, 0, 1, 0, 1])
SOURCE_NAMES = ["wiki_en", "shakespeare"]
SAMPLE_POSITIONS = np.array([1, 10, 33, 42])  # 2 rows per shard
SHARD_SEQUENCES = 4

STATS = {
    0: {
        "count": np.array([40, 41, 42]),
        "mean": np.array([0.125, -0.25, 0.5]),
        "var": np.array([0.0625, 4.0, 0.25]),
        "skew": np.array([0.5, -1.0, 2.0]),
        "kurt": np.array([3.0, 4.0, 5.0]),
        "min": np.array([-1.0, -2.0, -3.0]),
        "max": np.array([1.0, 5.0, 2.0]),
        "frac_active": np.array([0.5, 0.25, 0.75]),
        "hist": np.arange(D_MLP * BINS).reshape(D_MLP, BINS),
        "dead": np.array([True, False, False]),
        "massive": np.array([False, True, False]),
    },
    1: {
        "count": np.array([40, 40, 40]),
        "mean": np.array([0.0, 0.0, 1.5]),
        "var": np.array([0.0, 0.0, 2.0]),
        "skew": np.array([0.0, 0.0, 0.25]),
        "kurt": np.array([0.0, 0.0, 3.5]),
        "min": np.array([0.0, 0.0, -0.5]),
        "max": np.array([0.0, 0.0, 9.0]),
        "frac_active": np.array([0.0, 0.0, 0.5]),
        "hist": np.zeros((D_MLP, BINS), dtype=np.int64),
        "dead": np.array([True, True, False]),
        "massive": np.array([False, False, False]),
    },
}
NAN = np.nan
TOPK = {
    0: (
        np.array([[1.0, 0.5, 0.25], [5.0, 3.5, 1.25], [2.0, NAN, NAN]], dtype=np.float32),
        # neuron 1: stored order is by value, not by position; neuron 2 has 2 empty slots
        np.array([[1, 9, 17], [13, 2, 45], [37, -1, -1]], dtype=np.int64),
    ),
    1: (
        np.array([[4.0, NAN, NAN], [NAN, NAN, NAN], [7.0, 6.0, NAN]], dtype=np.float32),
        np.array([[25, -1, -1], [-1, -1, -1], [3, 4, -1]], dtype=np.int64),
    ),
}
MODEL_ATTRS = {
    "source": "toy-src",
    "architecture": "GPT2LMHeadModel",
    "n_layers": 2,
    "d_mlp": D_MLP,
    "hook_site": "mlp.c_proj",
    "dtype": "float32",
}


SAMPLE_ROWS = {0: np.array([[0.5, -1.0, 2.0], [1.5, 0.0, -0.25]]),
               1: np.array([[3.0, 0.125, -2.0], [0.0, 4.0, 1.0]])}  # fmt: skip
PROPS = {"norm_out": np.array([1.0, 2.0, 0.5])}


def build_atlas(path: str | Path) -> Atlas:
    """A complete 2-layer model ``toy`` and an initialised but incomplete model ``half``."""
    atlas = Store.create(path, {"tokenizer": "toy-tok", "code_version": "test"})
    atlas.write_corpus(
        tokens=TOKENS,
        doc_ids=DOC_IDS,
        sources=SOURCES,
        source_names=SOURCE_NAMES,
        mask=MASK,
        vocab=VOCAB,
        shard_sequences=SHARD_SEQUENCES,
        sample_positions=SAMPLE_POSITIONS,
        attrs={"source": "toy"},
    )
    edges = hist_spec(BINS).edges()
    for name in (MODEL, INCOMPLETE):
        atlas.init_model(name, MODEL_ATTRS, layers=[0, 1], d_mlp=D_MLP, k=K,
                         hist_edges=edges, sample_layers=[1])  # fmt: skip
    for layer in (0, 1):
        atlas.write_layer_stats(MODEL, layer, STATS[layer], *TOPK[layer])
    for shard in (0, 1):  # a complete model has every shard's sample rows
        atlas.write_sample(MODEL, 1, shard, SAMPLE_ROWS[shard])
    atlas.write_props(MODEL, 0, PROPS)
    atlas.model_group(MODEL).attrs.update({"complete": True})
    return atlas


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Read-only atlas shared by the query tests (writers get their own)."""
    path = tmp_path_factory.mktemp("atlas") / "a.zarr"
    build_atlas(path)
    return str(path)


@pytest.fixture
def ro(built: str) -> Atlas:
    return Atlas.open(built)


@pytest.fixture
def rw(tmp_path: Path) -> Atlas:
    return build_atlas(tmp_path / "rw.zarr")


# ---------------------------------------------------------------------------- create / open


def test_create_then_open_keeps_attrs(built: str) -> None:
    a = Atlas.open(built)
    assert a.attrs["schema_version"] == 1
    assert a.attrs["tokenizer"] == "toy-tok"
    assert a.models == [INCOMPLETE, MODEL]
    assert a.layers(MODEL) == [0, 1]
    assert a.model_attrs(MODEL)["layers"] == [0, 1]
    assert a.model_attrs(MODEL)["complete"] is True
    assert Atlas.exists(built)


def test_open_missing_path_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.zarr"
    with pytest.raises(AtlasError, match="no atlas at") as ei:
        Atlas.open(missing)
    assert str(missing) in str(ei.value)
    assert not Atlas.exists(missing)


def test_open_foreign_zarr_group_is_refused(tmp_path: Path) -> None:
    import zarr

    path = tmp_path / "foreign.zarr"
    zarr.open_group(str(path), mode="w").attrs["hello"] = 1
    with pytest.raises(AtlasError, match="not a neuronmap atlas") as ei:
        Atlas.open(path)
    assert str(path) in str(ei.value)


def test_create_refuses_non_empty_dir(tmp_path: Path) -> None:
    d = tmp_path / "busy"
    d.mkdir()
    (d / "keep.txt").write_text("precious")
    with pytest.raises(AtlasError, match="already exists") as ei:
        Store.create(d, {})
    assert str(d) in str(ei.value)
    assert sorted(p.name for p in d.iterdir()) == ["keep.txt"]
    assert (d / "keep.txt").read_text() == "precious"


def test_create_refuses_existing_file(tmp_path: Path) -> None:
    f = tmp_path / "file.zarr"
    f.write_text("x")
    with pytest.raises(AtlasError, match="already exists"):
        Store.create(f, {})
    assert f.read_text() == "x"


def test_create_accepts_empty_existing_dir(tmp_path: Path) -> None:
    d = tmp_path / "empty"
    d.mkdir()
    Store.create(d, {"tokenizer": "t"})
    a = Atlas.open(d)
    assert a.attrs["tokenizer"] == "t"
    assert a.models == []
    with pytest.raises(AtlasError, match="no corpus"):
        a.shard_ranges()


def test_second_corpus_is_refused(rw: Atlas) -> None:
    with pytest.raises(AtlasError, match="already has a corpus"):
        rw.write_corpus(TOKENS, DOC_IDS, SOURCES, SOURCE_NAMES, MASK, VOCAB, 4,
                        SAMPLE_POSITIONS, {})  # fmt: skip


# ---------------------------------------------------------------------------- corpus


def test_shard_ranges_cover_all_rows(ro: Atlas) -> None:
    ranges = ro.shard_ranges()
    assert ranges == [(0, 4), (4, 6)]
    shards = [ro.read_shard(i) for i in range(len(ranges))]
    assert [t.shape for t, _ in shards] == [(4, 8), (2, 8)]
    np.testing.assert_array_equal(np.concatenate([t for t, _ in shards]), TOKENS)
    np.testing.assert_array_equal(np.concatenate([m for _, m in shards]), MASK)
    assert shards[0][0].dtype == np.int32
    assert shards[0][1].dtype == np.bool_
    # one Zarr chunk per shard
    assert ro.corpus["tokens"].chunks == (SHARD_SEQUENCES, 8)
    with pytest.raises(IndexError):
        ro.read_shard(2)


def test_corpus_attrs(ro: Atlas) -> None:
    a = ro.corpus.attrs
    assert a["n_sequences"] == 6
    assert a["seq_len"] == 8
    assert a["n_tokens"] == int(MASK.sum())
    assert a["shard_sequences"] == SHARD_SEQUENCES
    assert a["source_names"] == SOURCE_NAMES
    assert a["source"] == "toy"
    np.testing.assert_array_equal(ro.corpus["doc_ids"][:], DOC_IDS)
    np.testing.assert_array_equal(ro.corpus["sources"][:], SOURCES)
    np.testing.assert_array_equal(ro.corpus["sample_positions"][:], SAMPLE_POSITIONS)
    assert ro.sample_rows_per_shard() == 2


def test_shard_sequences_larger_than_corpus(tmp_path: Path) -> None:
    a = Store.create(tmp_path / "one.zarr", {})
    a.write_corpus(TOKENS, DOC_IDS, SOURCES, SOURCE_NAMES, MASK, VOCAB, 100,
                   SAMPLE_POSITIONS, {})  # fmt: skip
    assert a.shard_ranges() == [(0, 6)]
    np.testing.assert_array_equal(a.read_shard(0)[0], TOKENS)


def test_decode_reassembles_split_utf8(ro: Atlas) -> None:
    assert ro.decode(TOKENS[1, 1:6]) == " the café."
    assert ro.decode([7, 3, 4]) == " café"
    assert ro.token_bytes([3]) == b"\xc3"
    assert ro.decode([3]) == "\ufffd"  # half a character alone is replaced, not an error
    assert ro.decode([]) == ""
    # out-of-vocabulary ids are skipped
    assert ro.decode([1, 99, -1, 2]) == " the cat"
    assert [ro.decode([i]) for i in (0, 1, 2)] == ["<s>", " the", " cat"]


# ---------------------------------------------------------------------------- models


def test_init_model_presizes_with_fill_values(built: str) -> None:
    L = Store.open(built).model_group(INCOMPLETE)["layers"]["0"]  # writers see fill values
    assert L["stats"]["mean"].shape == (D_MLP,)
    assert L["stats"]["hist"].shape == (D_MLP, BINS)
    assert np.isnan(L["stats"]["mean"][:]).all()
    assert (L["stats"]["count"][:] == -1).all()
    assert not L["stats"]["dead"][:].any()
    assert (L["topk"]["positions"][:] == -1).all()
    assert L["topk"]["values"].shape == (D_MLP, K)
    np.testing.assert_array_equal(L["stats"]["hist_edges"][:], hist_spec(BINS).edges())
    # the sample only exists on the sample layers
    assert "sample" not in L
    assert L.basename == "0" and Atlas.open(built).model_group(INCOMPLETE)["layers"]["1"][
        "sample"].shape == (4, D_MLP)  # fmt: skip


def test_queries_refuse_unwritten_chunks(ro: Atlas) -> None:
    """An unwritten region is an error for queries, never its fill value."""
    with pytest.raises(ChunkError, match=r"chunk models/half/layers/0/stats/mean/c/0 .* missing"):
        ro.model_group(INCOMPLETE)["layers"]["0"]["stats"]["mean"][:]


def test_init_model_twice_keeps_written_data(rw: Atlas) -> None:
    rw.init_model(MODEL, {**MODEL_ATTRS, "complete": True}, layers=[0, 1], d_mlp=D_MLP, k=K,
                  hist_edges=hist_spec(BINS).edges(), sample_layers=[1])  # fmt: skip
    np.testing.assert_array_equal(rw.stats(MODEL, 0)["mean"], STATS[0]["mean"])


def test_stats_round_trip(ro: Atlas) -> None:
    for layer in (0, 1):
        got = ro.stats(MODEL, layer)
        assert set(got) == set(STAT_NAMES) | {"hist_edges"}
        for name in STAT_NAMES:
            np.testing.assert_array_equal(got[name], STATS[layer][name], err_msg=name)
        assert got["count"].dtype == np.int64
        assert got["dead"].dtype == np.bool_
        assert got["max"].dtype == np.float32
        assert got["hist_edges"].shape == (BINS + 1,)


def test_neuron_stats_and_examples(ro: Atlas) -> None:
    rec = ro.neuron(MODEL, 0, 1)
    assert (rec.model, rec.layer, rec.index) == (MODEL, 0, 1)
    s = rec.stats
    assert s["count"] == 41 and isinstance(s["count"], int)
    assert s["mean"] == -0.25
    assert s["var"] == 4.0
    assert s["min"] == -2.0 and s["max"] == 5.0
    assert s["frac_active"] == 0.25
    assert s["dead"] is False and s["massive"] is True
    assert s["hist"] == list(range(BINS, 2 * BINS))
    assert s["hist_edges"] == hist_spec(BINS).edges().tolist()

    ex = rec.examples
    # stored order (by value), not position order
    assert [e.rank for e in ex] == [0, 1, 2]
    assert [e.value for e in ex] == [5.0, 3.5, 1.25]
    assert [e.position for e in ex] == [13, 2, 45]
    assert [(e.sequence, e.token_index) for e in ex] == [(1, 5), (0, 2), (5, 5)]
    assert [e.token for e in ex] == [".", " cat", "."]
    assert [e.source for e in ex] == ["shakespeare", "wiki_en", "shakespeare"]
    # BOS and padding are left out of the context; é is rebuilt from its two tokens
    assert ex[0].text == " the café[[.]]"
    assert ex[1].text == " the[[ cat]] sat on the cat"
    assert ex[2].text == " sat on the cat[[.]]"
    assert "<s>" not in "".join(e.text for e in ex)
    assert "<pad>" not in "".join(e.text for e in ex)


def test_neuron_split_char_in_right_context(ro: Atlas) -> None:
    (ex,) = ro.neuron(MODEL, 0, 2).examples
    assert ex.token == " caf"
    assert ex.text == " the cat on the[[ caf]]é"


def test_neuron_honours_k_and_context(ro: Atlas) -> None:
    assert [e.value for e in ro.neuron(MODEL, 0, 1, k=2).examples] == [5.0, 3.5]
    assert [e.value for e in ro.neuron(MODEL, 0, 1, k=1).examples] == [5.0]
    assert ro.neuron(MODEL, 0, 1, k=0).examples == []
    assert len(ro.neuron(MODEL, 0, 1, k=10).examples) == 3
    ex = ro.neuron(MODEL, 0, 1, context=2).examples
    assert ex[2].text == " the cat[[.]]"  # 2 tokens of left context
    assert ex[1].text == " the[[ cat]] sat on"  # right context: max(context // 3, 2)


def test_neuron_skips_empty_topk_slots(ro: Atlas) -> None:
    assert len(ro.neuron(MODEL, 0, 2).examples) == 1
    assert ro.neuron(MODEL, 1, 1).examples == []
    ex = ro.neuron(MODEL, 1, 2).examples
    assert [(e.rank, e.value, e.position) for e in ex] == [(0, 7.0, 3), (1, 6.0, 4)]
    assert [e.text for e in ex] == [" the cat[[ sat]] on the cat.", " the cat sat[[ on]] the cat."]


def test_neuron_record_to_dict_is_json(ro: Atlas) -> None:
    d = json.loads(json.dumps(ro.neuron(MODEL, 0, 1, k=2).to_dict()))
    assert d["model"] == MODEL and d["index"] == 1
    assert [e["value"] for e in d["examples"]] == [5.0, 3.5]
    assert d["examples"][0]["text"] == " the café[[.]]"


def test_unknown_model_names_available(ro: Atlas) -> None:
    with pytest.raises(AtlasError) as ei:
        ro.neuron("gpt9", 0, 0)
    msg = str(ei.value)
    assert "'gpt9'" in msg and MODEL in msg and INCOMPLETE in msg
    with pytest.raises(AtlasError, match="gpt9"):
        ro.stats("gpt9", 0)


def test_unknown_layer(ro: Atlas) -> None:
    with pytest.raises(AtlasError, match=r"layer 7 .*recorded layers: \[0, 1\]"):
        ro.neuron(MODEL, 7, 0)
    with pytest.raises(AtlasError, match="layer 7"):
        ro.stats(MODEL, 7)
    with pytest.raises(AtlasError, match="layer -1"):
        ro.neuron(MODEL, -1, 0)


@pytest.mark.parametrize("index", [-1, D_MLP, 1000])
def test_neuron_index_out_of_range(ro: Atlas, index: int) -> None:
    with pytest.raises(AtlasError, match=f"neuron index {index} out of range.*{D_MLP} neurons"):
        ro.neuron(MODEL, 0, index)


def test_neuron_on_incomplete_model(ro: Atlas) -> None:
    with pytest.raises(AtlasError, match="not complete") as ei:
        ro.neuron(INCOMPLETE, 0, 0)
    assert repr(INCOMPLETE) in str(ei.value)


# ---------------------------------------------------------------------------- info


def test_info(ro: Atlas, built: str) -> None:
    info = ro.info()
    assert info["path"] == built
    assert info["schema_version"] == 1
    assert info["tokenizer"] == "toy-tok"
    assert info["code_version"] == "test"
    assert info["corpus"] == {
        "n_sequences": 6,
        "seq_len": 8,
        "n_tokens": int(MASK.sum()),
        "shards": 2,
        "sources": SOURCE_NAMES,
        "sample_tokens": 4,
    }
    m = info["models"][MODEL]
    assert m["complete"] is True
    assert m["architecture"] == "GPT2LMHeadModel" and m["d_mlp"] == D_MLP
    assert set(m["layers"]) == {0, 1}
    assert m["layers"][0]["dead_frac"] == pytest.approx(1 / 3)
    assert m["layers"][1]["dead_frac"] == pytest.approx(2 / 3)
    assert m["layers"][0]["massive"] == 1
    assert m["layers"][1]["massive"] == 0
    assert m["layers"][0]["mean_frac_active"] == pytest.approx(0.5)
    assert m["layers"][1]["mean_frac_active"] == pytest.approx(0.5 / 3)
    # incomplete models are listed without layer summaries
    assert info["models"][INCOMPLETE]["complete"] is None
    assert info["models"][INCOMPLETE]["layers"] == {}


def test_info_without_corpus(tmp_path: Path) -> None:
    Store.create(tmp_path / "bare.zarr", {})
    info = Atlas.open(tmp_path / "bare.zarr").info()
    assert "corpus" not in info
    assert info["models"] == {}


# ---------------------------------------------------------------------------- writers


def test_write_sample_writes_exactly_one_shard(rw: Atlas) -> None:
    MODEL = INCOMPLETE  # noqa: N806 (its sample is not written yet)
    arr = rw.model_group(MODEL)["layers"]["1"]["sample"]
    assert arr.dtype == np.float16
    assert arr.chunks == (2, D_MLP)
    rows = np.array([[1.5, -2.0, 3.0], [0.25, 8.0, -0.5]], dtype=np.float32)
    rw.write_sample(MODEL, 1, 1, rows)
    ro = Atlas.open(rw.path).model_group(MODEL)["layers"]["1"]["sample"]
    np.testing.assert_array_equal(ro[2:4], rows.astype(np.float16))
    with pytest.raises(ChunkError, match="sample/c/0/0 .* missing"):  # shard 0 not written yet
        ro[:2]
    rw.write_sample(MODEL, 1, 0, rows[::-1])
    sample = rw.model_group(MODEL)["layers"]["1"]["sample"][:]
    np.testing.assert_array_equal(sample, np.concatenate([rows[::-1], rows]).astype(np.float16))


def test_sample_by_shard_reads_only_the_shards_asked_for(rw: Atlas) -> None:
    got = rw.sample(MODEL, 1)
    assert [s for s, _, _ in got] == [0, 1]
    for s, x, pos in got:
        np.testing.assert_array_equal(x, SAMPLE_ROWS[s].astype(np.float16).astype(np.float32))
        np.testing.assert_array_equal(pos, SAMPLE_POSITIONS[2 * s : 2 * s + 2])
    assert rw.sample_counts() == {0: 2, 1: 2}
    # INCOMPLETE has only shard 1's rows: asking for it alone never touches shard 0's chunk
    rw.write_sample(INCOMPLETE, 1, 1, SAMPLE_ROWS[1])
    ro = Atlas.open(rw.path)
    [(s, x, _)] = ro.sample(INCOMPLETE, 1, shards=[1])
    assert s == 1 and x.shape == (2, D_MLP)
    with pytest.raises(ChunkError):
        ro.sample(INCOMPLETE, 1)


def test_write_layer_stats_overwrites(rw: Atlas) -> None:
    new = {k: v.copy() for k, v in STATS[0].items()}
    new["mean"] = np.array([9.0, 8.0, 7.0])
    vals = np.full((D_MLP, K), np.nan, np.float32)
    pos = np.full((D_MLP, K), -1, np.int64)
    vals[1, 0], pos[1, 0] = 2.5, 0
    rw.write_layer_stats(MODEL, 0, new, vals, pos)
    rec = Atlas.open(rw.path).neuron(MODEL, 0, 1)
    assert rec.stats["mean"] == 8.0
    assert [(e.value, e.text) for e in rec.examples] == [(2.5, "[[<s>]] the cat sat on")]


def test_manifest_accumulates_and_resets(rw: Atlas) -> None:
    assert rw.done("record") == {}
    rw.mark("record", "fp1", [1])
    assert rw.done("record") == {"fingerprint": "fp1", "shards": [1], "complete": False}
    rw.mark("record", "fp1", [0, 1])
    rw.mark("record", "fp1", np.array([3]))
    assert rw.done("record")["shards"] == [0, 1, 3]
    assert rw.done("other") == {}
    rw.mark("record", "fp1", complete=True)
    assert rw.done("record") == {"fingerprint": "fp1", "shards": [0, 1, 3], "complete": True}
    # persisted, visible to a fresh reader
    assert Atlas.open(rw.path).done("record")["shards"] == [0, 1, 3]
    # a different job fingerprint starts over
    rw.mark("record", "fp2", [2])
    assert rw.done("record") == {"fingerprint": "fp2", "shards": [2], "complete": False}
    # stages are independent
    rw.mark("merge", "fpm", [5])
    assert rw.done("record")["shards"] == [2]
    assert rw.done("merge")["shards"] == [5]


def test_mark_updates_timestamp_attr(rw: Atlas) -> None:
    rw.root.attrs["updated"] = "old"
    rw.mark("record", "fp", [0])
    assert rw.attrs["updated"] != "old"


def test_partials_round_trip_overwrite_and_drop(rw: Atlas) -> None:
    with pytest.raises(AtlasError, match=f"shard 0 of '{MODEL}' is missing"):
        rw.read_partial(MODEL, 0)
    s = np.arange(12, dtype=np.float64).reshape(2, 2, 3)
    rw.write_partial(MODEL, 0, {"sum": s, "n": np.int64(7)})
    got = Store.open(rw.path).read_partial(MODEL, 0)
    assert set(got) == {"sum", "n"}
    np.testing.assert_array_equal(got["sum"], s)
    assert got["sum"].dtype == np.float64
    np.testing.assert_array_equal(got["n"], [7])  # scalars come back as shape (1,)

    # a stale partial is replaced entirely (other shape, dropped keys gone)
    rw.write_partial(MODEL, 0, {"sum": np.ones((4,), np.float32)})
    got = rw.read_partial(MODEL, 0)
    assert set(got) == {"sum"}
    np.testing.assert_array_equal(got["sum"], np.ones(4, np.float32))

    rw.write_partial(MODEL, 1, {"sum": np.zeros(2)})
    rw.write_partial(INCOMPLETE, 1, {"sum": np.full(2, 3.0)})
    np.testing.assert_array_equal(rw.read_partial(MODEL, 1)["sum"], [0.0, 0.0])
    rw.drop_partials(MODEL)
    with pytest.raises(AtlasError, match="missing"):
        rw.read_partial(MODEL, 0)
    with pytest.raises(AtlasError, match="missing"):
        rw.read_partial(MODEL, 1)
    np.testing.assert_array_equal(rw.read_partial(INCOMPLETE, 1)["sum"], [3.0, 3.0])
    rw.drop_partials("never-written")  # no-op


def test_touch_updates_attrs(rw: Atlas) -> None:
    rw.touch(note="hi")
    assert Atlas.open(rw.path).attrs["note"] == "hi"


def test_mark_token_widens_partial_utf8_characters() -> None:
    from storage.records import mark_token

    assert mark_token(b" caf", b"\xc3", b"\xa9 au lait") == " caf[[é]] au lait"
    assert mark_token(b" caf\xc3", b"\xa9", b" x") == " caf[[é]] x"
    assert mark_token(b" the", b" cat", b" sat") == " the[[ cat]] sat"
    # a 3-byte character split over three tokens, the middle one activating
    assert mark_token(b"A\xe6", b"\x9d", b"\xb1B") == "A[[東]]B"


def _write_partial(args: tuple[str, int]) -> int:
    path, shard = args
    Store.open(path).write_partial(MODEL, shard, {"x": np.full(3, shard)})
    return shard


def test_concurrent_workers_create_the_work_group(rw: Atlas) -> None:
    """Workers' first partials race to create ``_work/<model>``; none may fail (this raced
    in the record stage and cost a task retry)."""
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(8) as pool:
        assert pool.map(_write_partial, [(rw.path, s) for s in range(16)]) == list(range(16))
    for s in range(16):
        np.testing.assert_array_equal(rw.read_partial(MODEL, s)["x"], np.full(3, s))


def test_rewriting_a_dictionary_drops_its_stale_steering(rw: Atlas) -> None:
    def write(run: str) -> None:
        rw.write_dictionary(MODEL, 1, "snmf", run, {"Z": np.ones((D_MLP, 2))},
                            {"max": np.ones(2)}, np.zeros((2, 1)), np.zeros((2, 1)), {})  # fmt: skip

    result = {"alpha": 1.0, "alpha_rel": 1.0, "kl": 0.5, "target_kl": 0.5, "converged": True,
              "promoted": [[1, 0.1]], "suppressed": [[2, -0.1]], "evaluations": [[1.0, 0.5]]}  # fmt: skip
    write("a")
    write("ab")
    rw.write_steering(MODEL, 1, {"snmf/a/0": result, "snmf/ab/1": result,
                                 "diffmeans/x-vs-y": result}, {"diffmeans/x-vs-y": np.ones(D_MLP)})  # fmt: skip
    write("a")  # retrained: its features are new directions
    assert sorted(rw.steering(MODEL, 1)) == ["diffmeans/x-vs-y", "snmf/ab/1"]
    np.testing.assert_array_equal(rw.steering_direction(MODEL, 1, "diffmeans/x-vs-y"), 1.0)


def test_require_group_survives_losing_the_creation_race(tmp_path: Path) -> None:
    """Deterministic version of the race above: the other worker creates the group between
    our existence check and our create, so our create raises; we must get the group anyway."""
    import zarr
    from zarr.errors import ContainsGroupError

    from storage.store import _require_group

    root = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")

    class Racing:
        calls = 0

        def require_group(self, name: str):
            Racing.calls += 1
            if Racing.calls == 1:
                root.create_group(name)  # the other worker wins
                raise ContainsGroupError(f"A group exists at path {name!r}")
            return root.require_group(name)

        def __getitem__(self, name: str):
            return root[name]

    g = _require_group(Racing(), "_work")  # type: ignore[arg-type]
    assert g.path == "_work" and Racing.calls == 2


def test_query_atlas_is_read_only(built: str) -> None:
    """The query API cannot write: no writer methods, and its Zarr root is opened read-only."""
    ro = Atlas.open(built)
    writers = {n for n in dir(Store) if n.startswith(("write_", "init_", "mark", "drop_", "record_"))}
    assert writers and not any(hasattr(ro, n) for n in writers)
    with pytest.raises(Exception):  # noqa: B017 - zarr's read-only error type varies by version
        ro.root.attrs["x"] = 1
    assert "x" not in Atlas.open(built).attrs
