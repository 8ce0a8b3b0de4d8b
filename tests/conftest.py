"""Session-wide fixtures: one real Ray cluster, one Prefect test harness, a tiny model dir,
and the tiny jobs' atlases that several test modules compare against.

Starting Ray (~4 s) and the Prefect harness (~16 s) once per session keeps the suite fast;
every flow test runs the real components. A tiny job costs ~30-50 s on 2 cores (mostly
Ray worker start-up: every stage starts its actors, each importing torch and transformers),
so an atlas that more than one module only reads is mapped once per session here.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Without a GPU the Triton kernels (ops.fused) run in Triton's interpreter. Triton reads this
# when triton.language is first imported (transformers may import it while tests are being
# collected), so it is set here, before any test module is imported.
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    if not ray.is_initialized():  # an instance of its own, never another one on the machine
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def _train_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
        pad_token="<pad>",
    )  # fmt: skip


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama with a BPE tokenizer trained on the bundled corpus, saved locally."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ops.corpus import bundled_documents

    texts = [d.text for d in bundled_documents()[:400]]
    tok = _train_tokenizer(texts)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg)
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_atlas(tmp_path_factory, tiny_model_dir, ray_cluster, prefect_harness) -> Path:
    """test_pipeline's tiny job (default taxonomy, weight properties) mapped once: test_pipeline
    checks it against numpy, test_object_store compares its S3 atlas with it. Tests may rerun
    the job on it (a no-op) but change no array: a test that changes an atlas works on a copy."""
    from tests.flows.test_pipeline import _job, _run

    path = tmp_path_factory.mktemp("atlas") / "a.zarr"
    out = _run(_job(path, tiny_model_dir))
    assert out["models"][0]["tokens"] > 2000
    return path


@pytest.fixture(scope="session")
def one_node(tmp_path_factory, tiny_model_dir, prefect_harness) -> Path:
    """test_cluster's tiny job mapped in this process (the local backend, which equals Ray
    with 1 and 2 workers: test_pipeline): the atlas that the two-node runs (test_cluster) and
    the ``ray`` CLI cluster's runs (test_ray_jobs) must equal bit for bit. Read only."""
    from tests.flows.test_cluster import _job
    from tests.flows.test_pipeline import _run

    path = tmp_path_factory.mktemp("one-node") / "a.zarr"
    job = _job(path, tiny_model_dir)
    _run(job | {"resources": {"backend": "local"}})
    return path
