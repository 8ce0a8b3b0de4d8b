"""Recording throughput ÷ bare forward-pass throughput, same model, dtype, batch and thread.

    python bench/record.py [--tokens 16384] [--layers all] [--default-job]

"record+tax" is recording with the neuron taxonomy's counters too (the job default:
per-neuron 0.99-quantile thresholds, probed here on the first 4096 tokens), so the cost of
the counters reads as the drop from one ratio to the other, in points.

Both sides run in this process, interleaved over several rounds (these machines are
noisy; the ratio of medians is what to read). "bare" is ``model(input_ids)``, the full
forward with LM head; "trunk" is the forward cut after the last hooked layer, which
recording uses. Recording is the real worker path (``ShardRecorder.record``): read the
shard from Zarr, hooks, streaming statistics, top-k, partial written to Zarr.
``--default-job`` also times ``neuronmap run`` of the default job end to end.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ops.corpus import bundled_documents, tokenize_documents  # noqa: E402
from ops.engine import (  # noqa: E402
    ActivationPass,
    FiringProbe,
    NeuronCounters,
    NeuronStats,
    ShardTokens,
    batches,
)
from ops.models import forward_until, load_model  # noqa: E402
from ops.stats import hist_spec  # noqa: E402
from ops.taxonomy import position_buckets  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--source", default="smollm2")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--tokens", type=int, default=12288, help="tokens per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (a worker uses 1)")
    ap.add_argument("--default-job", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    tmp = Path(tempfile.mkdtemp(prefix="nm-bench-"))
    loaded = load_model(args.source, dtype=args.dtype, device="cpu")
    tc = tokenize_documents(bundled_documents(), loaded.tokenizer, args.seq_len, args.tokens)
    mask = tc.mask()
    layers = list(range(loaded.n_layers))
    spec = hist_spec(256)  # the job defaults: 256 bins, top-32 examples
    engine = ActivationPass([loaded])  # the workers' own pass, on the same weights
    ids = torch.from_numpy(tc.tokens.astype(np.int64))
    n_valid = int(mask.sum())
    positions = int(tc.tokens.size)

    def bare() -> float:
        t = time.perf_counter()
        with torch.inference_mode():
            for a in range(0, len(ids), args.batch):
                loaded.model(input_ids=ids[a : a + args.batch], use_cache=False)
        return time.perf_counter() - t

    def trunk() -> float:
        t = time.perf_counter()
        for a in range(0, len(ids), args.batch):
            forward_until(loaded, ids[a : a + args.batch], None, loaded.n_layers - 1)
        return time.perf_counter() - t

    def record() -> float:
        t = time.perf_counter()
        stats = [NeuronStats((0, L), loaded.d_mlp, 32, spec) for L in layers]
        engine.run(batches(tc.tokens, mask, 0, args.batch), stats)
        [c.state() for c in stats]
        return time.perf_counter() - t

    probes = [FiringProbe((0, L), 0.99, 4096) for L in layers]
    engine.run(batches(tc.tokens, mask, 0, args.batch), probes)
    thresholds = [p.state() for p in probes]
    rows = ShardTokens(tc.tokens, 0, tc.sources, position_buckets(args.seq_len, 8), True)

    def record_tax() -> float:
        t = time.perf_counter()
        cons = [NeuronStats((0, L), loaded.d_mlp, 32, spec) for L in layers]
        cons += [NeuronCounters((0, L), loaded.d_mlp, rows, len(tc.source_names), 32,
                                thresholds[i]) for i, L in enumerate(layers)]  # fmt: skip
        engine.run(batches(tc.tokens, mask, 0, args.batch), cons)
        [c.state() for c in cons]
        return time.perf_counter() - t

    record()  # warm-up: numba compile, allocator
    record_tax()
    bare()
    times: dict[str, list[float]] = {"bare": [], "trunk": [], "record": [], "record+tax": []}
    for _ in range(args.rounds):
        for name, fn in (("bare", bare), ("trunk", trunk), ("record", record),
                         ("record+tax", record_tax)):  # fmt: skip
            times[name].append(fn())
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"model {args.source} {args.dtype}, batch {args.batch}x{args.seq_len}, "
          f"{args.threads} thread(s), {loaded.n_layers} layers x {loaded.d_mlp} neurons hooked")  # fmt: skip
    print(f"positions per round {positions:,} (valid, recorded: {n_valid:,})")
    for k in ("bare", "trunk", "record", "record+tax"):
        print(
            f"  {k:<7} {positions / med[k]:8.0f} positions/s  (median of {args.rounds}: {med[k]:.2f} s)"
        )
    print(f"RATIO record / bare forward  = {med['bare'] / med['record']:.3f}   (goal >= 0.90)")
    print(f"RATIO record / trunk forward = {med['trunk'] / med['record']:.3f}   (same forward cut, "
          "so this is the pure cost of hooks + statistics)")  # fmt: skip
    with_tax = med["bare"] / med["record+tax"]
    print(f"RATIO record+taxonomy / bare = {with_tax:.3f}   (counters cost "
          f"{100 * (med['bare'] / med['record'] - with_tax):.1f} points; goal <= 3)")  # fmt: skip

    if args.default_job:
        out = tmp / "default.zarr"
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "flows.cli", "run", "--atlas", str(out)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        print(
            f"default job wall time: {time.perf_counter() - t:.0f} s "
            f"(atlas {out})"
        )


if __name__ == "__main__":
    main()
