"""Tests for flows.config: the bundled default job, validation messages, fingerprints."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from flows.config import DEFAULT_JOB, JobConfig, JobConfigError, load_job, parse_job
from ops.errors import NeuronmapError

BASE: dict[str, Any] = {
    "atlas": "/tmp/somewhere.zarr",
    "corpus": {"source": "bundled", "seq_len": 16, "max_tokens": 1000, "shard_sequences": 4},
    "models": [{"name": "m1", "source": "smollm2"}],
    "layers": [0, 1],
    "record": {"topk": 4, "hist_bins": 16},
    "resources": {"workers": 1},
}


def job(**changes: Any) -> dict[str, Any]:
    """BASE with top-level keys replaced; nested dicts are merged one level deep."""
    d = copy.deepcopy(BASE)
    for k, v in changes.items():
        if isinstance(v, dict) and isinstance(d.get(k), dict):
            d[k] = {**d[k], **v}
        else:
            d[k] = v
    return d


def error_of(data: Any) -> str:
    with pytest.raises(JobConfigError) as ei:
        parse_job(data, origin="test-job")
    return str(ei.value)


# ---------------------------------------------------------------------------- valid jobs


def test_default_job_validates() -> None:
    j = load_job()
    assert isinstance(j, JobConfig)
    assert DEFAULT_JOB.is_file()
    assert [m.name for m in j.models] == ["smollm2"]
    assert j.models[0].source == "smollm2"
    assert j.models[0].dtype == "auto"  # bf16 only where the CPU has it natively
    assert j.corpus.seq_len == 128
    assert j.corpus.shard_sequences == 64
    assert j.layers == "all"
    assert j.record.topk == 32
    assert j.record.hist_bins == 256
    assert j.record.sample_layers == [15]
    assert j.resources.workers == 2


def test_load_job_overrides(tmp_path: Path) -> None:
    assert load_job(atlas=str(tmp_path / "x.zarr")).atlas == str(tmp_path / "x.zarr")
    assert load_job(atlas=None).atlas == "./atlas.zarr"  # None = keep the file's value


def test_parse_job_defaults_and_normalisation() -> None:
    j = parse_job({"models": [{"name": "a", "source": "s"}], "layers": [3, 1, 3]})
    assert j.layers == [1, 3]  # sorted, de-duplicated
    assert j.atlas == "./atlas.zarr"
    assert j.corpus.seq_len == 128
    assert j.models[0].dtype == "auto"
    assert j.models[0].revision is None
    assert j.record.sample_layers == "all"
    assert j.resources.gpus == "auto"


def test_job_is_frozen() -> None:
    j = parse_job(BASE)
    with pytest.raises(ValidationError, match="frozen"):
        j.atlas = "elsewhere"  # type: ignore[misc]
    assert j.atlas == BASE["atlas"]


def test_load_job_from_file(tmp_path: Path) -> None:
    p = tmp_path / "job.yaml"
    p.write_text(yaml.safe_dump(BASE))
    j = load_job(p)
    assert j.corpus.seq_len == 16
    assert j.layers == [0, 1]
    assert j.record.hist_bins == 16
    assert load_job(str(p), atlas="other.zarr").atlas == "other.zarr"


# ---------------------------------------------------------------------------- invalid jobs


@pytest.mark.parametrize(
    ("data", "field", "words"),
    [
        (job(corpus={"seqlen": 5}), "corpus.seqlen", "Extra inputs are not permitted"),
        (job(colour="red"), "colour", "Extra inputs are not permitted"),
        (job(models=[{"name": "m", "source": "s", "dtyp": "float32"}]), "models.0.dtyp", "Extra"),
        (job(corpus={"seq_len": "x"}), "corpus.seq_len", "integer"),
        (job(corpus={"seq_len": 1}), "corpus.seq_len", "greater than or equal to 2"),
        (job(corpus={"shard_sequences": 0}), "corpus.shard_sequences", "greater than or equal"),
        (job(record={"hist_bins": 17}), "record", "hist_bins must be even"),
        (job(record={"hist_min": 10.0, "hist_max": 1.0}), "record", "hist_max must be larger"),
        (job(record={"topk": 0}), "record.topk", "greater than or equal to 1"),
        (
            job(models=[{"name": "a", "source": "s"}, {"name": "a", "source": "t"}]),
            "models",
            "repeated: ['a']",
        ),
        (job(models=[{"name": "org/model", "source": "s"}]), "models.0.name", "'org/model'"),
        (job(models=[{"name": "a--b", "source": "s"}]), "models.0.name", "no '--'"),
        (job(models=[{"name": "ok", "source": "s", "dtype": "int8"}]), "models.0.dtype", "float32"),
        (job(models=[{"name": "ok"}]), "models.0.source", "Field required"),
        (job(layers=[0, -1]), "layers", "layer indices must be >= 0"),
        (job(layers=[]), "layers", "non-empty"),
        (job(models=[]), "models", "at least 1 item"),
        ({"corpus": {}}, "models", "Field required"),
        (job(resources={"workers": 0}), "resources.workers", "greater than or equal to 1"),
    ],
)
def test_invalid_job_names_field(data: dict, field: str, words: str) -> None:
    msg = error_of(data)
    assert msg.startswith("invalid job test-job:")
    assert f"field '{field}'" in msg
    assert words in msg


def test_every_error_is_reported() -> None:
    msg = error_of(job(corpus={"seq_len": 1}, record={"topk": 0}, colour="red"))
    assert "field 'corpus.seq_len'" in msg
    assert "field 'record.topk'" in msg
    assert "field 'colour'" in msg


def test_top_level_must_be_mapping() -> None:
    assert "expected a mapping" in error_of(["models"])
    assert "expected a mapping" in error_of(None)


def test_job_config_error_is_a_neuronmap_error() -> None:
    assert issubclass(JobConfigError, NeuronmapError)


def test_invalid_field_in_file_names_file_and_field(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(job(corpus={"seq_len": "x"})))
    with pytest.raises(JobConfigError) as ei:
        load_job(p)
    msg = str(ei.value)
    assert str(p) in msg
    assert "field 'corpus.seq_len'" in msg


def test_invalid_yaml_names_file(tmp_path: Path) -> None:
    p = tmp_path / "broken.yaml"
    p.write_text("models: [ {name: a, source: b\ncorpus: : :\n")
    with pytest.raises(JobConfigError, match="not valid YAML") as ei:
        load_job(p)
    assert str(p) in str(ei.value)


def test_missing_file_names_file(tmp_path: Path) -> None:
    p = tmp_path / "nope.yaml"
    with pytest.raises(JobConfigError, match="job file not found") as ei:
        load_job(p)
    assert str(p) in str(ei.value)
    with pytest.raises(JobConfigError, match="not found"):
        load_job(tmp_path)  # a directory is not a job file


@pytest.mark.parametrize("text", ["", "- a\n- b\n", "just a string\n"])
def test_non_mapping_file_names_file(tmp_path: Path, text: str) -> None:
    p = tmp_path / "odd.yaml"
    p.write_text(text)
    with pytest.raises(JobConfigError, match="expected a mapping") as ei:
        load_job(p, atlas="x.zarr")
    assert str(p) in str(ei.value)


# ---------------------------------------------------------------------------- fingerprint


def fp(data: dict[str, Any], *parts: str) -> str:
    return parse_job(data).fingerprint(*parts)


def test_fingerprint_is_stable() -> None:
    a = fp(BASE)
    assert a == fp(copy.deepcopy(BASE))
    assert len(a) == 16 and int(a, 16) >= 0
    # defaults written out explicitly give the same job
    assert fp(job(corpus={"prepend_bos": True})) == a
    # layer order/duplicates are normalised before hashing
    assert fp(job(layers=[1, 0, 1])) == a


@pytest.mark.parametrize(
    "changes",
    [
        {"corpus": {"seq_len": 32}},
        {"corpus": {"source": "data.txt"}},
        {"corpus": {"max_tokens": 999}},
        {"corpus": {"exclude_bos": False}},
        {"corpus": {"seed": 1}},
        {"record": {"topk": 5}},
        {"record": {"hist_bins": 32}},
        {"record": {"sample_tokens": 100}},
        {"models": [{"name": "m1", "source": "other"}]},
        {"models": [{"name": "m2", "source": "smollm2"}]},
        {"models": [{"name": "m1", "source": "smollm2", "dtype": "float32"}]},
        {"models": [{"name": "m1", "source": "smollm2", "revision": "main"}]},
        {"layers": [0]},
        {"layers": "all"},
    ],
)
def test_fingerprint_changes_with_what_is_recorded(changes: dict[str, Any]) -> None:
    assert fp(job(**changes)) != fp(BASE)


@pytest.mark.parametrize(
    "changes",
    [
        {"atlas": "/elsewhere/atlas.zarr"},
        {"resources": {"workers": 7}},
        {"resources": {"ray_address": "ray://head:10001", "gpus": True}},
        {"resources": {"inflight_per_worker": 5, "max_restarts": 0}},
    ],
)
def test_fingerprint_ignores_location_and_resources(changes: dict[str, Any]) -> None:
    assert fp(job(**changes)) == fp(BASE)


def test_fingerprint_parts() -> None:
    assert fp(BASE, "record") != fp(BASE, "merge")
    assert fp(BASE, "record") == fp(BASE, "record")
    assert fp(BASE, "record") != fp(BASE)


def test_readme_job_example_validates() -> None:
    """The README's job example stays a valid job (the README contract)."""
    import re
    from pathlib import Path

    import yaml

    from flows.config import parse_job

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = re.search(r"## Jobs\n\n```yaml\n(.*?)```", readme, re.S)
    assert block, "README has no job example"
    job = parse_job(yaml.safe_load(block.group(1)))
    assert job.seeds is not None and job.dictionaries is not None and job.universality is not None


