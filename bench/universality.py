"""Universality at scale: the co-moment update against a bare GEMM of the same shape.

Runs on a bare GPU machine (imports torch, numpy and ``ops`` only) and on CPU with
``--small``. For a model pair shaped like GPT-2-small (12 layers x 3,072 neurons, all
layers concatenated: one ``[T, 36864]ᵀ·[T, 36864]`` GEMM per batch), it times
``ops.correlation.FamilyMoments.update`` (shift and scale, cast, column sums, the GEMM, the
float64 fold every ``flush_tokens``) and a bare GEMM of the same inputs and dtype, and prints

- ``update / GEMM``: the GEMM's time divided by the update's (goal: >= 0.85 in bf16 on
  H100/H200);
- the projected time of the reference study (5 seeds = 10 pairs plus the within-layer
  covariances, 100M tokens) on one device and on 8, from the measured update rate and the
  plan of ``ops.universality.plan``;
- the finalisation time of one GPT-2-small pair tile (best partners, baselines, matching).

    python bench/universality.py              # GPU: bf16, GPT-2-small shapes
    python bench/universality.py --small      # CPU: float32, 4 x 768 per model
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ops.correlation import FamilyMoments  # noqa: E402
from ops.plan import OwnTile, PairTile, plan  # noqa: E402
from ops.universality import finalize_tile, own_moments, rotation, rotation_stats  # noqa: E402


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="CPU-sized shapes (4 layers x 768)")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--d", type=int, default=None)
    ap.add_argument("--tokens", type=int, default=None, help="tokens per batch")
    ap.add_argument("--dtype", default=None, help="bfloat16 | float16 | float32")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--no-finalize", action="store_true")
    ap.add_argument("--json", action="store_true")
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
    acts = pair_inputs(L, d, t, dev)
    update_fn, gemm_fn = update_and_gemm(acts, L, d, dev, dtype)
    update = timed(update_fn, dev, reps)
    gemm = timed(gemm_fn, dev, reps)
    flops = 2 * t * D * D
    own_acc = FamilyMoments([OwnTile(0, 0, L)], layers, dims, dev, dtype, flush)
    own = timed(lambda: own_acc.update(acts), dev, reps)
    # the reference study: 5 GPT-2-small seeds, 100M tokens; per token, from the rates above
    per_tok_pair = update / t
    per_tok_own = own / t  # one model's within-layer covariances (and its column sums)
    scale = (12 * 3072) ** 2 / D**2  # the measured pair's shape -> GPT-2-small's
    study_tokens = 1e8
    p1 = plan([list(range(12))] * 5, [3072] * 5, workers=1, budget=120 * 2**30, flush=cuda)
    p8 = plan([list(range(12))] * 5, [3072] * 5, workers=8, budget=120 * 2**30, flush=cuda)
    pair_s = per_tok_pair * scale * study_tokens
    own_s = per_tok_own * (12 * 3072**2) / (L * d * d) * study_tokens
    one_gpu = 10 * pair_s + 5 * own_s
    eight = one_gpu / 8 * (p8.waves * 8 / len(p8.groups) if p8.groups else 1)
    out = {
        "device": torch.cuda.get_device_name(dev) if cuda else "cpu", "dtype": str(dtype),
        "shape": f"[{t} x {D}]ᵀ·[{t} x {D}]", "update_s": update, "gemm_s": gemm,
        "update_over_gemm": gemm / update, "update_tflops": flops / update / 1e12,
        "gemm_tflops": flops / gemm / 1e12, "own_update_s": own,
        "study_pair_min_per_100M": pair_s / 60, "study_5_seeds_min_1_device": one_gpu / 60,
        "study_5_seeds_min_8_devices": eight / 60, "plan_groups_1": len(p1.groups),
        "plan_groups_8": len(p8.groups),
    }  # fmt: skip
    if not args.no_finalize:
        # finalising one pair tile of this shape (best partners, baselines, matching)
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
    if args.json:
        print(json.dumps(out, indent=1))
        return
    print(f"device {out['device']}  dtype {dtype}  batch {out['shape']}")
    print(f"  update {update * 1e3:8.2f} ms  ({out['update_tflops']:.1f} TFLOP/s)")
    print(f"  GEMM   {gemm * 1e3:8.2f} ms  ({out['gemm_tflops']:.1f} TFLOP/s)")
    print(f"  update / GEMM = {out['update_over_gemm']:.3f}   (goal >= 0.85 in bf16 on H100/H200)")
    print(f"  own covariances of one model: {own * 1e3:.2f} ms per batch")
    print(f"  projected, 5 GPT-2-small seeds x 100M tokens: {out['study_5_seeds_min_1_device']:.1f} "
          f"min on one device, {out['study_5_seeds_min_8_devices']:.1f} min on 8 "
          f"(one pair: {out['study_pair_min_per_100M']:.1f} min)")  # fmt: skip
    if "finalize_pair_s" in out:
        print(f"  finalising one pair of this shape: {out['finalize_pair_s']:.1f} s")


if __name__ == "__main__":
    main()
