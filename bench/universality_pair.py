"""A GPT-2-small-shaped pair through the whole universality stage on this machine's CPUs.

Two random-init GPT-2-small models (12 layers x 3,072 MLP neurons, the bundled SmolLM2
tokenizer), ~4k tokens of the bundled corpus, 2 workers: ``neuronmap run`` end to end (Ray,
Prefect, Zarr) twice in the same run, once recording only (the baseline) and once recording
and correlating. Prints, for each, the wall time, the peak resident memory of the whole
process tree (driver, Prefect server, Ray workers: proportional set size, sampled every
0.5 s) and the atlas size,
then the ratios against the goals of issue #10 (peak under 16 GB, atlas growth under 3 GB)
and what universality added over recording alone.

    .venv/bin/python bench/universality_pair.py [--tokens 4096] [--workers 2] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]


def make_model(dst: Path, seed: int) -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from ops.models import load_tokenizer

    tok = load_tokenizer("smollm2")
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=1024, n_embd=768, n_layer=12, n_head=12,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)  # fmt: skip
    GPT2LMHeadModel(cfg).save_pretrained(dst)
    tok.save_pretrained(dst)


def tree_pss(pid: int) -> int:
    """Proportional set size of ``pid`` and its descendants: shared pages (the libraries every
    worker maps, Ray's object store) are counted once, split among the processes sharing
    them, so the sum is the memory the job really holds (a sum of RSS counts torch's ~0.4 GB
    of libraries once per process)."""
    try:
        p = psutil.Process(pid)
        procs = [p, *p.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for q in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            total += q.memory_full_info().pss
    return total


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def run(job: dict, tmp: Path, name: str) -> dict:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(job))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("PREFECT_API_URL", None)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", str(path)], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    peak = [0]

    def sample() -> None:
        while proc.poll() is None:
            # Ray's workers are children of its raylet, itself a child of the driver
            peak[0] = max(peak[0], tree_pss(proc.pid))
            time.sleep(0.5)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out = proc.communicate()[0]
    th.join()
    seconds = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"{name} failed ({proc.returncode}):\n{out[-4000:]}")
    plan = next((ln for ln in out.splitlines() if "universality plan" in ln), "")
    return {"seconds": seconds, "peak_bytes": peak[0], "atlas_bytes": du(Path(job["atlas"])),
            "plan": plan.split(" - ", 1)[-1]}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    with tempfile.TemporaryDirectory(prefix="nm-unipair-") as t:
        tmp = Path(t)
        for i in (0, 1):
            make_model(tmp / f"g{i}", seed=i)
        base = {
            "corpus": {"source": "bundled", "seq_len": 128, "max_tokens": args.tokens,
                       "shard_sequences": 8},
            "models": [{"name": f"g{i}", "source": str(tmp / f"g{i}"), "dtype": "float32"}
                       for i in (0, 1)],
            "record": {"properties": False, "sample_tokens": 0, "batch_size": 8},
            "resources": {"workers": args.workers},
        }  # fmt: skip
        rec = run(base | {"atlas": str(tmp / "rec.zarr")}, tmp, "record")
        uni = run(base | {"atlas": str(tmp / "uni.zarr"),
                          "universality": {"models": ["g0", "g1"]}}, tmp, "universality")  # fmt: skip
    gb = 2**30
    res = {"record": rec, "universality": uni,
           "peak_over_16GB": uni["peak_bytes"] / (16 * gb),
           "atlas_growth_over_3GB": (uni["atlas_bytes"] - rec["atlas_bytes"]) / (3 * gb),
           "peak_over_record_only": uni["peak_bytes"] / max(rec["peak_bytes"], 1),
           "time_over_record_only": uni["seconds"] / rec["seconds"]}  # fmt: skip
    if args.json:
        print(json.dumps(res, indent=1))
        return
    for name, r in (("record only", rec), ("record + universality", uni)):
        print(f"{name:22s} {r['seconds']:7.1f} s  peak {r['peak_bytes'] / gb:6.2f} GiB  "
              f"atlas {r['atlas_bytes'] / gb:6.3f} GiB")  # fmt: skip
    print(uni["plan"])
    print(f"peak / 16 GB goal = {res['peak_over_16GB']:.2f}; atlas growth / 3 GB goal = "
          f"{res['atlas_growth_over_3GB']:.3f}; vs recording alone: memory x"
          f"{res['peak_over_record_only']:.2f}, time x{res['time_over_record_only']:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
