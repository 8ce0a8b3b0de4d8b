"""The ``train_seeds`` Prefect flow: a family of small GPT-2 models that differ only in init seed.

corpus -> one BPE tokenizer for the family -> one packed token stream (the data order every
seed sees) -> one Ray task per seed (a Prefect task is the driver) -> Hugging Face model
directories under ``cache_dir()/seeds/<name>-<key>/s<i>``.

Everything is keyed by content: the family key hashes the config (all fields but ``count``),
the corpus text and :data:`ops.seeds.TRAIN_VERSION`, so rerunning the same config trains
nothing, and asking for more seeds trains only the new ones. Seed ``s<i>`` is initialised
with ``base_seed + i``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path

import numpy as np
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from flows.config import ResourcesConfig, SeedsConfig
from flows.engine import Accounting, Ledger
from flows.runtime import bounded, runtime_for, submit
from flows.tasks import TASK
from ops.corpus import bundled_documents, read_documents
from ops.errors import CorpusError
from ops.models import cache_dir
from ops.seeds import (
    TRAIN_VERSION,
    gpt2_config,
    is_family_member,
    pack_tokens,
    save_family_member,
    steps_for,
    timed_train,
    train_tokenizer,
)

TOKENS_FILE = "tokens.npy"
TOKENIZER_DIR = "tokenizer"

# Fields that do not change any one member: more seeds reuse the ones already trained.
_KEY_EXCLUDE = {"count"}


# ------------------------------------------------------------------ keys and paths


def corpus_key(texts: list[str]) -> str:
    """Content hash of the training texts, in order."""
    h = hashlib.sha256()
    for t in texts:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()[:16]


def family_key(cfg: SeedsConfig, corpus_key: str) -> str:
    """Content key of a family: its config (minus ``count``), the corpus and the training code."""
    blob = json.dumps(
        [cfg.model_dump(mode="json", exclude=_KEY_EXCLUDE), corpus_key, TRAIN_VERSION],
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def family_dir(cfg: SeedsConfig, corpus_key: str) -> Path:
    return cache_dir() / "seeds" / f"{cfg.name}-{family_key(cfg, corpus_key)}"


def member_name(i: int) -> str:
    return f"s{i}"


def artifact_key(cfg: SeedsConfig) -> str:
    """Prefect artifact key of a family's loss report (lowercase letters, digits, dashes)."""
    return "seeds-" + (re.sub(r"[^a-z0-9]+", "-", cfg.name.lower()).strip("-") or "family")


# ------------------------------------------------------------------ corpus, tokenizer, tokens


def _texts(source: str | list[str], subsets: list[str] | None, max_docs: int | None) -> list[str]:
    docs = bundled_documents(subsets) if source == "bundled" else read_documents(source)
    texts = [d.text for d in docs if d.text]
    if max_docs is not None:
        texts = texts[:max_docs]
    if not texts:
        raise CorpusError(f"corpus {source!r} has no non-empty documents")
    return texts


def _save_npy_atomic(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, arr)
    os.replace(tmp, path)


