"""Universality at scale: the co-moment update against a bare GEMM of the same shape, and the
projected time of the reference study.

Runs on a bare GPU machine (imports torch, transformers, numpy, scipy and ``ops`` only) and
on CPU with ``--small``. For a model pair shaped like GPT-2-small (12 layers x 3,072 neurons,
all layers concatenated: one ``[T, 36864]ᵀ·[T, 36864]`` GEMM per batch), it measures, in
this order, writing the JSON figures to ``--out`` as soon as each exists (a failure later,
or a timeout, loses only what comes after):

1. ``update / GEMM``: ``ops.correlation.FamilyMoments.update`` (shift and scale, cast, column
   sums, the GEMM accumulated in place, the float64 fold every ``flush_tokens``) against a
   bare GEMM of the same inputs and dtype: the GEMM's time divided by the update's (goal:
   >= 0.85 in bf16 on H100/H200);
2. the projected time of the reference study (5 GPT-2-small seeds = 10 pairs plus the
   within-layer covariances, 100M tokens) on one device and on 8 such devices: the plan of
   ``ops.plan.plan`` for a state budget read from this device's memory
   (``ops.plan.device_budget``), and per token the measured update of a pair tile, of one
   model's within-layer covariances, and one seed's forward in the pass (a GPT-2-small-shaped
   model cut after its last layer, every layer's rows gathered in float32 as the activation
   pass does for the co-moments), once per model a group of tiles reads
   (:func:`study_seconds`). Finalising is not included;
3. the finalisation time of one GPT-2-small pair tile (best partners, baselines, matching:
   24 float64 QRs on the CPU, products on the device, Hungarian matchings): the longest
   step, and the least important figure, so the last.

    python bench/universality.py              # GPU: bf16, GPT-2-small shapes
    python bench/universality.py --small      # CPU: float32, 4 x 768 per model
    python bench/universality.py --out universality.json   # as bench/gpu_check.sh runs it
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import build_model, free, model_config, sync, write_json  # noqa: E402
from ops import correlation  # noqa: E402
from ops.correlation import FamilyMoments  # noqa: E402
from ops.engine import ActivationPass, Consumer, batches  # noqa: E402
from ops.plan import OwnTile, PairTile, Plan, device_budget, plan  # noqa: E402
from ops.universality import finalize_tile, own_moments, rotation, rotation_stats  # noqa: E402

GPT2_SMALL = (12, 3072)  # layers, MLP neurons per layer: the study's seeds
SEEDS, STUDY_TOKENS = 5, 1e8


def timed(fn, dev: torch.device, reps: int) -> float:
    fn()
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(dev)
    return (time.perf_counter() - t0) / reps


def flush_tokens(dev: torch.device) -> int | None:
    """The co-moment fold cadence of a worker on ``dev`` (CPU: every batch)."""
    return 65536 if dev.type == "cuda" else None


def pair_inputs(L: int, d: int, t: int, dev: torch.device) -> dict[tuple[int, int], torch.Tensor]:
    """A batch of ``t`` tokens of two models' ``L`` layers x ``d`` neurons (float32 normals)."""
    g = torch.Generator(device=dev).manual_seed(0)
    return {(m, k): torch.randn(t, d, device=dev, generator=g) for m in (0, 1) for k in range(L)}


def update_and_gemm(acts: dict[tuple[int, int], torch.Tensor], L: int, d: int, dev: torch.device,
                    dtype: torch.dtype) -> tuple[Callable[[], object], Callable[[], object]]:  # fmt: skip
    """``(update, gemm)``: one ``FamilyMoments.update`` of a pair tile over ``acts``, and the
    bare GEMM of the same concatenated inputs in ``dtype`` (float32 accumulation)."""
    layers = {0: list(range(L)), 1: list(range(L))}
    acc = FamilyMoments([PairTile(0, 1, 0, L)], layers, {0: d, 1: d}, dev, dtype,
                        flush_tokens(dev))  # fmt: skip
    xa = torch.cat([acts[(0, k)] for k in range(L)], 1).to(dtype)
    xb = torch.cat([acts[(1, k)] for k in range(L)], 1).to(dtype)
    if dtype == torch.float32:
        return (lambda: acc.update(acts)), (lambda: xa.T @ xb)
    return (lambda: acc.update(acts)), (lambda: torch.mm(xa.T, xb, out_dtype=torch.float32))


