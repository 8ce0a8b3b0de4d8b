"""Tiny random-initialised configs of every supported family, shared by the ops tests.

Small enough to build in milliseconds; special token ids sit inside the tiny vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable

from transformers import (
    AutoConfig,
    BertConfig,
    GPT2Config,
    GPTNeoXConfig,
    OPTConfig,
    PretrainedConfig,
)

VOCAB = 96
D_MODEL = 32


def _gated(model_type: str, **extra: object) -> PretrainedConfig:
    return AutoConfig.for_model(
        model_type,
        vocab_size=VOCAB,
        hidden_size=D_MODEL,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        **extra,
    )


CONFIGS: dict[str, Callable[[], PretrainedConfig]] = {
    "gpt2": lambda: GPT2Config(
        vocab_size=VOCAB, n_embd=D_MODEL, n_layer=2, n_head=4, n_positions=64, n_inner=None
    ),
    "llama": lambda: _gated("llama"),
    "mistral": lambda: _gated("mistral"),
    "qwen2": lambda: _gated("qwen2"),
    "qwen3": lambda: _gated("qwen3"),
    "smollm3": lambda: _gated("smollm3"),
    "gemma": lambda: _gated("gemma"),
    "gemma2": lambda: _gated("gemma2"),
    "gemma3_text": lambda: _gated("gemma3_text", sliding_window=4),
    "gpt_neox": lambda: GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=D_MODEL,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
    ),
    "opt": lambda: OPTConfig(
        vocab_size=VOCAB,
        hidden_size=D_MODEL,
        ffn_dim=56,
        num_hidden_layers=2,
        num_attention_heads=4,
        word_embed_proj_dim=D_MODEL,
        max_position_embeddings=64,
    ),
    "bert": lambda: BertConfig(
        vocab_size=VOCAB,
        hidden_size=D_MODEL,
        intermediate_size=44,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
    ),
}


def tiny_config(model_type: str) -> PretrainedConfig:
    """The family's tiny config with pad/bos/eos ids 0/1/2."""
    config = CONFIGS[model_type]()
    config.pad_token_id, config.bos_token_id, config.eos_token_id = 0, 1, 2
    return config
