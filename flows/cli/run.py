"""The commands that run work: ``run``, ``plan``, ``submit``, ``deploy``, ``deployments``;
and what Ctrl-C during a run does."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shlex
import shutil
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

from flows.cli.render import dumps
from flows.config import (
    JobConfigError,
    load_job,
    with_options,
)
from storage.atlas import Atlas


def cmd_run(args: argparse.Namespace) -> int:
    if args.resume and args.overwrite:  # refused before Prefect or Ray start
        raise JobConfigError("--resume and --overwrite contradict each other; pick one")
    job = load_job(args.job, atlas=args.atlas)
    flags = {"backend": args.backend, "workers": args.workers, "ray_address": args.ray_address}
    res = {k: v for k, v in flags.items() if v is not None}
    if res:  # validated like the job file: --workers 0 or -1 is refused, naming the field
        shown_flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in res.items())
        job = with_options(job, f"with options {shown_flags}", resources=res)
    from flows.preflight import preflight

    preflight(job, resume=args.resume, overwrite=args.overwrite)  # before Prefect and Ray
    if args.break_lease:
        from storage.lease import break_lease

        held = break_lease(job.atlas)
        print(f"removed the lease of {job.atlas}" + (f" held by pid {held.get('pid')} on "
              f"{held.get('host')}" if held else " (there was none)"), file=sys.stderr)  # fmt: skip
    from flows.pipeline import map_neurons

    with quiet_interrupts():
        out = map_neurons(job, resume=args.resume, overwrite=args.overwrite)
    from storage.location import shown as shown_location

    path = shown_location(job.atlas)  # a URL stays a URL
    print(f"\natlas: {path}")
    for row in out["models"]:
        tps = f"{row['tok_s']:,.0f} tok/s" if row.get("tok_s") else "already complete"
        print(f"  {row['model']}: {row['tokens']:,} tokens ({tps})")
    first = job.models[0].name
    exe = shutil.which("neuronmap") or os.path.join(os.path.dirname(sys.executable), "neuronmap")
    try:
        cwd = os.getcwd()
    except FileNotFoundError:  # a Ray job's working_dir that Ray removed (another raylet of
        # the same machine and temp dir dropped its copy) before the job ended
        cwd = None
    exe = os.path.relpath(exe) if cwd and exe.startswith(cwd) else exe
    print("query it with:")
    print(f"  {exe} info {path}")
    done = Atlas.open(job.atlas)  # an example that exists in this atlas
    layers = done.layers(first)
    layer = layers[min(5, len(layers) - 1)]
    index = min(10, done.model_attrs(first).get("d_mlp", 11) - 1)
    print(f"  {exe} neuron {path} {first} {layer} {index} --k 5")
    py = os.path.relpath(sys.executable) if cwd and sys.executable.startswith(cwd) else sys.executable
    print(f"  {py} -c \"from storage import Atlas; print(Atlas.open('{path}').models)\"")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """What the universality stage of a job will hold and run, and how long its products
    take at a given rate, from the job's config alone."""
    job = load_job(args.job)
    from flows.preflight import job_plan

    gpus = args.gpus or job.resources.gpus is True
    planned = job_plan(job, args.workers, gpus, args.memory_gb)
    if planned is None:
        raise JobConfigError("field 'universality': this job compares no models whose shape "
                             "is known from their config (give 'universality' or 'seeds')")  # fmt: skip
    names, plan = planned
    tokens = args.tokens or job.corpus.max_tokens
    if not tokens:
        raise JobConfigError("field 'corpus.max_tokens' is not set: give --tokens")
    rate = args.tflops * 1e12
    out = plan.to_dict() | {"models": names, "tokens": tokens, "tflops": args.tflops,
                            "projected_s": plan.seconds(tokens, rate)}  # fmt: skip
    if args.json:
        print(dumps(out))
        return 0
    print(plan.describe(names))
    print(f"products over {tokens:,} tokens at {args.tflops:g} TFLOP/s per worker: "
          f"{out['projected_s'] / 60:,.1f} min on {plan.workers} worker"
          f"{'s' * (plan.workers > 1)} (forwards and finalising not included; "
          "bench/universality.py measures a device's rate)")  # fmt: skip
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    """Submit ``neuronmap run JOB`` to a Ray cluster through its Jobs API (flows.submit)."""
    if args.resume and args.overwrite:
        raise JobConfigError("--resume and --overwrite contradict each other; pick one")
    job = load_job(args.job, atlas=args.atlas)
    if args.workers is not None:
        job = with_options(job, f"with options --workers {args.workers}",
                           resources={"workers": args.workers})  # fmt: skip
    from flows.submit import follow, submit

    user_mode = os.environ.get("RAY_AUTH_MODE")
    sid = submit(job, args.address, resume=args.resume, overwrite=args.overwrite,
                 submission_id=args.submission_id)  # fmt: skip
    # the ray CLI sends the token only under RAY_AUTH_MODE=token (submit turned it on here)
    ray_cli = "RAY_AUTH_MODE=token ray" if user_mode is None and os.environ.get(
        "RAY_AUTH_MODE") == "token" else "ray"  # fmt: skip
    addr = shlex.quote(args.address)
    print(f"submitted {sid} to {args.address} (atlas {job.atlas})")
    print(f"follow it:  {ray_cli} job logs --follow {sid} --address {addr}")
    print(f"status:     {ray_cli} job status {sid} --address {addr}")
    print(f"stop it:    {ray_cli} job stop {sid} --address {addr}")
    if not args.wait:
        return 0
    sys.stdout.flush()
    status, code = follow(args.address, sid)
    print(f"\nneuronmap: job {sid} {status}" + (f" (exit status {code})" if code is not None
          else ""), file=sys.stderr)  # fmt: skip
    if status == "SUCCEEDED":
        return 0
    return code if code else 1