class _Gather(Consumer):
    """A joint consumer of every layer that does nothing: the pass gathers each layer's
    recorded rows in float32 for it, as for the co-moments (``ops.engine``)."""

    def __init__(self, layers: int):
        self.sites = tuple((0, k) for k in range(layers))

    def update(self, acts, rows) -> None:  # noqa: ANN001
        pass


def forward_seconds(dev: torch.device, dtype: torch.dtype, small: bool, rounds: int = 3,
                    batch: int = 16, seq: int = 1024, n_batches: int = 4) -> float:  # fmt: skip
    """Seconds per token of one seed in the study's pass: a GPT-2-small-shaped model
    (random weights: they do not change the speed), cut after its last layer, every layer's
    rows gathered in float32 (``--small``: 2 layers, hidden 64, batches of 2 x 64)."""
    if small:
        batch, seq, n_batches = 2, 64, 2
    config = model_config("gpt2-small", small, seq)
    loaded = build_model("gpt2-small", config, dev, dtype)
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, config.vocab_size, (batch * n_batches, seq), dtype=np.int64)
    mask = np.ones(tokens.shape, bool)
    mask[:, 0] = False
    fed = list(batches(tokens, mask, 0, batch))
    run = partial(ActivationPass([loaded]).run, fed, [_Gather(loaded.n_layers)])
    return timed(run, dev, rounds) / tokens.size


def study_seconds(p: Plan, forward_s: float, pair_s: float, own_s: float,
                  tokens: float) -> float:  # fmt: skip
    """Seconds of the study's passes over ``tokens`` on ``p.workers`` devices, from seconds
    per token of one model's forward (``forward_s``), one whole pair's update (``pair_s``)
    and one model's within-layer covariances (``own_s``).

    The layers pass first: every model once (its forward and its covariances), one model
    per device, in waves. Then the pair groups, in waves of ``p.workers``, each wave as
    long as its slowest group: a forward of every model the group reads, plus its tiles'
    share of a whole pair's update (its rows ÷ the pair's rows)."""
    t = math.ceil(len(p.layers) / p.workers) * (forward_s + own_s)
    for w in range(p.waves):
        wave = p.groups[w * p.workers : (w + 1) * p.workers]
        t += max(len({x.a for x in g} | {x.b for x in g}) * forward_s
                 + sum((x.hi - x.lo) / len(p.layers[x.a]) for x in g) * pair_s
                 for g in wave)  # fmt: skip
    return t * tokens


