"""The job runtime (``flows.runtime``): local runs never attach to a foreign Ray instance,
plugins reach every worker, bad runtime input is one line before any work, and the scheduler
drives the local backend like Ray. Numbers (local = Ray with 1 and 2 workers, one model load
per worker) are in test_pipeline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flows.config import ResourcesConfig
from ops.errors import ConfigError
from storage.atlas import Atlas
from tests.flows.test_pipeline import _job, _run

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_a_local_run_starts_its_own_ray_beside_a_running_one(ray_cluster) -> None:
    """With this session's Ray instance running on the machine and no address named, a
    runtime in another process starts an instance of its own (Ray's default would attach to
    "the latest cluster" and refuse the CPU count given for a new one)."""
    code = (
        "import json, ray\n"
        "from flows.config import ResourcesConfig\n"
        "from flows.runtime import Runtime\n"
        "with Runtime(ResourcesConfig(workers=1)) as rt:\n"
        "    rt.workers()\n"
        "    print(json.dumps({'gcs': ray.get_runtime_context().gcs_address,\n"
        "                      'started': rt._started_ray}))\n"
        "print(json.dumps({'after': ray.is_initialized()}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=180)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    ours = ray_cluster.get_runtime_context().gcs_address
    assert lines[0]["started"] is True and lines[0]["gcs"] != ours
    assert lines[1] == {"after": False}  # the runtime shut down the instance it started


@pytest.mark.slow
def test_a_plugin_family_runs_on_two_ray_workers(tmp_path: Path, ray_cluster, prefect_harness
                                                 ) -> None:  # fmt: skip
    """OLMo is not a built-in family: registered by a plugin, a 2-worker Ray job maps it (each
    worker imported the plugin before loading the model) and the numbers equal the local
    backend's."""
    import torch
    from transformers import OlmoConfig, OlmoForCausalLM

    from ops.models import ARCHS
    from tests.conftest import _train_tokenizer

    src = tmp_path / "olmo"
    from ops.corpus import bundled_documents

    tok = _train_tokenizer([d.text for d in bundled_documents()[:100]])
    torch.manual_seed(0)
    OlmoForCausalLM(OlmoConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=40, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=64, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )).save_pretrained(src)  # fmt: skip
    tok.save_pretrained(src)
    over = {"corpus": {"max_tokens": 600}, "record": {"properties": False,
                                                      "taxonomy": {"threshold": 0.0}}}  # fmt: skip
    plugin = {"plugins": ["tests.flows.plugin_olmo"]}
    try:
        _run(_job(tmp_path / "ray.zarr", src, resources={"backend": "ray", "workers": 2, **plugin},
                  **over))  # fmt: skip
        _run(_job(tmp_path / "local.zarr", src, resources=plugin, **over))
    finally:
        ARCHS.unregister("olmo")
        sys.modules.pop("tests.flows.plugin_olmo", None)
    from tests.flows.test_pipeline import _arrays

    a, b = _arrays(tmp_path / "ray.zarr"), _arrays(tmp_path / "local.zarr")
    assert a.keys() == b.keys() and [k for k in a if a[k] != b[k]] == []
    (run,) = Atlas.open(tmp_path / "ray.zarr").runs()
    assert len(run["model_loads"]) == 2
    # each worker imported the plugin, then loaded the OLMo model (once)
    assert [w["model_loads"] for w in run["model_loads"]] == [{f"{src} (float32)": 1}] * 2


@pytest.mark.parametrize(("plugin", "words"), [
    ("tests.flows.no_such_plugin", "cannot be found"),
    ("tests.flows.plugin_empty", "registered nothing"),
])  # fmt: skip
def test_a_bad_plugin_is_one_line_exit_2_and_nothing_written(
        tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str], plugin: str,
        words: str) -> None:  # fmt: skip
    import yaml

    from flows.cli import main

    job = _job(tmp_path / "a.zarr", tiny_model_dir, resources={"plugins": [plugin]})
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    try:
        assert main(["run", str(path), "--backend", "local"]) == 2
    finally:
        sys.modules.pop("tests.flows.plugin_empty", None)
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert "field 'resources.plugins'" in err and plugin in err and words in err
    assert not (tmp_path / "a.zarr").exists()


def test_an_address_that_does_not_answer_is_one_line_before_any_work(
        tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    import socket

    import yaml

    from flows.cli import main

    s = socket.socket()
    s.bind(("127.0.0.1", 0))  # a port nobody listens on
    port = s.getsockname()[1]
    s.close()
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(_job(tmp_path / "a.zarr", tiny_model_dir)))
    assert main(["run", str(path), "--backend", "ray", "--ray-address",
                 f"ray://127.0.0.1:{port}"]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert "field 'resources.ray_address'" in err and f"ray://127.0.0.1:{port}" in err
    assert not (tmp_path / "a.zarr").exists()


def test_architectures_refuse_a_second_registration() -> None:
    from ops.models import ARCHS, arch_spec, register_arch

    with pytest.raises(ConfigError, match="model architecture 'llama' is already registered"):
        register_arch("llama", arch_spec("gpt2"))
    assert ARCHS["llama"] is arch_spec("llama") is not arch_spec("gpt2")


def test_local_runtime_runs_calls_and_held_objects_in_this_process() -> None:
    """``call`` and ``hold`` on the local backend: this process, results (and errors) as
    themselves, the thread count a call sets put back."""
    import torch

    from flows.runtime import Runtime, current

    def square(x: int, device: str = "?") -> tuple[int, str, int]:
        torch.set_num_threads(1)
        return x * x, device, os.getpid()

    threads = torch.get_num_threads()
    with Runtime(ResourcesConfig(backend="local")) as rt:
        assert current() is rt
        assert rt.call(square, 7) == (49, "cpu", os.getpid())
        assert torch.get_num_threads() == threads
        held = rt.hold(dict, worker=0, a=1)
        from flows.runtime import get

        assert get(held.submit("get", "device")) == "cpu" and get(held.submit("get", "a")) == 1
        with pytest.raises(ConfigError, match="boom"):
            rt.call(_raise, "boom")
        assert rt.model_loads()[0]["node"] == "local"
    assert current() is None


def _raise(msg: str) -> None:
    raise ConfigError(msg)
