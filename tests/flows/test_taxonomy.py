"""Known answers for the neuron taxonomy: a tiny GPT-2 whose neuron 0 is wired to fire only
on one token and neuron 1 only at later positions is mapped by the real flow, and
``neuronmap neurons --kind token`` / ``--kind positional`` rank them first, with the right
trigger token and position profile; ``neuronmap layers`` summarises and plots the kinds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from storage.atlas import Atlas, AtlasError
from tests.flows.test_pipeline import _run

SEQ = 32
LATE = 16  # neuron 1 fires from this position on


@pytest.fixture(scope="module")
def wired_dir(tmp_path_factory) -> tuple[Path, str]:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from ops.corpus import bundled_documents
    from tests.conftest import _train_tokenizer

    tok = _train_tokenizer([d.text for d in bundled_documents()[:400]])
    trigger = tok.encode(" the")[0]
    cfg = GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=1, n_head=2, n_positions=64,
                     n_inner=8, activation_function="gelu_new", bos_token_id=tok.bos_token_id,
                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)  # fmt: skip
    torch.manual_seed(0)
    model = GPT2LMHeadModel(cfg).eval()
    t = model.transformer
    with torch.no_grad():
        # dims 0-1 carry the trigger, dims 2-3 the position, 4-15 the rest of the token;
        # every feature is a difference of two dims, so LayerNorm's centring keeps it
        wte = torch.randn(cfg.vocab_size, 16)
        wte[:, :4] = 0
        wte[trigger, 0], wte[trigger, 1] = 1.0, -1.0
        t.wte.weight.copy_(wte)
        wpe = torch.zeros(64, 16)
        wpe[:, 2] = torch.where(torch.arange(64) >= LATE, 1.0, -1.0)
        wpe[:, 3] = -wpe[:, 2]
        t.wpe.weight.copy_(wpe)
        block = t.h[0]
        block.attn.c_proj.weight.zero_()  # attention adds nothing to the stream
        block.attn.c_proj.bias.zero_()
        w = torch.randn(16, 8) * 0.5  # Conv1D: [n_embd, n_inner]
        w[:4] = 0
        w[:, :2] = 0
        w[0, 0], w[1, 0] = 5.0, -5.0  # neuron 0: the trigger direction
        w[2, 1], w[3, 1] = 5.0, -5.0  # neuron 1: the late-position direction
        block.mlp.c_fc.weight.copy_(w)
        block.mlp.c_fc.bias.zero_()
    out = tmp_path_factory.mktemp("wired-gpt2")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out, tok.decode([trigger])


@pytest.fixture(scope="module")
def wired_atlas(tmp_path_factory, wired_dir, ray_cluster, prefect_harness) -> Path:
    model_dir, _ = wired_dir
    path = tmp_path_factory.mktemp("taxonomy") / "wired.zarr"
    job = {
        "atlas": str(path),
        "corpus": {"source": "bundled", "seq_len": SEQ, "max_tokens": 6000, "shard_sequences": 32},
        "models": [{"name": "wired", "source": str(model_dir), "dtype": "float32"}],
        "layers": "all",
        "record": {"topk": 4, "hist_bins": 16, "batch_size": 8, "properties": True,
                   "taxonomy": {"threshold": 0.05}},
        "resources": {"backend": "local"},
    }  # fmt: skip
    _run(job)
    return path


def test_wired_neurons_rank_first(wired_atlas: Path, wired_dir, capsys) -> None:
    from flows.cli import main

    _, trigger = wired_dir
    assert main(["neurons", str(wired_atlas), "wired", "--kind", "token", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["index"] == 0 and rows[0]["layer"] == 0 and rows[0]["kind"] == "token"
    assert rows[0]["tokens"][0] == trigger and rows[0]["score"] == 1.0
    assert rows[0]["exact"] is True and "suppresses_trigger" in rows[0]
    assert main(["neurons", str(wired_atlas), "wired", "--kind", "positional", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["index"] == 1 and rows[0]["score"] > 0.9
    prof = rows[0]["positions"]  # 8 buckets of 4 positions: off before LATE, on after
    assert max(prof[: LATE * 8 // SEQ]) == 0.0 and min(prof[LATE * 8 // SEQ :]) == 1.0
    assert {"layer", "index", "kind", "score", "tokens", "positions", "source"} <= set(rows[0])
    # the token detector is no positional neuron, and the reverse
    atlas = Atlas.open(wired_atlas)
    t = atlas.taxonomy("wired", 0)
    assert t["kind_token"][0] and not t["kind_positional"][0]
    assert t["kind_positional"][1] and not t["kind_token"][1]


def test_layers_summary_plot_and_errors(wired_atlas: Path, tmp_path: Path, capsys) -> None:
    from flows.cli import main

    png = tmp_path / "kinds.png"
    assert main(["layers", str(wired_atlas), "wired", "--json", "--plot", str(png)]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    t = Atlas.open(wired_atlas).taxonomy("wired", 0)
    assert row["token"] == pytest.approx(t["kind_token"].mean()) and row["neurons"] == 8
    assert row["token"] >= 1 / 8 and row["positional"] >= 1 / 8
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # bad input: one line naming the problem, exit 2
    assert main(["neurons", str(wired_atlas), "wired", "--source", "klingon"]) == 2
    assert "unknown source 'klingon'" in capsys.readouterr().err
    with pytest.raises(AtlasError, match="layer 5"):
        Atlas.open(wired_atlas).neurons("wired", layer=5)
    # a JSON record of every kind is strict JSON (no NaN)
    assert main(["neurons", str(wired_atlas), "wired", "--json"]) == 0
    text = capsys.readouterr().out
    assert "NaN" not in text and isinstance(json.loads(text), list)


def test_source_selective_neurons_name_their_source(wired_atlas: Path) -> None:
    atlas = Atlas.open(wired_atlas)
    t, attrs = atlas.taxonomy("wired", 0), atlas.taxonomy_attrs("wired", 0)
    assert attrs["sources"] == list(atlas.corpus.attrs["source_names"])
    for r in atlas.neurons("wired", kind="source"):
        assert r["source"] == attrs["sources"][int(np.argmax(t["source_rate"][r["index"]]))]
        assert r["score"] >= 0.5
    fr = atlas.neurons("wired", source="wiki-fr", top=100)
    assert all(r["source"] == "wiki-fr" for r in fr)