def device_memory(dev: torch.device) -> int:
    """Bytes of memory of ``dev`` (the host's RAM for the CPU)."""
    if dev.type == "cuda":
        return torch.cuda.get_device_properties(dev).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="CPU-sized shapes (4 layers x 768)")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--d", type=int, default=None)
    ap.add_argument("--tokens", type=int, default=None, help="tokens per batch")
    ap.add_argument("--dtype", default=None, help="bfloat16 | float16 | float32")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--no-finalize", action="store_true")
    ap.add_argument("--json", action="store_true", help="print the JSON figures at the end")
    ap.add_argument("--out", type=Path, default=None,
                    help="write the JSON figures here as each is measured")  # fmt: skip
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and not args.small
    dev = torch.device("cuda" if cuda else "cpu")
    L = args.layers or (12 if cuda else 4)
    d = args.d or (3072 if cuda else 768)
    t = args.tokens or (8192 if cuda else 1024)
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    reps = args.reps or (20 if cuda else 3)
    D = L * d
    layers = {0: list(range(L)), 1: list(range(L))}
    dims = {0: d, 1: d}
    flush = flush_tokens(dev)
    out: dict = {"device": torch.cuda.get_device_name(dev) if cuda else "cpu", "dtype": str(dtype),
                 "torch": torch.__version__, "small": not cuda}  # fmt: skip

    def save() -> None:
        if args.out is not None:
            write_json(args.out, out)

    # 1. update ÷ GEMM: the figure this bench is for, written before anything else runs
    acts = pair_inputs(L, d, t, dev)
    update_fn, gemm_fn = update_and_gemm(acts, L, d, dev, dtype)
    update = timed(update_fn, dev, reps)
    gemm = timed(gemm_fn, dev, reps)
    flops = 2 * t * D * D
    del update_fn, gemm_fn
    free(dev)
    out |= {"shape": f"[{t} x {D}]ᵀ·[{t} x {D}]", "update_s": update, "gemm_s": gemm,
            "update_over_gemm": gemm / update, "update_tflops": flops / update / 1e12,
            "gemm_tflops": flops / gemm / 1e12,
            "in_place": {f"{k[0]}/{k[1]}-d/{'reduced' if k[2] else 'fp32'}": v
                         for k, v in correlation._IN_PLACE.items()}}  # fmt: skip
    save()

    # 2. the study: 5 GPT-2-small seeds x 100M tokens, per token from the rates measured here
    own = timed(partial(FamilyMoments([OwnTile(0, 0, L)], layers, dims, dev, dtype, flush).update,
                        acts), dev, reps)  # fmt: skip
    free(dev)
    fwd = forward_seconds(dev, dtype, not cuda)
    free(dev)
    gl, gd = GPT2_SMALL
    pair_s = update / t * (gl * gd) ** 2 / D**2  # the measured pair's shape -> GPT-2-small's
    own_s = own / t * (gl * gd**2) / (L * d * d)
    memory = device_memory(dev)
    budget = device_budget(memory)
    seeds = [list(range(gl))] * SEEDS, [gd] * SEEDS
    p1 = plan(*seeds, workers=1, budget=budget, flush=cuda)
    p8 = plan(*seeds, workers=8, budget=budget, flush=cuda)
    one = study_seconds(p1, fwd, pair_s, own_s, STUDY_TOKENS)
    eight = study_seconds(p8, fwd, pair_s, own_s, STUDY_TOKENS)
    out |= {"own_update_s": own, "forward_tok_s": 1 / fwd,
            "device_memory_gib": memory / 2**30, "budget_gib": budget / 2**30,
            "plan_groups_1": len(p1.groups), "plan_groups_8": len(p8.groups),
            "forwards_per_token_1": p1.forwards_per_token,
            "forwards_per_token_8": p8.forwards_per_token,
            "study_pair_min_per_100M": pair_s * STUDY_TOKENS / 60,
            "study_forwards_min_1_device": p1.forwards_per_token * fwd * STUDY_TOKENS / 60,
            "study_5_seeds_min_1_device": one / 60, "study_5_seeds_min_8_devices": eight / 60}  # fmt: skip
    save()
    if not args.json:
        print(f"device {out['device']}  dtype {dtype}  batch {out['shape']}")
        print(f"  update {update * 1e3:8.2f} ms  ({out['update_tflops']:.1f} TFLOP/s)")
        print(f"  GEMM   {gemm * 1e3:8.2f} ms  ({out['gemm_tflops']:.1f} TFLOP/s)")
        print(f"  update / GEMM = {out['update_over_gemm']:.3f}   (goal >= 0.85 in bf16 on H100/H200)")
        print(f"  own covariances of one model: {own * 1e3:.2f} ms per batch; one seed's "
              f"forward in the pass: {1 / fwd:,.0f} tok/s")  # fmt: skip
        print(f"  projected, {SEEDS} GPT-2-small seeds x 100M tokens: "
              f"{out['study_5_seeds_min_1_device']:.1f} min on one device "
              f"({out['plan_groups_1']} pair groups in a {out['budget_gib']:.0f} GiB budget "
              f"of {out['device_memory_gib']:.0f} GiB; forwards "
              f"{out['study_forwards_min_1_device']:.1f} min of it), "
              f"{out['study_5_seeds_min_8_devices']:.1f} min on 8 "
              f"(one pair's update: {out['study_pair_min_per_100M']:.1f} min)")  # fmt: skip

    # 3. finalising one pair tile of this shape (best partners, baselines, matching)
    if not args.no_finalize:
        rot = {(m, k): rotation(d, k + 100 * m) for m in (0, 1) for k in range(L)}
        fa = FamilyMoments([PairTile(0, 1, 0, L), OwnTile(0, 0, L), OwnTile(1, 0, L)], layers,
                           dims, dev, dtype, flush)  # fmt: skip
        fa.update(acts)
        lm = {(m, k): rotation_stats(cm, rot[(m, k)])
              for m in (0, 1) for k, cm in enumerate(own_moments(fa, OwnTile(m, 0, L)))}  # fmt: skip
        t0 = time.perf_counter()
        for _ in finalize_tile(fa, PairTile(0, 1, 0, L), [layers[0], layers[1]], lm,
                               lambda m, k: rot[(m, k)]):  # fmt: skip
            pass
        sync(dev)
        out["finalize_pair_s"] = time.perf_counter() - t0
        save()
        if not args.json:
            print(f"  finalising one pair of this shape: {out['finalize_pair_s']:.1f} s")
    if args.json:
        print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
