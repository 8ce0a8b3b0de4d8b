"""The argument parser: every command, its flags and their help. The ``run`` flags that set
job fields are generated from the job model (``flows.config``), so a flag and its field say
the same thing."""

from __future__ import annotations

import argparse
import os
from typing import Literal, get_args, get_origin

import flows
from flows.cli.query import (
    cmd_features,
    cmd_info,
    cmd_layers,
    cmd_neuron,
    cmd_neurons,
    cmd_steer,
    cmd_universal,
    cmd_verify,
    cmd_view,
)
from flows.cli.run import cmd_deploy, cmd_deployments, cmd_plan, cmd_run, cmd_submit
from flows.config import (
    ResourcesConfig,
    SteeringConfig,
    valid_model_name,
)
from ops.configs import TAXONOMY_KINDS as KINDS

EXAMPLES = """examples:
  neuronmap run                                   # the default job: SmolLM2 on the bundled corpus
  neuronmap run job.yaml --atlas out.zarr --workers 4
  neuronmap run job.yaml --resume                 # continue a killed run
  neuronmap info atlas.zarr
  neuronmap neuron atlas.zarr smollm2 5 10 --k 5
  neuronmap neurons atlas.zarr smollm2 --kind token --top 10
  neuronmap layers atlas.zarr smollm2 --plot kinds.png
  neuronmap universal atlas.zarr --top 20 --json
  neuronmap view atlas.zarr                       # web viewer on http://127.0.0.1:8000
  neuronmap deploy job.yaml --name nightly --cron "0 3 * * *"

'neuronmap COMMAND --help' explains each command."""


