"""Streamed SAE training: end-to-end tokens/s against the recording alone, same run.

    python bench/sae_stream.py [--atlas atlas.zarr] [--model smollm2] [--layer 15]
                               [--workers 2] [--expansion 4] [--k 32]

Baseline: the Ray workers record the layer's activations for every corpus shard and the
driver only receives them (what any live consumer must pay). Streamed: the same workers
and shards, feeding ``train_sae_streamed`` (shuffle buffer + TopK SAE training in the
driver). The ratio streamed / recording-only says how much training slows the pipeline;
1.0 means the SAE trains for free behind the model. Needs an atlas from ``make run``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from flows.config import SAERunConfig, parse_job  # noqa: E402
from flows.dictionaries import feed_stage, train_sae_streamed  # noqa: E402
from flows.engine import ensure_ray, iter_stage  # noqa: E402
from storage.atlas import Atlas  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--atlas", default="atlas.zarr")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--layer", type=int, default=15)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--expansion", type=int, default=4)
    p.add_argument("--k", type=int, default=32)
    args = p.parse_args()
    atlas = Atlas.open(args.atlas)
    attrs = atlas.model_attrs(args.model)
    job = parse_job({"atlas": args.atlas, "resources": {"workers": args.workers},
                     "models": [{"name": args.model, "source": attrs["source"],
                                 "dtype": attrs["dtype"]}]})  # fmt: skip
    ensure_ray(None, args.workers)
    shards = list(range(len(atlas.shard_ranges())))

    t0 = time.perf_counter()
    n_rec = 0
    for out in iter_stage(feed_stage(job, args.model, args.layer), args.atlas, shards,
                          job.resources, ordered=True):  # fmt: skip
        n_rec += len(out["acts"])
    t_rec = time.perf_counter() - t0

    x_eval = torch.from_numpy(np.concatenate([a for _, a, _ in
                                              atlas.sample(args.model, args.layer)]))  # fmt: skip
    run = SAERunConfig(name="bench", arch="topk", expansion=args.expansion, k=args.k, epochs=1,
                       source="stream")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        res = train_sae_streamed(job, args.model, args.layer, run, f"{tmp}/ckpt.pt", x_eval)
        t_stream = time.perf_counter() - t0
    n = res["tokens_trained"]
    print(f"{args.model} L{args.layer}, {len(shards)} shards, {args.workers} workers, "
          f"{torch.get_num_threads()} driver threads")  # fmt: skip
    print(f"recording only: {n_rec:,} tokens in {t_rec:.1f}s ({n_rec / t_rec:,.0f} tok/s)")
    print(f"streamed SAE:   {n:,} tokens in {t_stream:.1f}s ({n / t_stream:,.0f} tok/s), "
          f"{res['steps']} steps, sample FVU {res['metrics']['fvu']:.3f}, "
          f"L0 {res['metrics']['l0']:.1f}")  # fmt: skip
    print(f"ratio streamed / recording-only: {(n / t_stream) / (n_rec / t_rec):.2f}")


if __name__ == "__main__":
    main()
