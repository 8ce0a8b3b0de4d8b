"""Small GPT-2-style seed families: a shared BPE tokenizer, one packed token stream, training.

A *family* is N models that differ only in their initialisation seed: same tokenizer, same
architecture, same data in the same order, same optimiser schedule. Their neurons can then be
compared across seeds (the "universal neurons" analysis).

Pure computation (torch, transformers, tokenizers, numpy): scheduling the seeds on workers and
caching finished ones is the job of ``flows/seeds.py``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from ops.errors import CorpusError, ModelError
from ops.models import cpu_has_native_bf16

__all__ = [
    "EOS",
    "PAD",
    "TRAIN_VERSION",
    "batch_rows",
    "gpt2_config",
    "MEMBER_FILES",
    "is_family_member",
    "pack_tokens",
    "save_family_member",
    "steps_for",
    "timed_train",
    "train_dtype",
    "train_gpt2",
    "train_tokenizer",
]

EOS = "<|endoftext|>"
"""Document separator; also BOS (GPT-2 convention), so mapping with ``prepend_bos`` matches."""
PAD = "<pad>"

TRAIN_VERSION = "1"
"""Bump when anything here changes the trained weights (part of the family cache key)."""

# Files that make a saved member complete; train_log.json is written last inside the tmp dir.
MEMBER_FILES = ("config.json", "model.safetensors", "train_log.json")


# --------------------------------------------------------------------------- tokenizer


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``texts`` (deterministic for the same texts).

    ``vocab_size`` counts the two special tokens ``<|endoftext|>`` (id 0; BOS = EOS) and
    ``<pad>`` (id 1) and the 256 byte symbols, so any text round-trips.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size <= 258:
        raise CorpusError(f"vocab_size must exceed 258 (256 bytes + 2 specials), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    it = (t for t in texts if t)
    tok.train_from_iterator(it, trainer)
    if tok.get_vocab_size() <= 258:
        raise CorpusError("tokenizer training corpus is empty: no text to learn merges from")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=1_000_000,  # the model's context is n_positions; this only silences
    )


# --------------------------------------------------------------------------- data


def _doc_ids(texts: Iterable[str], tokenizer: Any) -> Iterator[list[int]]:
    """Token ids per document, encoded lazily in growing batches (a small budget reads little)."""
    batch: list[str] = []
    size = 16
    for text in texts:
        if not text:
            continue
        batch.append(text)
        if len(batch) >= size:
            yield from tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
            batch = []
            size = min(size * 2, 1024)
    if batch:
        yield from tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]


def pack_tokens(texts: Iterable[str], tokenizer: Any, seq_len: int, n_tokens: int) -> np.ndarray:
    """The training data every seed sees, in order: int64 ``[n_seq, seq_len]``.

    Each document is preceded by ``<|endoftext|>`` and all are concatenated into one stream
    (``EOS doc0 EOS doc1 ...``), which is cut into rows of ``seq_len``; the rows concatenated
    give back the stream's first ``n_seq * seq_len`` tokens. ``n_seq = n_tokens // seq_len``
    (at least 1), fewer when the corpus runs out first (the trainer then cycles).
    """
    if seq_len < 2:
        raise CorpusError(f"seq_len must be at least 2, got {seq_len}")
    eos = tokenizer.convert_tokens_to_ids(EOS)
    if eos is None or eos == getattr(tokenizer, "unk_token_id", None):
        raise CorpusError(f"tokenizer has no {EOS!r} token (train it with train_tokenizer)")
    want = max(1, n_tokens // seq_len) * seq_len
    stream = np.empty(want, dtype=np.int64)
    filled = 0
    for ids in _doc_ids(texts, tokenizer):
        piece = [eos, *ids][: want - filled]
        stream[filled : filled + len(piece)] = piece
        filled += len(piece)
        if filled >= want:
            break
    n_seq = filled // seq_len
    if n_seq == 0:
        raise CorpusError(
            f"corpus too small: {filled} tokens, fewer than one training row of seq_len={seq_len}"
        )
    return stream[: n_seq * seq_len].reshape(n_seq, seq_len)


def steps_for(train_tokens: int, batch_size: int, seq_len: int) -> int:
    """Optimizer steps that consume ``train_tokens`` (rounded, at least one)."""
    return max(1, round(train_tokens / (batch_size * seq_len)))


def batch_rows(step: int, batch_size: int, n_rows: int) -> np.ndarray:
    """Row indices of the batch at ``step``: consecutive rows, cycling; the same for every seed."""
    return (step * batch_size + np.arange(batch_size)) % n_rows


# --------------------------------------------------------------------------- model


def gpt2_config(
    *,
    layers: int,
    d_model: int,
    d_mlp: int,
    n_heads: int,
    seq_len: int,
    vocab_size: int,
    bos_token_id: int,
    eos_token_id: int,
    pad_token_id: int,
) -> GPT2Config:
    """A GPT-2 config with ``n_inner = d_mlp`` MLP neurons per layer and ``n_positions = seq_len``.

    Dropout is off: training is then a function of the init seed and the data alone.
    """
    if d_model % n_heads:
        raise ModelError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
    return GPT2Config(
        vocab_size=vocab_size,
        n_positions=seq_len,
        n_embd=d_model,
        n_layer=layers,
        n_head=n_heads,
        n_inner=d_mlp,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )


def _lr_lambda(steps: int, warmup: int) -> Callable[[int], float]:
    """Linear warmup to 1, then cosine decay to 0.1 at the last step."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        span = max(1, steps - warmup)
        progress = min(1.0, (step - warmup) / span)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only (not biases, LayerNorms); tied weights counted once."""
    decay, no_decay = [], []
    for p in model.parameters():  # parameters() de-duplicates the tied wte / lm_head
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def train_dtype(dtype: str, device: str | torch.device = "cpu") -> str:
    """The training dtype for ``dtype`` ("auto": bfloat16 on a GPU and on a CPU with native
    bf16; float32 on other CPUs, where emulated bf16 trains ~2.4x slower: 2,900 vs 7,200
    tok/s for the default job's seeds on one AVX2 core)."""
    if dtype != "auto":
        return dtype
    native = torch.device(device).type == "cuda" or cpu_has_native_bf16()
    return "bfloat16" if native else "float32"


def train_gpt2(
    tokens: np.ndarray,
    config: GPT2Config,
    seed: int,
    steps: int,
    batch_size: int,
    lr: float,
    dtype: str = "bfloat16",
    log_every: int = 10,
    on_log: Callable[[int, float], None] | None = None,
    device: str | torch.device = "cpu",
) -> tuple[GPT2LMHeadModel, list[tuple[int, float]]]:
    """Train one seed; return the model (float32 weights, eval mode) and its loss curve.

    ``torch.manual_seed(seed)`` is called right before the model is built and nothing after it
    draws random numbers (no dropout, no shuffling), so the seed decides the init only. Batch
    ``s`` is rows :func:`batch_rows` ``(s)`` of ``tokens``, identical for every seed. AdamW
    (betas 0.9/0.95, weight decay 0.1 on matrices), linear warmup then cosine decay to 10 %,
    gradient clipping at 1.0, bfloat16 autocast when ``dtype="bfloat16"`` (float32 weights
    and optimiser state); "auto" = :func:`train_dtype`. On ``device`` (a GPU: the whole token array goes up once, the loss
    is read back only when logged). The returned model is on the CPU.

    The curve holds ``(step, loss)`` for step 0 (the untrained model's first batch), every
    ``log_every`` steps and the last step; each value is the mean batch loss since the previous
    entry. ``on_log`` is called with each entry as it is made.
    """
    if tokens.ndim != 2 or tokens.shape[0] == 0:
        raise CorpusError(f"tokens must be a non-empty [n_seq, seq_len] array, got {tokens.shape}")
    if tokens.shape[1] > config.n_positions:
        raise ModelError(
            f"token rows of length {tokens.shape[1]} exceed n_positions={config.n_positions}"
        )
    if dtype not in ("auto", "float32", "bfloat16"):
        raise ModelError(f"dtype must be 'auto', 'float32' or 'bfloat16', got {dtype!r}")
    dtype = train_dtype(dtype, device)
    if steps < 1 or batch_size < 1 or log_every < 1:
        raise ModelError(f"steps, batch_size and log_every must be >= 1 ({steps}, {batch_size})")
    dev = torch.device(device)
    data = torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int64)).to(dev)
    n_rows = data.shape[0]

    torch.manual_seed(seed)  # the init is drawn on the CPU: the same weights on any device
    model = GPT2LMHeadModel(config).to(dev)
    model.train()
    opt = torch.optim.AdamW(_param_groups(model, 0.1), lr=lr, betas=(0.9, 0.95), eps=1e-8,
                            fused=dev.type == "cuda")  # fmt: skip
    warmup = max(1, min(100, steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(steps, warmup))
    autocast = (torch.autocast(dev.type, dtype=torch.bfloat16) if dtype == "bfloat16"
                else nullcontext())  # fmt: skip

    curve: list[tuple[int, float]] = []
    window: list[torch.Tensor] = []
    for step in range(steps):
        ids = data[torch.from_numpy(batch_rows(step, batch_size, n_rows)).to(dev)]
        with autocast:
            logits = model(input_ids=ids).logits
        # next-token loss in float32 (logits are bfloat16 under autocast)
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        window.append(loss.detach())
        if step == 0 or (step + 1) % log_every == 0 or step == steps - 1:
            entry = (step, float(np.mean([float(v) for v in window])))
            window = []
            if not curve or curve[-1][0] != step:
                curve.append(entry)
                if on_log is not None:
                    on_log(*entry)
    model.eval()
    return model.cpu(), curve


# --------------------------------------------------------------------------- saving


def is_family_member(path: str | Path, key: str | None = None) -> bool:
    """A finished member directory (all of :data:`MEMBER_FILES`), of family ``key`` if given."""
    p = Path(path)
    if not all((p / f).is_file() for f in MEMBER_FILES):
        return False
    if key is None:
        return True
    try:
        return json.loads((p / "train_log.json").read_text()).get("key") == key
    except (OSError, ValueError):
        return False


def save_family_member(
    model: GPT2LMHeadModel, tokenizer: Any, out_dir: str | Path, log: dict
) -> None:
    """Save a loadable Hugging Face directory: config + model.safetensors + tokenizer files +
    ``train_log.json`` (``log`` as given).

    Everything is written into a temporary sibling that is renamed into place, so ``out_dir``
    is either absent, a previous directory, or complete. An existing ``out_dir`` (a stale or
    foreign member) is replaced; if another process finished the same member first, its
    directory is kept.
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes 0700; the member is a normal directory
    old: Path | None = None
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "train_log.json").write_text(json.dumps(log, indent=1, default=_json_default))
        for f in tmp.iterdir():  # safetensors writes 0600; members are shared read-only files
            os.chmod(f, 0o644)
        if out.exists():
            if log.get("key") is not None and is_family_member(out, log["key"]):
                return  # lost a race against an identical run: keep the finished one
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rename(out, old / "member")
        os.rename(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def timed_train(
    tokens: np.ndarray, config: GPT2Config, seed: int, steps: int, batch_size: int, lr: float,
    dtype: str = "bfloat16", log_every: int = 10,
    on_log: Callable[[int, float], None] | None = None, device: str | torch.device = "cpu",
) -> tuple[GPT2LMHeadModel, dict[str, Any]]:  # fmt: skip
    """:func:`train_gpt2` plus the facts ``train_log.json`` records about the run."""
    t0 = time.perf_counter()
    dtype = train_dtype(dtype, device)
    model, curve = train_gpt2(tokens, config, seed, steps, batch_size, lr, dtype, log_every,
                              on_log, device)  # fmt: skip
    seconds = time.perf_counter() - t0
    seen = steps * batch_size * tokens.shape[1]
    return model, {
        "seed": seed,
        "steps": steps,
        "batch_size": batch_size,
        "seq_len": int(tokens.shape[1]),
        "lr": lr,
        "dtype": dtype,
        "tokens": seen,
        "unique_tokens": int(tokens.size),
        "epochs": seen / tokens.size,
        "seconds": seconds,
        "tokens_per_second": seen / seconds if seconds > 0 else None,
        "loss_curve": [[s, v] for s, v in curve],
        "final_loss": curve[-1][1],
        "initial_loss": curve[0][1],
        "device": str(torch.device(device)),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
    }
