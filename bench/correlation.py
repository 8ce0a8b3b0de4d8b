"""Co-moment update throughput ÷ bare ``torch.matmul`` on the same shapes, and accuracy.

    python bench/correlation.py [--tokens 1024] [--da 1536] [--db 1536] [--device cpu|cuda]

The update does one GEMM (``a_cᵀ b_c``) plus centring and a float64 merge; its useful
work is the GEMM's 2·T·Da·Db FLOP, so the ratio says how much the bookkeeping costs.
Accuracy is max |Δr| against ``numpy.corrcoef`` in float64 over all the batches.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ops.correlation import CoMomentAccumulator  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=1024, help="tokens per batch")
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--da", type=int, default=1536)
    ap.add_argument("--db", type=int, default=1536)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(args.da, args.db, generator=g) / args.da**0.5
    a = [torch.randn(args.tokens, args.da, generator=g) * 2 + 1 for _ in range(args.batches)]
    b = [x @ mix + 0.5 * torch.randn(args.tokens, args.db, generator=g) for x in a]
    a = [x.to(dev) for x in a]
    b = [x.to(dev) for x in b]
    flop = 2 * args.tokens * args.da * args.db * args.batches

    def gemm() -> float:
        sync()
        t = time.perf_counter()
        for x, y in zip(a, b, strict=True):
            torch.matmul(x.T, y)
        sync()
        return time.perf_counter() - t

    dtypes = [torch.float32] + ([torch.float16, torch.bfloat16] if dev.type == "cuda" else [])
    a64 = torch.cat(a).double().cpu().numpy()
    b64 = torch.cat(b).double().cpu().numpy()
    ref = np.corrcoef(a64, b64, rowvar=False)[: args.da, args.da :]
    print(f"shapes: {args.batches} batches of [{args.tokens} x {args.da}] x [{args.tokens} x {args.db}]"
          f" on {dev}, {torch.get_num_threads()} threads")  # fmt: skip
    for dt in dtypes:

        def update(dt: torch.dtype = dt) -> tuple[float, CoMomentAccumulator]:
            acc = CoMomentAccumulator(args.da, args.db, dev, matmul_dtype=dt)
            sync()
            t = time.perf_counter()
            for x, y in zip(a, b, strict=True):
                acc.update(x, y)
            sync()
            return time.perf_counter() - t, acc

        gemm(), update()  # warm-up
        tg, tu = [], []
        for _ in range(args.rounds):
            tg.append(gemm())
            tu.append(update()[0])
        mg, mu = statistics.median(tg), statistics.median(tu)
        err = np.abs(update()[1].partial().pearson() - ref).max()
        print(f"matmul {str(dt):<15} update {flop / mu / 1e9:8.1f} GFLOP/s  "
              f"torch.matmul(fp32) {flop / mg / 1e9:8.1f} GFLOP/s  "
              f"RATIO {mg / mu:.3f} (goal >= 0.85)  max|dr| vs float64 {err:.1e}")  # fmt: skip


if __name__ == "__main__":
    main()
