"""Orchestration: the job config, Prefect flows, Ray workers and the CLI.

The only package that wires ``ops`` (computation) to ``storage`` (the atlas).
"""

__version__ = "0.1.0"