# ---------------------------------------------------------------------------- one config


def test_unknown_sae_arch_names_the_field_and_the_registry(tmp_path) -> None:
    """A typo in an SAE arch fails at load, naming the field and every registered name,
    without importing torch (the CLI answers before any model or corpus is touched)."""
    import subprocess
    import sys

    bad = job(record={"sample_tokens": 64}, dictionaries={
        "model": "m1", "layer": 0, "sae": [{"name": "a", "arch": "topkk"}]})  # fmt: skip
    msg = error_of(bad)
    assert "field 'dictionaries.sae.0.arch'" in msg
    for name in ("topk", "batchtopk", "relu", "jumprelu"):
        assert f"'{name}'" in msg
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    code = ("import sys; from flows.config import load_job, JobConfigError\n"
            f"try: load_job({str(path)!r})\nexcept JobConfigError: pass\n"
            "print('torch' in sys.modules)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_dictionary_defaults_come_from_ops() -> None:
    """Every SAE/SNMF/steering knob has one default: the ops config's."""
    import dataclasses

    from flows.config import SAERunConfig, SNMFRunConfig, SteeringConfig
    from ops.configs import SAEConfig, SNMFConfig, SteeringSearch

    for model, ops_cls, rename in ((SAERunConfig, SAEConfig, {}), (SNMFRunConfig, SNMFConfig, {}),
                                   (SteeringConfig, SteeringSearch, {"top": "top_tokens"})):  # fmt: skip
        for f in dataclasses.fields(ops_cls):
            name = rename.get(f.name, f.name)
            if name in model.model_fields and f.default is not dataclasses.MISSING:
                assert model.model_fields[name].default == f.default, (model.__name__, name)
    # every SAE knob is settable from the job and reaches the ops config
    run = SAERunConfig(arch="jumprelu", jumprelu_l0_coef=0.01, auxk=7, b_dec_init="zeros")
    cfg = run.sae_config(16, dead_after_tokens=100)
    assert (cfg.jumprelu_l0_coef, cfg.auxk, cfg.b_dec_init, cfg.n_latents) == (0.01, 7, "zeros",
                                                                               8 * 16)  # fmt: skip
    assert SNMFRunConfig(k=3, tol=0.5).snmf_config() == SNMFConfig(k=3, tol=0.5)


def test_ops_errors_are_user_errors() -> None:
    """ops raises the project's typed config error (never retried, no CLI traceback)."""
    from ops.configs import SAEConfig
    from ops.errors import ConfigError

    with pytest.raises(ConfigError, match="^k:") as e:
        SAEConfig(d_in=4, n_latents=8, k=0)
    assert isinstance(e.value, NeuronmapError) and isinstance(e.value, ValueError)