RUN_FLAGS = ("backend", "workers", "ray_address")
"""Job fields (``resources.<field>``) that ``run`` takes as flags, validated like the file."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="neuronmap", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Map every MLP neuron of language models over a token corpus into a "
        "queryable atlas (Zarr), and query it.\nBad input is one line on stderr and exit "
        "status 2; every query command takes --json (strict JSON).",
        epilog=EXAMPLES,
    )  # fmt: skip
    p.add_argument("--version", action="version", version=f"neuronmap {flows.__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run a mapping job (default: SmolLM2 on the bundled corpus)")
    r.add_argument("job", nargs="?", help="job YAML file (default: the bundled default job)")
    r.add_argument("--atlas", help="atlas path (overrides the job file)")
    r.add_argument("--resume", action="store_true", help="continue an unfinished run")
    r.add_argument("--overwrite", action="store_true",
                   help="replace an existing atlas (built beside it, swapped in on success)")
    for field in RUN_FLAGS:  # generated from the job's fields: one description for both
        info = ResourcesConfig.model_fields[field]
        literal = get_origin(info.annotation) is Literal
        r.add_argument(f"--{field.replace('_', '-')}",
                       choices=get_args(info.annotation) if literal else None,
                       type=int if info.annotation is int else str,
                       help=f"{info.description} (sets resources.{field})")  # fmt: skip
    r.add_argument("--break-lease", action="store_true",
                   help="remove the lease a killed run left on an object-store atlas (only "
                        "when that run is known to be gone)")  # fmt: skip
    r.set_defaults(fn=cmd_run)
    sb = sub.add_parser("submit", help="run a job on a Ray cluster through its Jobs API, with "
                        "this project as the job's runtime environment")  # fmt: skip
    sb.add_argument("job", help="job YAML file (its relative paths are made absolute here)")
    sb.add_argument("--address", default=os.environ.get("RAY_API_SERVER_ADDRESS"),
                    required=not os.environ.get("RAY_API_SERVER_ADDRESS"),
                    help="the head's dashboard, e.g. http://HEAD:8265 (default: "
                    "$RAY_API_SERVER_ADDRESS)")  # fmt: skip
    sb.add_argument("--atlas", help="atlas path or URL as the cluster sees it (overrides the "
                    "job file)")  # fmt: skip
    sb.add_argument("--workers", type=int, help="number of Ray model workers")
    sb.add_argument("--resume", action="store_true", help="continue an unfinished run")
    sb.add_argument("--overwrite", action="store_true", help="replace an existing atlas")
    sb.add_argument("--submission-id", help="the job's id (default: one Ray makes)")
    sb.add_argument("--wait", action="store_true",
                    help="follow the job's log until it ends; exit with its status")  # fmt: skip
    sb.set_defaults(fn=cmd_submit)
    pl = sub.add_parser("plan", help="the universality plan of a job (state per worker, "
                        "checkpoints, waves, projected time), from its config alone")  # fmt: skip
    pl.add_argument("job", help="job YAML file")
    pl.add_argument("--workers", type=int, help="workers (default: the job's)")
    pl.add_argument("--gpus", action="store_true", help="plan for CUDA workers (float32 "
                    "buffers beside the float64 state; 80 GiB per worker unless --memory-gb)")  # fmt: skip
    pl.add_argument("--memory-gb", type=float, help="state per worker (overrides the job's)")
    pl.add_argument("--tokens", type=int, help="tokens (default: the job's corpus.max_tokens)")
    pl.add_argument("--tflops", type=float, default=600.0,
                    help="GEMM rate per worker (default 600: bf16 on an H100/H200)")  # fmt: skip
    pl.add_argument("--json", action="store_true", help="machine-readable output (strict JSON)")
    pl.set_defaults(fn=cmd_plan)
    i = sub.add_parser("info", help="summarise an atlas")
    i.add_argument("atlas", help="atlas path or URL (s3://, gs://, file://)")
    i.add_argument("--json", action="store_true", help="machine-readable output (strict JSON)")
    i.set_defaults(fn=cmd_info)
    ve = sub.add_parser("verify", help="check every chunk of an atlas (missing, corrupt, "
                        "unexpected); exit 1 when any is found")  # fmt: skip
    ve.add_argument("atlas", help="atlas path or URL (s3://, gs://, file://)")
    ve.add_argument("--json", action="store_true", help="machine-readable output (strict JSON)")
    ve.set_defaults(fn=cmd_verify)
    n = sub.add_parser("neuron", help="one neuron's statistics and top examples")
    n.add_argument("atlas", help="atlas path or URL (s3://, gs://, file://)")
    n.add_argument("model", type=model_name, help="model name in the atlas (see `neuronmap info`)")
    n.add_argument("layer", type=int, help="layer number (0 = first block)")
    n.add_argument("index", type=int, help="neuron index within the layer")
    n.add_argument("--k", type=positive_int, default=None,
                   help="number of examples (default all)")  # fmt: skip
    n.add_argument("--json", action="store_true", help="machine-readable output (strict JSON)")
    n.set_defaults(fn=cmd_neuron)
    ns = sub.add_parser("neurons", help="neurons of a kind (dead, token, ngram, positional, "
                        "source, massive), strongest first")  # fmt: skip
    ns.add_argument("atlas", help="atlas path or URL")
    ns.add_argument("model", type=model_name, help="model name in the atlas")
    ns.add_argument("--layer", type=int, default=None, help="only this layer (default all)")
    ns.add_argument("--kind", choices=list(KINDS), default=None,
                    help="rank by this kind's score (default: every kind, --top of each)")  # fmt: skip
    ns.add_argument("--source", default=None,
                    help="only neurons that fire most on this corpus source (e.g. wiki-fr)")  # fmt: skip
    ns.add_argument("--top", type=positive_int, default=20, help="how many neurons per kind")
    ns.add_argument("--json", action="store_true", help="a JSON list of neuron records")
    ns.set_defaults(fn=cmd_neurons)
    ly = sub.add_parser("layers", help="per layer, the fraction of each neuron kind")
    ly.add_argument("atlas", help="atlas path or URL")
    ly.add_argument("model", type=model_name, help="model name in the atlas")
    ly.add_argument("--plot", metavar="PNG", default=None, help="also draw it into this file")
    ly.add_argument("--json", action="store_true", help="machine-readable output (strict JSON)")
    ly.set_defaults(fn=cmd_layers)
    u = sub.add_parser("universal", help="universal neurons (cross-seed correlations)")
    u.add_argument("atlas", help="atlas path or URL (s3://, gs://, file://)")
    u.add_argument("--model", type=model_name, help="only this model")
    u.add_argument("--top", type=positive_int, default=20, help="how many neurons to list")
    u.add_argument("--json", action="store_true", help="machine-readable output (strict JSON)")
    u.set_defaults(fn=cmd_universal)
    f = sub.add_parser("features", help="SAE / SNMF features of a layer")
    f.add_argument("atlas", help="atlas path or URL (s3://, gs://, file://)")
    f.add_argument("model", type=model_name, help="model name in the atlas (see `neuronmap info`)")
    f.add_argument("layer", type=int, help="layer number (0 = first block)")
    f.add_argument("--method", choices=["sae", "snmf"], required=True,
                   help="dictionary method: sparse autoencoder or semi-NMF")
    f.add_argument("--run", help="run name (default: the only run)")
    f.add_argument("--feature", type=int, help="one feature (default: the strongest --top)")
    f.add_argument("--top", type=positive_int, default=5,
                   help="features listed without --feature")  # fmt: skip
    f.add_argument("--k", type=positive_int, default=5, help="examples per feature")
    f.add_argument("--json", action="store_true", help="machine-readable output (strict JSON)")
    f.set_defaults(fn=cmd_features)
    st = sub.add_parser("steer", help="steer along a feature (or a contrast) at a target KL; "
                        "the result is stored in the atlas")  # fmt: skip
    st.add_argument("atlas", help="atlas path or URL (s3://, gs://, file://)")
    st.add_argument("model", type=model_name, help="model name in the atlas (see `neuronmap info`)")
    st.add_argument("layer", type=int, help="layer number (0 = first block)")
    st.add_argument("--method", choices=["sae", "snmf"], help="dictionary of --feature")
    st.add_argument("--run", help="run name (default: the only run)")
    st.add_argument("--feature", type=int, help="feature index")
    st.add_argument("--contrast", nargs=2, metavar=("A", "B"),
                    help="difference-in-means baseline: corpus source A minus source B")  # fmt: skip
    # defaults: the job's steering section (flows.config.SteeringConfig), one place for each
    for opt, field, kind in (("--target-kl", "target_kl", float), ("--tolerance", "tolerance", float),
                             ("--sequences", "sequences", int), ("--max-evals", "max_evals", int),
                             ("--top-tokens", "top_tokens", int)):  # fmt: skip
        info = SteeringConfig.model_fields[field]
        st.add_argument(opt, type=kind, default=info.default, help=info.description)
    st.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    st.add_argument("--json", action="store_true", help="machine-readable output (strict JSON)")
    st.set_defaults(fn=cmd_steer)
    v = sub.add_parser("view", help="browse an atlas in the web viewer")
    v.add_argument("atlas", help="atlas path or URL (s3://, gs://, file://)")
    v.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default loopback; any other needs --allow-remote)")  # fmt: skip
    v.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    v.add_argument("--token", help="require this token on every API request (default: "
                   "$NEURONMAP_VIEW_TOKEN); open the page as /?token=<token>")  # fmt: skip
    v.add_argument("--allow-remote", action="store_true",
                   help="allow a --host other than loopback (serves the atlas to the network)")  # fmt: skip
    v.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="a Host header name to accept besides loopback and --host (repeatable; "
                   "a DNS rebinding defence)")  # fmt: skip
    v.set_defaults(fn=cmd_view)
    dp = sub.add_parser("deploy", help="schedule a job on a Prefect server: a deployment of "
                        "map_neurons that a `prefect worker` of the pool runs")  # fmt: skip
    dp.add_argument("job", help="job YAML file (its relative paths are made absolute here)")
    dp.add_argument("--name", required=True, help="deployment name (map_neurons/NAME)")
    when = dp.add_mutually_exclusive_group()
    when.add_argument("--cron", help="cron schedule, e.g. '0 2 * * *' (default: no schedule, "
                      "runs on demand only)")  # fmt: skip
    when.add_argument("--interval", type=float, metavar="SECONDS", help="run every SECONDS")
    dp.add_argument("--pool", default="neuronmap",
                    help="work pool (default neuronmap; a process pool is created if missing)")  # fmt: skip
    dp.add_argument("--timezone", help="timezone of the schedule (default UTC)")
    dp.add_argument("--env", action="append", metavar="KEY=VALUE",
                    help="environment of the runs, e.g. RAY_ADDRESS=ray://head:10001 (repeatable)")  # fmt: skip
    dp.set_defaults(fn=cmd_deploy)
    ds = sub.add_parser("deployments", help="scheduled jobs: schedule, next run, last state")
    ds.add_argument("--json", action="store_true", help="machine-readable output (strict JSON)")
    ds.set_defaults(fn=cmd_deployments)
    return p


def positive_int(text: str) -> int:
    """An argparse type for counts: ``--k -1`` must not silently mean 'all but the last'."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def model_name(text: str) -> str:
    """An argparse type for a model argument: a name an atlas can hold (``..`` is not)."""
    try:
        return valid_model_name(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
