"""The real pretrained model through the whole flow: SmolLM2-135M-Instruct from the bundled GGUF."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from flows.config import parse_job
from storage.atlas import Atlas

pytestmark = pytest.mark.slow


def test_smollm2_maps_into_a_queryable_atlas(tmp_path: Path, ray_cluster, prefect_harness) -> None:
    from flows.pipeline import map_neurons

    path = tmp_path / "smol.zarr"
    job = parse_job({
        "atlas": str(path),
        "corpus": {"seq_len": 64, "max_tokens": 1500, "shard_sequences": 16},
        "models": [{"name": "smollm2", "source": "smollm2", "dtype": "bfloat16"}],
        "layers": [0, 15, 29],
        "record": {"topk": 8, "sample_tokens": 128, "sample_layers": [15]},
        "resources": {"backend": "local"},
    })  # fmt: skip
    out = map_neurons(job)
    atlas = Atlas.open(path)
    a = atlas.model_attrs("smollm2")
    assert a["architecture"] == "llama" and a["n_layers"] == 30 and a["d_mlp"] == 1536
    assert a["complete"] and out["models"][0]["tokens"] == atlas.corpus.attrs["n_tokens"]
    st = atlas.stats("smollm2", 29)
    assert st["mean"].shape == (1536,) and np.isfinite(st["var"]).all()
    assert (st["hist"].sum(1) == st["count"]).all()
    assert set(atlas.corpus.attrs["source_names"]) == {
        "wiki-en",
        "wiki-es",
        "wiki-fr",
        "shakespeare",
    }
    # the strongest example of the strongest neuron decodes to readable text
    j = int(np.argmax(st["max"]))
    rec = atlas.neuron("smollm2", 29, j, k=3)
    assert rec.examples[0].value == pytest.approx(float(st["max"][j]))
    assert "[[" in rec.examples[0].text and len(rec.examples[0].text) > 10
    sample = atlas.model_group("smollm2")["layers"]["15"]["sample"][...]
    assert np.abs(sample).sum() > 0 and "sample" not in atlas.model_group("smollm2")["layers"]["0"]
