"""The train_seeds flow on the local backend and the session's Prefect harness.

A tiny family (2 seeds, 1 layer, d_model 32, vocab 320, 20k tokens) in a cache directory of
its own: trained once, reused on the second call without touching the weights, extended by
one seed when ``count`` grows, and a different family when the config changes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from flows.config import ResourcesConfig, SeedsConfig
from ops.models import cache_dir, load_model

LOCAL = ResourcesConfig(backend="local")
"""Seeds train in this process here; on Ray workers (one member each) in test_universality's
job with a seed family."""

TINY = dict(count=2, layers=1, d_model=32, d_mlp=64, n_heads=2, vocab_size=320, seq_len=32,
            train_tokens=20_000, batch_size=8)  # fmt: skip


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("NEURONMAP_CACHE", str(tmp_path / "cache"))
    assert cache_dir() == tmp_path / "cache"  # read at call time, not at import
    return tmp_path / "cache"


def _digest(d: Path) -> tuple[str, int]:
    f = d / "model.safetensors"
    return hashlib.sha256(f.read_bytes()).hexdigest(), f.stat().st_mtime_ns


def test_train_seeds_trains_once_then_reuses(prefect_harness, cache):
    from flows.seeds import artifact_key, family_dir, train_seeds

    cfg = SeedsConfig(**TINY)
    out = train_seeds(cfg, max_docs=200, resources=LOCAL)
    assert out["trained"] == [0, 1] and out["cached"] == []
    dirs = [Path(d) for d in out["dirs"]]
    assert [d.name for d in dirs] == ["s0", "s1"]
    fam = dirs[0].parent
    assert fam.parent == cache / "seeds" and fam.name == f"seeds-{out['key']}"
    assert Path(out["tokenizer"]) == fam / "tokenizer"
    assert set(out["losses"]) == {"s0", "s1"}
    assert out["models"] == [{"name": "seeds-s0", "source": str(dirs[0])},
                             {"name": "seeds-s1", "source": str(dirs[1])}]  # fmt: skip

    weights = []
    ids = torch.tensor([[0, 100, 200, 300, 5, 6]])
    for i, d in enumerate(dirs):
        log = json.loads((d / "train_log.json").read_text())
        assert log["key"] == out["key"] and log["seed"] == i and log["steps"] == 78
        assert log["final_loss"] == out["losses"][f"s{i}"]
        assert log["final_loss"] < log["initial_loss"] - 0.5
        assert log["tokens_per_second"] > 0 and log["torch_threads"] == 1
        loaded = load_model(str(d), dtype="float32")
        assert loaded.model_type == "gpt2" and loaded.d_mlp == 64 and loaded.n_layers == 1
        assert loaded.tokenizer is not None and len(loaded.tokenizer) == 320
        hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
        assert hf.config.n_inner == 64 and hf.config.n_positions == 32
        with torch.no_grad():
            torch.testing.assert_close(hf(input_ids=ids).logits, loaded.model(input_ids=ids).logits)
        weights.append(hf.transformer.h[0].mlp.c_fc.weight.detach())
        # every member carries the family tokenizer
        assert (d / "tokenizer.json").read_bytes() == (
            fam / "tokenizer" / "tokenizer.json"
        ).read_bytes()
    assert not torch.equal(weights[0], weights[1])  # seeds differ
    tokens = np.load(fam / "tokens.npy")
    assert tokens.shape == (78 * 8, 32) and tokens.dtype == np.uint16  # the one data order
    before = [_digest(d) for d in dirs]
    report = _latest_artifact(artifact_key(cfg))
    assert "| s0 | 0 |" in report and "| s1 | 1 |" in report and "trained" in report

    again = train_seeds(cfg, max_docs=200, resources=LOCAL)
    assert again["trained"] == [] and again["cached"] == [0, 1]
    assert again["dirs"] == out["dirs"] and again["key"] == out["key"]
    assert again["losses"] == out["losses"]
    assert [_digest(d) for d in dirs] == before  # not retrained, not rewritten

    # one more seed: the first two are reused, only s2 trains
    more = train_seeds(cfg.model_copy(update={"count": 3}), max_docs=200, resources=LOCAL)
    assert more["trained"] == [2] and more["cached"] == [0, 1]
    assert more["dirs"][:2] == out["dirs"] and [_digest(d) for d in dirs] == before

    # a different config is a different family
    other = cfg.model_copy(update={"train_tokens": 10_000})
    changed = train_seeds(other, max_docs=200, resources=LOCAL)
    assert changed["key"] != out["key"] and changed["trained"] == [0, 1]
    assert Path(changed["dirs"][0]).parent == family_dir(other, _corpus_key(200))
    assert Path(changed["dirs"][0]).parent != fam
    assert json.loads((Path(changed["dirs"][0]) / "train_log.json").read_text())["steps"] == 39


def _latest_artifact(key: str) -> str:
    """Markdown of the newest artifact with ``key`` (GET /artifacts/{key}/latest; the filter
    endpoint of this Prefect server rejects the nulls its own client sends)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        resp = client.request("GET", "/artifacts/{key}/latest", path_params={"key": key})
    assert resp.status_code == 200, f"no artifact {key!r}: {resp.status_code}"
    return str(resp.json()["data"])


def _corpus_key(max_docs: int) -> str:
    from flows.seeds import corpus_key
    from ops.corpus import bundled_documents

    return corpus_key([d.text for d in bundled_documents() if d.text][:max_docs])


def test_loss_report_markdown():
    from flows.seeds import artifact_key, loss_markdown

    logs = {
        i: {"seed": i, "final_loss": 3.0 + i, "initial_loss": 6.0, "seconds": 1.0,
            "tokens_per_second": 1000.0,
            "loss_curve": [[s, 6.0 - s / 10 + i] for s in range(0, 30, 2)]}
        for i in range(2)
    }  # fmt: skip
    md = loss_markdown(SeedsConfig(**TINY), "/x", logs, trained=[1])
    assert "| s0 | 0 | 3.000 | 1,000 | 1.0 | cached |" in md
    assert "| s1 | 1 | 4.000 | 1,000 | 1.0 | trained |" in md
    table = [ln for ln in md.splitlines() if ln.startswith("| ") and ln[2].isdigit()]
    assert len(table) == 12 and table[0].startswith("| 1 | 6.000 | 7.000 |")
    assert "█" in md and "▁" in md
    assert artifact_key(SeedsConfig(name="My_Fam.v2")) == "seeds-my-fam-v2"
