"""SAE training throughput: neuronmap's ``ops.sae.train`` vs SAELens on the same activations.

    make bench-sae            # builds .venv-bench (the project + sae-lens) and runs this
    python bench/sae.py [--atlas atlas.zarr --model smollm2 --layer 15] [--expansion 4]
                        [--k 32] [--batch-size 1024] [--steps 150] [--repeats 3] [--threads N]

Both train a TopK SAE (AuxK on, unit-norm decoder, Adam, constant learning rate, float32, CPU
or the one GPU) for ``--steps`` steps on the same batches: the layer's stored activation
sample when ``--atlas`` has one, else synthetic MLP-like activations of SmolLM2's MLP width.
SAELens runs its own trainer (``SAETrainer.fit`` with wandb off), so each side pays for its
own bookkeeping (dead-latent counters, decoder normalisation, its gradient clipping and
sparsity windows). Runs alternate and the best of ``--repeats`` counts, as the machine may be
shared. Printed: tokens/s of each, the ratio neuronmap / SAELens, and each SAE's FVU on
held-out tokens, so that speed is not bought with quality.

``sae-lens`` is installed only in the bench environment (``make bench-env``), never in the
project's.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # SAELens' bar would dominate short runs' output
os.environ.setdefault("WANDB_MODE", "disabled")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ops import sae as sae_ops  # noqa: E402


def activations(args: argparse.Namespace) -> tuple[torch.Tensor, str]:
    """``[T, d]`` float32 activations and where they came from."""
    if args.atlas and Path(args.atlas, "zarr.json").is_file():
        from storage.atlas import Atlas

        atlas = Atlas.open(args.atlas)
        g = atlas.model_group(args.model)["layers"][str(args.layer)]
        if "sample" in g:
            pos = atlas.corpus["sample_positions"][...]
            x = g["sample"][...][pos >= 0].astype(np.float32)
            return torch.from_numpy(x), f"{args.atlas} {args.model} L{args.layer} sample"
    rng = np.random.default_rng(0)
    d, n = 1536, 32768  # SmolLM2-135M MLP width
    feats = rng.standard_normal((4 * d, d)).astype(np.float32)
    codes = rng.exponential(1.0, (n, 4 * d)) * (rng.random((n, 4 * d)) < 0.01)
    x = codes.astype(np.float32) @ feats / 4 + 0.1 * rng.standard_normal((n, d))
    return torch.from_numpy(x.astype(np.float32)), "synthetic (no atlas sample found)"


def fvu(recon: torch.Tensor, x: torch.Tensor) -> float:
    x64 = x.double()
    return float((x64 - recon.double()).pow(2).sum() / (x64 - x64.mean(0)).pow(2).sum())


def run_neuronmap(x: torch.Tensor, held: torch.Tensor, args: argparse.Namespace,
                  device: str) -> tuple[float, float]:  # fmt: skip
    d = x.shape[1]
    cfg = sae_ops.SAEConfig(arch="topk", d_in=d, n_latents=args.expansion * d, k=args.k,
                            lr=args.lr, batch_size=args.batch_size, seed=0,
                            dead_after_tokens=len(x))  # fmt: skip
    torch.manual_seed(0)
    sae = sae_ops.build_sae(cfg).to(device)
    sae.init_from(x.to(device))
    batches = [b.to(device) for b in sae_ops_batches(x, args)]
    sync(device)
    t0 = time.perf_counter()
    sae_ops.train(sae, batches, steps=args.steps, log_every=0)
    sync(device)
    dt = time.perf_counter() - t0
    with torch.no_grad():
        recon = sae.decode(sae.encode(held.to(device))).cpu()
    return args.steps * args.batch_size / dt, fvu(recon, held)


def run_saelens(x: torch.Tensor, held: torch.Tensor, args: argparse.Namespace,
                device: str) -> tuple[float, float]:  # fmt: skip
    from sae_lens import LoggingConfig, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    d = x.shape[1]
    torch.manual_seed(0)
    cfg = TopKTrainingSAEConfig(d_in=d, d_sae=args.expansion * d, k=args.k, dtype="float32",
                                device=device, normalize_activations="none")  # fmt: skip
    sae = TopKTrainingSAE(cfg)
    batches = [b.to(device) for b in sae_ops_batches(x, args)]
    tcfg = SAETrainerConfig(total_training_samples=args.steps * args.batch_size,
                            train_batch_size_samples=args.batch_size, lr=args.lr, lr_end=args.lr,
                            device=device,
                            dead_feature_window=max(1, len(x) // args.batch_size),
                            feature_sampling_window=10**9,
                            logger=LoggingConfig(log_to_wandb=False))  # fmt: skip
    trainer = SAETrainer(tcfg, sae, iter(batches))
    sync(device)
    t0 = time.perf_counter()
    trainer.fit()
    sync(device)
    dt = time.perf_counter() - t0
    with torch.no_grad():
        recon = sae.decode(sae.encode(held.to(device))).cpu()
    return args.steps * args.batch_size / dt, fvu(recon, held)


def sae_ops_batches(x: torch.Tensor, args: argparse.Namespace) -> list[torch.Tensor]:
    """The same ``--steps`` batches for both sides (a fixed shuffled order, epochs repeat)."""
    it = sae_ops.sample_batches(x, args.batch_size, seed=1)
    return [next(it) for _ in range(args.steps)]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--atlas", default="atlas.zarr")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--layer", type=int, default=15)
    p.add_argument("--expansion", type=int, default=4)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        import sae_lens
    except ImportError:
        sys.exit("bench/sae.py: sae-lens is not installed here; run `make bench-sae`")
    x, origin = activations(args)
    held, x = x[: len(x) // 8], x[len(x) // 8 :]
    print(f"activations: {origin}: {tuple(x.shape)} train, {len(held)} held out; "
          f"TopK {args.expansion}x k={args.k} batch {args.batch_size} x {args.steps} steps, "
          f"{args.device}, {torch.get_num_threads()} threads, sae-lens {sae_lens.__version__}")  # fmt: skip
    short = argparse.Namespace(**{**vars(args), "steps": 5})
    run_neuronmap(x, held, short, args.device)  # warm-up: allocator, kernels, imports
    run_saelens(x, held, short, args.device)
    ours, theirs = [], []
    for r in range(args.repeats):
        ours.append(run_neuronmap(x, held, args, args.device))
        theirs.append(run_saelens(x, held, args, args.device))
        print(f"  repeat {r + 1}: neuronmap {ours[-1][0]:,.0f} tok/s (FVU {ours[-1][1]:.4f})  "
              f"SAELens {theirs[-1][0]:,.0f} tok/s (FVU {theirs[-1][1]:.4f})")  # fmt: skip
    a, b = max(ours), max(theirs)
    print(f"neuronmap {a[0]:,.0f} tok/s, SAELens {b[0]:,.0f} tok/s: "
          f"ratio {a[0] / b[0]:.2f}x (held-out FVU {a[1]:.4f} vs {b[1]:.4f})")  # fmt: skip


if __name__ == "__main__":
    main()