@task(name="seeds-prepare", **TASK)
def prepare_family(
    cfg: SeedsConfig, texts_source: str | list[str], subsets: list[str] | None,
    max_docs: int | None,
) -> dict:  # fmt: skip
    """Read the corpus, then train (or reuse) the tokenizer and pack (or reuse) the tokens."""
    log = get_run_logger()
    texts = _texts(texts_source, subsets, max_docs)
    ckey = corpus_key(texts)
    key = family_key(cfg, ckey)
    fdir = family_dir(cfg, ckey)
    fdir.mkdir(parents=True, exist_ok=True)
    tok_dir = fdir / TOKENIZER_DIR
    if (tok_dir / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tok_dir)
        log.info("tokenizer: reusing %s", tok_dir)
    else:
        t0 = time.perf_counter()
        tok = train_tokenizer(texts, cfg.vocab_size)
        tmp = fdir / f".{TOKENIZER_DIR}.tmp-{os.getpid()}"
        tok.save_pretrained(tmp)
        try:
            os.rename(tmp, tok_dir)
        except OSError:  # another run saved the same (deterministic) tokenizer first
            if not (tok_dir / "tokenizer.json").is_file():
                raise
        log.info("tokenizer: %d tokens trained in %.1fs", len(tok), time.perf_counter() - t0)
    steps = steps_for(cfg.train_tokens, cfg.batch_size, cfg.seq_len)
    tok_path = fdir / TOKENS_FILE
    if tok_path.is_file():
        n_seq = int(np.load(tok_path, mmap_mode="r").shape[0])
    else:
        tokens = pack_tokens(texts, tok, cfg.seq_len, steps * cfg.batch_size * cfg.seq_len)
        dtype = np.uint16 if len(tok) <= np.iinfo(np.uint16).max else np.int32
        _save_npy_atomic(tok_path, tokens.astype(dtype))
        n_seq = int(tokens.shape[0])
    epochs = steps * cfg.batch_size / n_seq
    if epochs > 1:
        log.warning(
            "corpus holds %d rows of %d tokens; each seed cycles through it %.1f times",
            n_seq, cfg.seq_len, epochs,
        )  # fmt: skip
    return {
        "key": key, "corpus_key": ckey, "family_dir": str(fdir), "tokenizer": str(tok_dir),
        "tokens": str(tok_path), "rows": n_seq, "steps": steps, "documents": len(texts),
        "vocab_size": len(tok),
    }  # fmt: skip


# ------------------------------------------------------------------ one seed on a Ray worker


