"""GPU-speed engine (issue #9): recording, SAE training and co-moments, each against a bare
baseline measured in the same run.

    python bench/gpu.py                          # CUDA when there is one: real shapes, bf16
    python bench/gpu.py --device cpu --small     # tiny shapes, float32: well under a minute
    python bench/gpu.py --only record,sae --rounds 5 --json
    python bench/gpu.py --section record --out record.json   # one section, as gpu_check.sh

``--out FILE`` writes the JSON figures as soon as each part exists (each model shape, each
SAE precision, the co-moments), replacing the file atomically: a crash or a timeout later
loses only what had not been measured yet. ``bench/gpu_check.sh`` runs one section per
process for the same reason.

Runs on a bare GPU machine: it imports only torch, transformers, numpy, scipy (via ``ops``)
and ``ops`` -- no Ray, Prefect, Zarr or dask, nothing from ``flows`` or ``storage``. Models
are random-initialised from configs of the real shapes (no downloads; weights do not change
the speed). Each figure is timed over ``--rounds`` rounds, interleaved with its baseline
(after one warm-up call each: kernel compiles, allocator), with CUDA synchronised around
each timed region only. Figures are medians over rounds; a ratio is throughput ÷ the
baseline's throughput (1.0 = as fast as the baseline, higher is better).

record -- per model shape (SmolLM2-135M, GPT-2 small, Llama-3.2-1B), ``--batches`` batches of
``--batch`` x ``--seq`` tokens (8 of 16 x 1024), bf16 on CUDA, float32 on CPU. Tokens counted
are all positions fed (batch x seq), the same for every column. Every variant runs the same
batches (``ops.engine.batches``, made once before timing) with the same attention mask, and
gets them on the device the same way (``ops.models.model_inputs``: pinned, non-blocking):

  bare          ``model(input_ids, attention_mask)``: the full forward with the LM head (the
                model's speed);
  trunk         the forward cut after the last hooked layer (``ops.models.forward_until``):
                the least recording has to run;
  record        the real activation pass (``ops.engine.ActivationPass.run``) with one
                ``NeuronStats`` consumer per layer, every layer hooked, state on the device
                (moments, min/max, firing count, histogram, top-32), the partials copied to
                the host at the end of each round, as a worker does per shard. The
                consumers are made once and kept across the warm-up and every round: the
                steady state of a worker deep in its shards (full top-k state, few
                candidates), not a fresh start each round;
  record÷bare   the issue's figure: what recording costs against just running the model;
  trunk÷bare    what recording could reach with free statistics (the cut saves the LM head);
  record÷trunk  the cost of the hooks and statistics alone;
  eager÷bare    the same recording with the eager torch statistics (``backend="torch"``, the
                path before the fused kernels): what the fused path (Triton on CUDA,
                numba on CPU) gains.

sae -- per architecture of ``ops.sae.ARCHITECTURES``, d_in 1536 (SmolLM2's MLP width), 16x
expansion, k 32, batch 4096, trained by the project's own loop (``ops.sae.train``: loss,
backward, parallel-gradient removal, fused Adam, decoder renormalisation, dead-latent
counters) on random normal activations, in float32 (TF32 off, torch's default) and, on CUDA,
under ``torch.autocast(bfloat16)``:

  tok/s         training tokens per second;
  TFLOP/s       achieved: matmul FLOPs of a step ÷ its time. Counted: the encoder's forward,
                input-gradient and weight-gradient GEMMs, 6·B·d_in·n (the input gradient is
                needed because ``b_dec``, subtracted before the encoder, is trained), plus the
                decoder's three: 6·B·n·d_in when it is the dense ``z @ W_dec`` (relu,
                jumprelu), 6·B·k·d_in when it gathers the k active rows (topk, batchtopk,
                ``embedding_bag``). Top-k selection, element-wise work and Adam are not
                counted: they are what this figure exposes;
  ÷GEMM         achieved TFLOP/s ÷ that of a bare GEMM of the encoder's shape
                ``[B, d_in]·[d_in, n]`` in the same precision (bf16 for autocast);
  ÷fp32         (autocast rows) tok/s ÷ the same architecture's float32 tok/s.

comoments -- ``ops.correlation.FamilyMoments.update`` of a GPT-2-small-shaped model pair
(12 layers x 3072 neurons each, 8192 tokens a batch: one ``[T, 36864]ᵀ·[T, 36864]`` GEMM plus
shift/scale, cast, column sums and the float64 fold) ÷ the bare GEMM of the same inputs and
dtype (bf16 with float32 accumulation on CUDA, float32 on CPU), built by
``bench/universality.py``'s helpers; ``update÷GEMM`` has the goal >= 0.85 in bf16. ``in_place``
says whether this torch accumulated the products in place (``ops.correlation.
accumulate_in_place``) or added a float32 product.

``--small``: every model 2 layers, hidden 64, intermediate 128, vocab 512, batches of 2 x 64;
SAE d_in 64, batch 256; co-moments 2 layers x 128 neurons, 256 tokens. A smoke run (CI:
``tests/test_bench_gpu.py``): at these sizes the figures measure per-call overhead and
machine noise, not the engine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # ops.sae.train's bar would clutter the tables
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.common import (  # noqa: E402
    SHAPES,
    build_model,
    free,
    model_config,
    sync,
    write_json,
)
from bench.universality import pair_inputs, update_and_gemm  # noqa: E402
from ops import correlation  # noqa: E402
from ops import sae as sae_ops  # noqa: E402
from ops.engine import ActivationPass, NeuronStats, batches  # noqa: E402
from ops.models import (  # noqa: E402
    LoadedModel,
    arch_spec,
    forward_until,
    model_inputs,
    resolve_device,
)
from ops.stats import hist_spec  # noqa: E402

SECTIONS = ("record", "sae", "comoments")


@dataclass(frozen=True)
class Sizes:
    batch: int  # record: rows per batch
    seq: int  # record: tokens per row
    batches: int  # record: batches per round
    sae_d: int
    sae_batch: int
    sae_steps: int  # optimiser steps per round
    co_layers: int
    co_d: int
    co_tokens: int
    co_reps: int  # co-moment updates per round (8 x 8192 = one float64 fold on CUDA)


FULL = Sizes(16, 1024, 8, 1536, 4096, 20, 12, 3072, 8192, 8)
SMALL = Sizes(2, 64, 2, 64, 256, 3, 2, 128, 256, 2)


# ---------------------------------------------------------------------------- timing


def timed_rounds(fns: dict[str, Callable[[], object]], dev: torch.device,
                 rounds: int) -> dict[str, float]:  # fmt: skip
    """Median seconds of each function over ``rounds`` interleaved rounds, after one warm-up
    call each."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            sync(dev)
            t0 = time.perf_counter()
            fn()
            sync(dev)
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def repeat(fn: Callable[[], object], n: int) -> Callable[[], None]:
    def run() -> None:
        for _ in range(n):
            fn()

    return run


