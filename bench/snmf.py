"""SNMF: time to a common loss vs a plain numpy float64 implementation, and tokens per budget.

    python bench/snmf.py [--d 1536] [--k 64] [--tokens 12288] [--iters 60] [--threads 1]
                         [--budget-gib 16] [--workers 8]

The baseline is the published recipe written straightforwardly (dense numpy float64, the
whole ``A`` in memory, SVD init of all of ``A``, ``np.linalg.inv`` of ``GᵀG``, explicit
loss), as in the paper's code. Both run up to ``--iters`` iterations with the same
patience rule; the target loss is the larger of the two best losses, so both reach it, and
the ratio is baseline time / ``ops.snmf.fit`` time to first reach it (init included),
each the best of ``--repeats`` alternating runs because the machine may be shared.

Memory is extrapolated, not exhausted: each implementation's job runs in a child process at
two token counts, its peak RSS growth gives bytes per token (never less than the arrays it
must hold, also printed), and from that the largest token count that fits a simulated
per-worker budget. The baseline needs all of ``A`` in one process; the sharded loop needs one
shard per worker, the driver only ``d x k`` arrays and the init sample.
Data: planted sparse mixed-sign features with sparse heavy-tailed nonnegative codes plus a
dense GELU background, shaped like MLP activations.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ops import snmf  # noqa: E402

GIB = 2**30


def synthetic(d: int, tokens: int, seed: int = 0) -> np.ndarray:
    """``A [d, tokens]`` float32: 128 sparse features (1% of neurons each, codes >= 0 on 5% of
    tokens) plus a dense GELU(N(0, 0.5²)) background."""
    rng = np.random.default_rng(seed)
    n_feat = 128
    z = np.zeros((d, n_feat), np.float32)
    for j in range(n_feat):
        rows = rng.choice(d, max(1, d // 100), replace=False)
        z[rows, j] = rng.standard_normal(len(rows)) * 2
    y = (rng.exponential(1.0, (n_feat, tokens)) * (rng.random((n_feat, tokens)) < 0.05)).astype(
        np.float32
    )
    x = rng.standard_normal((d, tokens), dtype=np.float32) * 0.5
    gelu = 0.5 * x * (1 + np.tanh(0.7978845608 * (x + 0.044715 * x**3)))
    return z @ y + gelu


def baseline(a: np.ndarray, cfg: snmf.SNMFConfig, reg: float = 1e-6) -> tuple[list, list]:
    """The recipe in plain numpy float64; ``(times since start, losses)`` per iteration."""
    t0 = time.perf_counter()
    a = a.astype(np.float64)
    d, _ = a.shape
    k = cfg.k
    u, s, vh = np.linalg.svd(a, full_matrices=False)  # Ding et al.'s SVD init, all of A
    g = np.maximum((np.sqrt(s[:k])[:, None] * vh[:k]).T, 1e-6)  # [T, k] >= 0
    del u, s, vh
    keep = cfg.keep(d)
    best, stale, times, losses = math.inf, 0, [], []
    for _ in range(cfg.iters):
        f = a @ g @ np.linalg.inv(g.T @ g + reg * np.eye(k))
        thresh = -np.sort(-np.abs(f), axis=0)[keep - 1]
        f = f * (np.abs(f) >= thresh)
        norms = np.maximum(np.linalg.norm(g, axis=0), 1e-8)
        g, f = g / norms, f * norms
        p, q = a.T @ f, f.T @ f
        num = (np.abs(p) + p) / 2 + g @ ((np.abs(q) - q) / 2)
        den = (np.abs(p) - p) / 2 + g @ ((np.abs(q) + q) / 2)
        g = g * np.sqrt(num / (den + cfg.eps))
        loss = float(np.linalg.norm(a - f @ g.T) ** 2)
        times.append(time.perf_counter() - t0)
        losses.append(loss)
        if loss < best * (1 - cfg.tol):  # the same patience rule as ops.snmf.run
            best, stale = loss, 0
        else:
            stale += 1
        if stale >= cfg.patience:
            break
    return times, losses


def baseline_bytes(d: int, k: int, tokens: int) -> int:
    """Arrays live at :func:`baseline`'s peak: the float32 input, its float64 copy, and either
    the SVD's U and Vh or the loop's ``f @ gᵀ`` and ``a - f @ gᵀ``; ~8 float64 ``[T, k]``."""
    big = max(2 * d * tokens + d * min(d, tokens), 3 * d * tokens)
    return 4 * d * tokens + 8 * (big + 8 * k * tokens)


def sharded_bytes(d: int, k: int, tokens: int) -> int:
    """Arrays live at a ``LocalShards`` worker's peak for ``tokens`` tokens: A_s (float32);
    in a step Y_s, the best Y_s, the rescaled Y_s and the Y step's num/den (float32
    ``[k, T_s]``); one residual block of the loss. The driver holds only d x k arrays."""
    return 4 * d * tokens + 4 * 5 * k * tokens + 4 * d * snmf._CHUNK


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(x.split()[1]) * 1024 for x in f if x.startswith(field))


def measure(impl: str, d: int, k: int, tokens: int) -> None:
    """(child process) Peak RSS growth of one worker's job on ``tokens`` tokens, 3 iterations:
    the data, then everything the implementation allocates. Includes memory the allocator
    keeps after a free, the same way for both."""
    cfg = snmf.SNMFConfig(k=k, iters=3, patience=10)
    snmf.fit(torch.rand(64, 512), snmf.SNMFConfig(k=4, iters=2))  # thread pools, allocator
    baseline(np.random.rand(64, 512).astype(np.float32), snmf.SNMFConfig(k=4, iters=2))
    z = snmf.init_z(torch.randn(d, cfg.init_tokens), cfg) if impl == "sharded" else None
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM)
        f.write("5")
    before = _rss("VmRSS:")
    a = np.random.default_rng(0).random((d, tokens), dtype=np.float32)
    if impl == "baseline":
        baseline(a, cfg)
    else:  # what one Ray worker does; init_z is the driver's, on its sample
        w = snmf.LocalShards([torch.from_numpy(a)], cfg)
        w.init(z)
        for _ in range(cfg.iters):
            ay, yy = w.reductions()[0][:2]
            z, scale = snmf.update_z(ay, yy, cfg)
            w.step(z, scale)
            w.keep_best()
    print(_rss("VmHWM:") - before)


def measured_bytes(impl: str, d: int, k: int, tokens: int) -> int:
    cmd = [sys.executable, __file__, "--measure", impl, "--d", str(d), "--k", str(k),
           "--tokens", str(tokens)]  # fmt: skip
    return int(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.split()[-1])


def first_reach(times: list[float], losses: list[float], target: float) -> float:
    return next(t for t, v in zip(times, losses, strict=True) if v <= target)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--d", type=int, default=1536)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=12288)
    ap.add_argument("--iters", type=int, default=60)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--budget-gib", type=float, default=16.0, help="simulated memory per worker")
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1,
                    help="BLAS/OpenMP threads for both (1: as a one-CPU Ray worker; steadier "
                         "on a shared machine); 0 keeps the libraries' defaults")  # fmt: skip
    ap.add_argument("--measure", choices=["baseline", "sharded"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    want = str(args.threads)
    if args.threads and os.environ.get("OPENBLAS_NUM_THREADS") != want:
        # numpy's BLAS reads its thread count at import: restart with it set
        os.environ.update({v: want for v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
                                             "MKL_NUM_THREADS")})  # fmt: skip
        os.execv(sys.executable, [sys.executable, __file__, *sys.argv[1:]])
    if args.measure:
        return measure(args.measure, args.d, args.k, args.tokens)
    cfg = snmf.SNMFConfig(k=args.k, iters=args.iters, seed=0)
    a = synthetic(args.d, args.tokens)
    print(f"A [{args.d} x {args.tokens}] float32, k={args.k}, keep={cfg.keep(args.d)} neurons/"
          f"feature, <= {args.iters} iters, patience {cfg.patience}, "
          f"{torch.get_num_threads()} thread(s) each")  # fmt: skip

    def ours() -> tuple[list[float], list[float]]:
        times: list[float] = []
        losses: list[float] = []
        t0 = time.perf_counter()

        def tick(_it: int, loss: float) -> None:
            times.append(time.perf_counter() - t0)
            losses.append(loss)

        snmf.fit(a, cfg, shards=args.shards, callback=tick)
        return times, losses

    # alternate the two and keep each one's fastest run: the machine may be shared
    runs_ref, runs_ours = [], []
    for _ in range(args.repeats):
        runs_ref.append(baseline(a, cfg))
        runs_ours.append(ours())
    l_ref, l_ours = runs_ref[0][1], runs_ours[0][1]
    norm2 = float(np.sum(a.astype(np.float64) ** 2))
    target = max(min(l_ref), min(l_ours))
    tr = min(first_reach(t, v, target) for t, v in runs_ref)
    to = min(first_reach(t, v, target) for t, v in runs_ours)
    rel = lambda v: math.sqrt(v / norm2)  # noqa: E731
    print(f"baseline numpy f64: {len(l_ref)} iters, best rel err {rel(min(l_ref)):.4f}, "
          f"runs {', '.join(f'{t[-1]:.1f}' for t, _ in runs_ref)} s, SVD init "
          f"{min(t[0] for t, _ in runs_ref):.2f} s + 1 iter")  # fmt: skip
    print(f"ops.snmf.fit, {args.shards} shards: {len(l_ours)} iters, best rel err "
          f"{rel(min(l_ours)):.4f}, runs {', '.join(f'{t[-1]:.1f}' for t, _ in runs_ours)} s, init "
          f"{min(t[0] for t, _ in runs_ours):.2f} s + 1 iter")  # fmt: skip
    print(f"time to rel err {rel(target):.4f} (best of {args.repeats}): baseline {tr:.2f} s, "
          f"ops.snmf {to:.2f} s  RATIO {tr / to:.2f}x faster")  # fmt: skip

    # memory: bytes per token from the peak RSS at two sizes, checked against the arrays
    budget = int(args.budget_gib * GIB)
    print("peak memory of one worker's job, measured (RSS) vs arrays counted:")
    fits = {}
    # sizes past the sharded loop's fixed-size blocks (snmf._CHUNK tokens), and small enough
    # for the baseline's SVD to finish quickly
    sizes = {"baseline": (4096, 12288), "sharded": (2 * snmf._CHUNK, 6 * snmf._CHUNK)}
    for impl, formula in (("baseline", baseline_bytes), ("sharded", sharded_bytes)):
        t1, t2 = sizes[impl]
        m1, m2 = (measured_bytes(impl, args.d, args.k, t) for t in (t1, t2))
        slope = max((m2 - m1) / (t2 - t1), formula(args.d, args.k, 1 << 20) / (1 << 20))
        fixed = max(m1 - slope * t1, 0.0)
        fits[impl] = int((budget - fixed) / slope)
        f1, f2 = (formula(args.d, args.k, t) / 2**20 for t in (t1, t2))
        print(f"  {impl:8s} {t1} tokens {m1 / 2**20:5.0f} MiB (arrays {f1:.0f}), {t2} tokens "
              f"{m2 / 2**20:5.0f} MiB (arrays {f2:.0f}): {slope / 1024:.2f} KiB/token")  # fmt: skip
    n_ref, n_shard = fits["baseline"], fits["sharded"]
    print(f"per-worker budget {args.budget_gib:g} GiB, d={args.d}, k={args.k}: baseline "
          f"{n_ref:,} tokens (all of A on one machine); sharded {n_shard:,} tokens per worker "
          f"({n_shard / n_ref:.1f}x), {args.workers * n_shard:,} on {args.workers} workers  RATIO "
          f"{args.workers * n_shard / n_ref:.1f}x; the driver holds d x k arrays and the init "
          f"sample ({(12 * args.d * snmf.SNMFConfig(k=1).init_tokens + 8 * args.d**2) / 2**20:.0f}"
          " MiB)")  # fmt: skip


if __name__ == "__main__":
    main()