def _train_one(
    cfg_json: str, index: int, key: str, tokens_path: str, tokenizer_dir: str, out_dir: str,
    log_every: int = 10, device: str = "cpu",
) -> dict:  # fmt: skip
    """Train member ``s<index>`` on one CPU (or its GPU) and save it; returns its train log.

    Paths, not arrays, cross the process boundary: on a multi-node cluster the cache directory
    (``NEURONMAP_CACHE``) must be shared storage, as the driver reads the saved members.
    """
    import torch
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if device == "cpu":
        torch.set_num_threads(1)
    cfg = SeedsConfig.model_validate_json(cfg_json)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokens = np.load(tokens_path).astype(np.int64)
    config = gpt2_config(
        layers=cfg.layers, d_model=cfg.d_model, d_mlp=cfg.d_mlp, n_heads=cfg.n_heads,
        seq_len=cfg.seq_len, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    seed = cfg.base_seed + index
    steps = steps_for(cfg.train_tokens, cfg.batch_size, cfg.seq_len)
    name = member_name(index)

    say_every = max(log_every, steps // 10)  # about ten progress lines per seed

    def on_log(step: int, loss: float) -> None:
        if (step + 1) % say_every == 0 or step + 1 == steps:
            print(f"[{cfg.name}/{name}] step {step + 1}/{steps} loss {loss:.3f}", flush=True)

    model, log = timed_train(
        tokens, config, seed, steps, cfg.batch_size, cfg.lr, cfg.dtype,
        log_every=log_every, on_log=on_log, device=device,
    )  # fmt: skip
    log = {
        "key": key, "family": cfg.name, "member": name, "index": index,
        "config": cfg.model_dump(mode="json", exclude=_KEY_EXCLUDE),
        "train_version": TRAIN_VERSION, "pid": os.getpid(), **log,
    }  # fmt: skip
    save_family_member(model, tok, out_dir, log)
    return log


def _read_log(path: Path) -> dict:
    return json.loads((path / "train_log.json").read_text())


@task(name="seeds-train", **TASK)
def train_members(cfg: SeedsConfig, prep: dict, resources: ResourcesConfig | None = None,
                  ledger: Ledger | None = None) -> dict:  # fmt: skip
    """Train the members not yet saved on the job's workers: one at a time per worker, so one
    per CPU worker, or one per GPU where workers take GPUs (each member then trains on it)."""
    log = get_run_logger()
    fdir = Path(prep["family_dir"])
    key = prep["key"]
    logs: dict[int, dict] = {}
    todo = []
    for i in range(cfg.count):
        out = fdir / member_name(i)
        if is_family_member(out, key):
            logs[i] = _read_log(out)
        else:
            todo.append(i)
    cached = sorted(logs)
    if todo:
        resources = resources or ResourcesConfig(workers=min(len(todo), os.cpu_count() or 1))
        cfg_json = cfg.model_dump_json()
        acct = Accounting(f"seeds/{cfg.name}")
        with runtime_for(resources) as rt:
            ws = rt.workers(len(todo))
            log.info("training seeds %s on %d %s workers", todo, len(ws), rt.device)

            def send(slot: int, i: int) -> object:
                return submit(ws[slot], "call", _train_one, (
                    cfg_json, i, key, prep["tokens"], prep["tokenizer"],
                    str(fdir / member_name(i))), {})  # fmt: skip

            # a lost worker's member trains on another one (a member is idempotent)
            revive = lambda s: submit(ws[s], "ready")  # noqa: E731
            for i, r in bounded(todo, send, len(ws), revive=revive):
                logs[i] = r
                acct.add({"tokens": r["tokens"], "forward_passes": r.get("steps", 0)})
                log.info(
                    "%s: loss %.3f -> %.3f, %d tokens in %.1fs (%.0f tok/s)",
                    member_name(i), r["initial_loss"], r["final_loss"], r["tokens"],
                    r["seconds"], r["tokens_per_second"] or 0,
                )  # fmt: skip
        if ledger is not None:
            ledger.record(acct.to_dict())
    else:
        log.info("all %d seeds of %s already trained", cfg.count, fdir)
    return {
        "trained": todo, "cached": cached,
        "logs": {i: {k: logs[i][k] for k in ("seed", "final_loss", "initial_loss", "loss_curve",
                                             "tokens", "seconds", "tokens_per_second")}
                 for i in sorted(logs)},
    }  # fmt: skip


# ------------------------------------------------------------------ report


_SPARK = "▁▂▃▄▅▆▇█"


def _sparkline(values: list[float], lo: float, hi: float) -> str:
    span = hi - lo or 1.0
    return "".join(_SPARK[min(7, int((v - lo) / span * 7.999))] for v in values)


def loss_markdown(cfg: SeedsConfig, fdir: str, logs: dict[int, dict], trained: list[int],
                  rows: int = 12) -> str:  # fmt: skip
    """Final loss per seed, a step x seed loss table (about ``rows`` rows) and sparklines."""
    names = [member_name(i) for i in sorted(logs)]
    curves = {i: logs[i]["loss_curve"] for i in sorted(logs)}
    lines = [
        f"# seed family `{cfg.name}`", "", f"`{fdir}`", "",
        f"{cfg.count} seeds · {cfg.layers} layers · d_model {cfg.d_model} · d_mlp {cfg.d_mlp} · "
        f"vocab {cfg.vocab_size} · {cfg.train_tokens:,} tokens · "
        f"{'/'.join(sorted({str(r.get('dtype', cfg.dtype)) for r in logs.values()}))}", "",
        "| seed | init | final loss | tok/s | seconds | this run |", "|---|---|---|---|---|---|",
    ]  # fmt: skip
    for i in sorted(logs):
        r = logs[i]
        tps = f"{r['tokens_per_second']:,.0f}" if r.get("tokens_per_second") else "-"
        lines.append(
            f"| {member_name(i)} | {r['seed']} | {r['final_loss']:.3f} | {tps} | "
            f"{r['seconds']:.1f} | {'trained' if i in trained else 'cached'} |"
        )
    steps = sorted({s for c in curves.values() for s, _ in c})
    if len(steps) > rows:
        pick = np.unique(np.linspace(0, len(steps) - 1, rows).round().astype(int))
        steps = [steps[k] for k in pick]
    by_step = {i: dict((s, v) for s, v in c) for i, c in curves.items()}
    lines += ["", "| step | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for s in steps:
        cells = [f"{by_step[i][s]:.3f}" if s in by_step[i] else "" for i in sorted(logs)]
        lines.append(f"| {s + 1} | " + " | ".join(cells) + " |")
    all_v = [v for c in curves.values() for _, v in c]
    if all_v:
        lo, hi = min(all_v), max(all_v)
        lines += ["", "```"]
        for i, c in curves.items():
            lines.append(f"{member_name(i):>4} {_sparkline([v for _, v in c], lo, hi)}")
        lines += [f"     loss {hi:.2f} (█) .. {lo:.2f} (▁)", "```"]
    return "\n".join(lines)


def plot_losses(path: Path, logs: dict[int, dict], title: str) -> bool:
    """``loss.png`` of every seed's curve, if matplotlib is installed (it is optional)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for i in sorted(logs):
        c = np.asarray(logs[i]["loss_curve"], dtype=float)
        ax.plot(c[:, 0] + 1, c[:, 1], label=f"{member_name(i)} (seed {logs[i]['seed']})")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return True


# ------------------------------------------------------------------ flow


@flow(name="train_seeds", log_prints=True)
def train_seeds(
    cfg: SeedsConfig, texts_source: str | list[str] = "bundled", subsets: list[str] | None = None,
    max_docs: int | None = None, ray_address: str | None = None, ledger: Ledger | None = None,
    resources: ResourcesConfig | None = None,
) -> dict:  # fmt: skip
    """Train (or reuse) ``cfg.count`` seeds; return their directories and loss summaries.

    ``dirs[i]`` (= ``family_dir/s<i>``) loads with ``ops.models.load_model`` and with
    ``transformers.AutoModelForCausalLM.from_pretrained``; ``trained``/``cached`` list the
    member indices trained by this call and reused from the cache. Members train on the
    workers of ``resources`` (the job's runtime inside a job).
    """
    prep = prepare_family(cfg, texts_source, subsets, max_docs)
    if resources is None and ray_address is not None:
        resources = ResourcesConfig(ray_address=ray_address,
                                    workers=min(cfg.count, os.cpu_count() or 1))  # fmt: skip
    res = train_members(cfg, prep, resources, ledger)
    fdir = Path(prep["family_dir"])
    logs = res["logs"]
    if res["trained"] or not (fdir / "loss.png").is_file():
        title = (
            f"{cfg.name}: {len(logs)} seeds · {cfg.layers}L d_model {cfg.d_model} "
            f"d_mlp {cfg.d_mlp} · vocab {prep['vocab_size']} · {cfg.train_tokens:,} tokens"
        )
        plot_losses(fdir / "loss.png", logs, title)
    create_markdown_artifact(
        loss_markdown(cfg, str(fdir), logs, res["trained"]),
        key=artifact_key(cfg),
        description=f"train_seeds {cfg.name} ({prep['key']})",
    )
    dirs = [str(fdir / member_name(i)) for i in range(cfg.count)]
    return {
        "dirs": dirs, "tokenizer": prep["tokenizer"], "key": prep["key"],
        "family_dir": str(fdir),
        "losses": {member_name(i): logs[i]["final_loss"] for i in sorted(logs)},
        "tokens_per_second": {member_name(i): logs[i]["tokens_per_second"] for i in sorted(logs)},
        "trained": res["trained"], "cached": res["cached"],
        "models": [{"name": f"{cfg.name}-{member_name(i)}", "source": d}
                   for i, d in enumerate(dirs)],
    }  # fmt: skip