# ---------------------------------------------------------------------------- record


def time_passes(loaded: LoadedModel, vocab: int, sz: Sizes, dev: torch.device,
                rounds: int) -> dict[str, float]:  # fmt: skip
    """Median seconds of a round of bare forwards, trunk forwards and the recording pass (the
    fused and the eager statistics), all over the same batches and masks."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, vocab, (sz.batch * sz.batches, sz.seq), dtype=np.int64)
    mask = np.ones(tokens.shape, bool)
    mask[:, 0] = False  # BOS is fed, not recorded, as in a corpus shard
    fed = list(batches(tokens, mask, 0, sz.batch))  # ids, attention mask, recorded rows
    last, spec = loaded.n_layers - 1, hist_spec(256)  # the job defaults: 256 bins, top-32
    engine = ActivationPass([loaded])

    def bare() -> None:
        with torch.inference_mode():
            for b in fed:
                loaded.model(**model_inputs(loaded, b.input_ids, b.attention))

    def trunk() -> None:
        for b in fed:
            forward_until(loaded, b.input_ids, b.attention, last)

    def recorder(backend: str) -> Callable[[], None]:
        stats = [NeuronStats((0, L), loaded.d_mlp, 32, spec, dev, backend)
                 for L in range(loaded.n_layers)]  # fmt: skip

        def record() -> None:  # the same consumers every round: the steady state
            engine.run(fed, stats)
            for c in stats:
                c.state()

        return record

    return timed_rounds({"bare": bare, "trunk": trunk, "record": recorder("auto"),
                         "eager": recorder("torch")}, dev, rounds)  # fmt: skip


def bench_shape(name: str, sz: Sizes, small: bool, dev: torch.device, dtype: torch.dtype,
                rounds: int) -> dict:  # fmt: skip
    """bare, trunk and record tok/s of one model shape, and their ratios."""
    config = model_config(name, small, sz.seq)
    med = time_passes(build_model(name, config, dev, dtype), config.vocab_size, sz, dev, rounds)
    free(dev)  # the model is gone with time_passes' frame
    tps = {k: sz.batch * sz.seq * sz.batches / s for k, s in med.items()}
    backend = getattr(NeuronStats((0, 0), 8, 4, hist_spec(256), dev).acc, "backend", "?")
    return {"layers": config.num_hidden_layers, "d_mlp": arch_spec(config).d_mlp(config),
            "stats_backend": backend, **{f"{k}_tok_s": v for k, v in tps.items()},
            "record_over_bare": tps["record"] / tps["bare"],
            "trunk_over_bare": tps["trunk"] / tps["bare"],
            "record_over_trunk": tps["record"] / tps["trunk"],
            "eager_over_bare": tps["eager"] / tps["bare"]}  # fmt: skip


def bench_record(sz: Sizes, small: bool, dev: torch.device, dtype: torch.dtype, rounds: int,
                 on_part: Callable[[dict], None] = lambda r: None) -> dict:  # fmt: skip
    """Every model shape in turn; ``on_part`` gets the figures so far after each."""
    out = {"batch": sz.batch, "seq": sz.seq, "batches_per_round": sz.batches,
           "tokens_per_round": sz.batch * sz.seq * sz.batches, "dtype": str(dtype),
           "shapes": {}}  # fmt: skip
    for name in SHAPES:
        out["shapes"][name] = bench_shape(name, sz, small, dev, dtype, rounds)
        on_part(out)
    return out


def print_record(r: dict, dev_name: str, rounds: int) -> None:
    backends = sorted({s["stats_backend"] for s in r["shapes"].values()})
    print(f"record: {r['batches_per_round']} batches of {r['batch']}x{r['seq']} tokens a round, "
          f"{r['dtype']}, {dev_name}, statistics backend {'/'.join(backends)}; "
          f"median of {rounds} rounds")  # fmt: skip
    print(f"  {'shape':<14}{'layers':>7}{'d_mlp':>7}{'bare tok/s':>13}{'trunk tok/s':>13}"
          f"{'record tok/s':>14}{'record÷bare':>13}{'trunk÷bare':>12}{'record÷trunk':>14}"
          f"{'eager÷bare':>12}")  # fmt: skip
    for name, s in r["shapes"].items():
        print(f"  {name:<14}{s['layers']:>7}{s['d_mlp']:>7}{s['bare_tok_s']:>13,.0f}"
              f"{s['trunk_tok_s']:>13,.0f}{s['record_tok_s']:>14,.0f}{s['record_over_bare']:>13.3f}"
              f"{s['trunk_over_bare']:>12.3f}{s['record_over_trunk']:>14.3f}"
              f"{s['eager_over_bare']:>12.3f}")  # fmt: skip


# ---------------------------------------------------------------------------- sae


def sae_step_flops(sae: sae_ops.SAE, batch: int) -> int:
    """Matmul FLOPs of one training step (see the module docstring)."""
    d, n, k = sae.cfg.d_in, sae.cfg.n_latents, sae.cfg.k
    decoder = 6 * batch * k * d if isinstance(sae, sae_ops.TopKSAE) else 6 * batch * n * d
    return 6 * batch * d * n + decoder


def sae_trainer(arch: str, pool: list[torch.Tensor], sz: Sizes, dev: torch.device,
                autocast: bool) -> tuple[Callable[[], object], int]:  # fmt: skip
    """A call training a fresh-optimiser run of ``sz.sae_steps`` steps, and its step FLOPs."""
    cfg = sae_ops.SAEConfig(
        arch=arch,
        d_in=sz.sae_d,
        n_latents=16 * sz.sae_d,
        k=32,
        batch_size=sz.sae_batch,
        b_dec_init="mean",
        autocast=autocast,
    )  # the training loop's own switch (CUDA only)
    sae = sae_ops.build_sae(cfg).to(dev)
    sae.init_from(pool[0])  # outside the timed steps
    steps = [pool[i % len(pool)] for i in range(sz.sae_steps)]

    def run() -> None:
        sae_ops.train(sae, steps, steps=len(steps), log_every=0)

    return run, sae_step_flops(sae, sz.sae_batch)


def bench_sae(sz: Sizes, dev: torch.device, rounds: int,
              on_part: Callable[[dict], None] = lambda r: None) -> dict:  # fmt: skip
    """Each precision in turn (its architectures interleaved with its bare GEMM); ``on_part``
    gets the figures so far after each."""
    g = torch.Generator(device=dev).manual_seed(0)
    pool = [torch.randn(sz.sae_batch, sz.sae_d, device=dev, generator=g) for _ in range(4)]
    n = 16 * sz.sae_d
    w = torch.randn(sz.sae_d, n, device=dev, generator=g)
    precisions = {"fp32": torch.float32} | ({"bf16-autocast": torch.bfloat16}
                                            if dev.type == "cuda" else {})  # fmt: skip
    out = {"d_in": sz.sae_d, "n_latents": n, "k": 32, "batch": sz.sae_batch,
           "steps_per_round": sz.sae_steps, "architectures": list(sae_ops.ARCHITECTURES),
           "runs": {}}  # fmt: skip
    runs: dict[str, dict] = out["runs"]
    for p, dt in precisions.items():
        x, wd = pool[0].to(dt), w.to(dt)
        fns: dict[str, Callable[[], object]] = {
            "gemm": repeat(lambda x=x, wd=wd: x @ wd, sz.sae_steps)}  # fmt: skip
        flops: dict[str, int] = {"gemm": 2 * sz.sae_batch * sz.sae_d * n}
        for arch in sae_ops.ARCHITECTURES:
            fns[arch], flops[arch] = sae_trainer(arch, pool, sz, dev, p != "fp32")
        med = timed_rounds(fns, dev, rounds)
        archs = runs[p] = {}
        for arch, secs in med.items():
            archs[arch] = {"tok_s": sz.sae_steps * sz.sae_batch / secs,
                           "tflops": sz.sae_steps * flops[arch] / secs / 1e12,
                           "flops_per_step": flops[arch]}  # fmt: skip
        for arch, r in archs.items():
            r["over_gemm"] = r["tflops"] / archs["gemm"]["tflops"]
            if p != "fp32" and "fp32" in runs:
                r["over_fp32"] = r["tok_s"] / runs["fp32"][arch]["tok_s"]
        del fns
        free(dev)
        on_part(out)
    return out


def print_sae(r: dict, dev_name: str, rounds: int) -> None:
    print(f"sae: d_in {r['d_in']}, {r['n_latents']} latents, k {r['k']}, batch {r['batch']}, "
          f"{r['steps_per_round']} steps a round, {dev_name}; median of {rounds} rounds "
          f"('gemm' = the encoder-shaped GEMM alone)")  # fmt: skip
    print(f"  {'precision':<15}{'arch':<11}{'tok/s':>12}{'TFLOP/s':>10}{'÷GEMM':>8}{'÷fp32':>8}")
    for p, archs in r["runs"].items():
        for arch, a in archs.items():
            tok = "-" if arch == "gemm" else f"{a['tok_s']:,.0f}"
            vs32 = f"{a['over_fp32']:.2f}" if "over_fp32" in a else "-"
            print(f"  {p:<15}{arch:<11}{tok:>12}{a['tflops']:>10.2f}{a['over_gemm']:>8.3f}"
                  f"{vs32:>8}")  # fmt: skip


# ---------------------------------------------------------------------------- co-moments


def bench_comoments(sz: Sizes, dev: torch.device, dtype: torch.dtype, rounds: int) -> dict:
    dtype = dtype if dev.type == "cuda" else torch.float32  # reduced precision: CUDA only
    L, d, t = sz.co_layers, sz.co_d, sz.co_tokens
    acts = pair_inputs(L, d, t, dev)
    update, gemm = update_and_gemm(acts, L, d, dev, dtype)
    med = timed_rounds({"update": repeat(update, sz.co_reps), "gemm": repeat(gemm, sz.co_reps)},
                       dev, rounds)  # fmt: skip
    update_s, gemm_s = med["update"] / sz.co_reps, med["gemm"] / sz.co_reps
    flops = 2 * t * (L * d) ** 2
    del acts, update, gemm
    free(dev)
    # which accumulation the update used: in place (addmm/baddbmm, out=) or a product added
    in_place = {f"{dev_type}/{dims}-d/{'reduced' if red else 'fp32'}": ok
                for (dev_type, dims, red), ok in correlation._IN_PLACE.items()}  # fmt: skip
    return {"layers": L, "d": d, "tokens": t, "dtype": str(dtype), "updates_per_round": sz.co_reps,
            "in_place": in_place,
            "shape": f"[{t} x {L * d}]ᵀ·[{t} x {L * d}]", "update_s": update_s, "gemm_s": gemm_s,
            "update_tok_s": t / update_s, "gemm_tok_s": t / gemm_s,
            "update_tflops": flops / update_s / 1e12, "gemm_tflops": flops / gemm_s / 1e12,
            "update_over_gemm": (t / update_s) / (t / gemm_s)}  # fmt: skip


def print_comoments(r: dict, dev_name: str, rounds: int) -> None:
    print(f"comoments: pair of {r['layers']} x {r['d']} neurons, {r['shape']}, {r['dtype']} "
          f"products, {dev_name}; median of {rounds} rounds of {r['updates_per_round']} updates")  # fmt: skip
    for k in ("update", "gemm"):
        print(f"  {k:<7}{r[f'{k}_s'] * 1e3:9.2f} ms  {r[f'{k}_tok_s']:>12,.0f} tok/s  "
              f"{r[f'{k}_tflops']:8.2f} TFLOP/s")  # fmt: skip
    print(f"  update÷GEMM = {r['update_over_gemm']:.3f}   (goal >= 0.85 in bf16 on H100/H200)")


# ---------------------------------------------------------------------------- main


def parse_only(values: list[str] | None) -> list[str]:
    chosen = [s.strip() for v in values or [] for s in v.split(",") if s.strip()]
    bad = sorted(set(chosen) - set(SECTIONS))
    if bad:
        raise SystemExit(f"--only: unknown section(s) {bad}; choose from {list(SECTIONS)}")
    return [s for s in SECTIONS if s in chosen] if chosen else list(SECTIONS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke runs)")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds (after a warm-up)")
    ap.add_argument("--dtype", default=None, help="model dtype (default bf16 on CUDA, else fp32)")
    ap.add_argument("--batch", type=int, default=None, help="record: rows per batch")
    ap.add_argument("--seq", type=int, default=None, help="record: tokens per row")
    ap.add_argument("--batches", type=int, default=None, help="record: batches per round")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--only", "--section", action="append", dest="only",
                    help="record, sae, comoments (repeat or a,b)")  # fmt: skip
    ap.add_argument("--json", action="store_true", help="print one JSON object of all figures")
    ap.add_argument("--out", type=Path, default=None,
                    help="write the JSON figures here as each part is measured")  # fmt: skip
    args = ap.parse_args()
    sections = parse_only(args.only)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = resolve_device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (
        torch.bfloat16 if dev.type == "cuda" else torch.float32)  # fmt: skip
    base = SMALL if args.small else FULL
    sz = Sizes(**{**asdict(base), **{k: getattr(args, k) for k in ("batch", "seq", "batches")
                                     if getattr(args, k)}})  # fmt: skip
    dev_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    out: dict = {"device": dev_name, "small": args.small, "rounds": args.rounds,
                 "torch": torch.__version__, "threads": torch.get_num_threads()}  # fmt: skip

    def part(section: str) -> Callable[[dict], None]:
        def save(figures: dict) -> None:
            out[section] = figures
            if args.out is not None:
                write_json(args.out, out)

        return save

    run = {"record": lambda: bench_record(sz, args.small, dev, dtype, args.rounds,
                                          part("record")),
           "sae": lambda: bench_sae(sz, dev, args.rounds, part("sae")),
           "comoments": lambda: bench_comoments(sz, dev, dtype, args.rounds)}  # fmt: skip
    show = {"record": print_record, "sae": print_sae, "comoments": print_comoments}
    for s in sections:
        part(s)(run[s]())
        if not args.json:
            show[s](out[s], dev_name, args.rounds)
    if args.json:
        print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
