"""``neuronmap`` command line: run a mapping job, query an atlas.

Errors from bad input print one clear line and exit with status 2; query commands
take ``--json`` for machine-readable output.

    bootstrap  environment set before Ray or Prefect is imported (first, on purpose)
    parser     every command and flag (the run flags generated from the job's fields)
    run        run, plan, submit, deploy, deployments; Ctrl-C
    query      info, verify, neuron, neurons, layers, universal, features, steer, view
    render     text, sparklines, strict JSON, plots
"""

from __future__ import annotations

import os
import sys

import flows.cli.bootstrap  # noqa: F401  (before anything imports Ray)
from flows.cli.parser import build_parser
from flows.cli.render import SPARK, dumps, shown, sparkline
from flows.cli.run import _interrupted
from ops.errors import NeuronmapError
from storage.atlas import AtlasError

__all__ = ["SPARK", "build_parser", "dumps", "main", "shown", "sparkline"]


def main(argv: list[str] | None = None) -> int:
    """Run a command. Bad input (a user error) is one line on stderr and exit status 2, never
    a traceback; Ctrl-C is exit status 130 (for ``run``, with the command that continues it);
    any other exception is a bug and keeps its traceback."""
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (NeuronmapError, AtlasError) as e:
        print(f"neuronmap: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.command == "run":
            print(f"\nneuronmap: {_interrupted(args)}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `neuronmap info ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
