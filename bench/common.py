"""What the GPU benchmarks share: model shapes, random-initialised models, timing helpers and
the JSON they write. Imports only torch, transformers and ``ops`` (the GPU machine has
nothing else; see ``bench/gpu_check.sh``)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, PretrainedConfig

from ops.models import LoadedModel, arch_spec

# family, layers, hidden, intermediate, heads, kv heads, vocab
SHAPES = {
    "smollm2-135m": ("llama", 30, 576, 1536, 9, 3, 49152),
    "gpt2-small": ("gpt2", 12, 768, 3072, 12, 12, 50257),
    "llama-3.2-1b": ("llama", 16, 2048, 8192, 32, 8, 128256),
}
SMALL_SHAPE = (2, 64, 128, 4, 2, 512)  # the same, for every family, with --small


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def free(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def model_config(name: str, small: bool, seq: int) -> PretrainedConfig:
    family, *dims = SHAPES[name]
    layers, hidden, inter, heads, kv, vocab = SMALL_SHAPE if small else dims
    if family == "gpt2":
        return GPT2Config(n_layer=layers, n_embd=hidden, n_inner=inter, n_head=heads,
                          vocab_size=vocab, n_positions=max(1024, seq),
                          bos_token_id=vocab - 1, eos_token_id=vocab - 1)  # fmt: skip
    return LlamaConfig(num_hidden_layers=layers, hidden_size=hidden, intermediate_size=inter,
                       num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                       tie_word_embeddings=True, max_position_embeddings=max(2048, seq))  # fmt: skip


def build_model(name: str, config: PretrainedConfig, dev: torch.device,
                dtype: torch.dtype) -> LoadedModel:  # fmt: skip
    """A random-initialised model, made on ``dev``, wrapped as ``ops.models.load_model`` does."""
    torch.manual_seed(0)
    with dev:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval().requires_grad_(False)
    spec = arch_spec(config)
    return LoadedModel(model=model, tokenizer=None, model_type=config.model_type,
                       n_layers=len(spec.layers(model)), d_mlp=spec.d_mlp(config),
                       site=spec.description, source=f"random:{name}", path="", revision=None,
                       dtype=dtype, device=dev)  # fmt: skip


def write_json(path: Path, obj: dict) -> None:
    """``obj`` as JSON at ``path``, atomically (a temporary file renamed over it): a reader,
    or a run killed mid-write, sees the previous version or this one, never half of one."""
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