def cmd_deploy(args: argparse.Namespace) -> int:
    from flows.deployment import deploy, parse_env

    d = deploy(args.job, args.name, cron=args.cron, interval=args.interval, pool=args.pool,
               timezone=args.timezone, env=parse_env(args.env))  # fmt: skip
    made = " (process pool created)" if d["pool_created"] else ""
    print(f"deployment {d['name']} ({d['id']}): {d['schedule']}, pool {d['pool']}{made}")
    print(f"atlas: {d['atlas']}; runs never overlap and continue where the last one stopped")
    print(f"runs start once a worker of the pool is up:  prefect worker start --pool {d['pool']}")
    print(f"run it now:  prefect deployment run '{d['name']}'")
    return 0


def cmd_deployments(args: argparse.Namespace) -> int:
    from flows.deployment import list_deployments

    rows = list_deployments()
    if args.json:
        print(dumps(rows))
        return 0
    if not rows:
        print("no deployments of map_neurons (create one with `neuronmap deploy JOB --name NAME`)")
        return 0
    for r in rows:
        nxt = "paused" if r["paused"] else (r["next_run"] or "-")
        if r["next_run"] and r["next_state"] not in (None, "Scheduled"):
            nxt += f" ({r['next_state']})"
        last = f"{r['last_state']} ({r['last_run']}, {r['last_start']})" if r["last_run"] else "-"
        print(f"{r['name']}  [{r['schedule']}]  pool {r['pool']}  atlas {r['atlas']}")
        print(f"  next run: {nxt}   last run: {last}")
    return 0


@contextlib.contextmanager
def quiet_interrupts() -> Iterator[None]:
    """Ctrl-C during a run ends in one line (``main``): Prefect's task and flow engines log
    an interrupted run's traceback as a crash wherever the interrupt lands (mid-record it
    did), and Ray's workers print theirs. The first SIGINT therefore turns logging off
    before it raises KeyboardInterrupt; the driver then unwinds (the runtime stops its
    workers and its Ray instance, the local Prefect server stops) and says what continues
    the run."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigint(_signum: int, _frame: Any) -> None:
        logging.disable(logging.CRITICAL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # one Ctrl-C is enough; unwind quietly
        raise KeyboardInterrupt

    before = signal.getsignal(signal.SIGINT)
    if before is signal.SIG_IGN:  # started in the background with SIGINT ignored: keep it
        yield
        return
    signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)
        logging.disable(logging.NOTSET)


def _interrupted(args: argparse.Namespace) -> str:
    """What an interrupted ``run`` says: the command that continues it."""
    cmd = ["neuronmap", "run", *([args.job] if args.job else [])]
    for flag, value in (("--atlas", args.atlas), ("--ray-address", args.ray_address),
                        ("--workers", args.workers), ("--backend", args.backend)):  # fmt: skip
        cmd += [flag, str(value)] if value is not None else []
    if args.overwrite:  # the atlas it was replacing is untouched; a partial one is rebuilt
        return f"interrupted; start over with `{shlex.join([*cmd, '--overwrite'])}`"
    return f"interrupted; continue with `{shlex.join([*cmd, '--resume'])}`"
