"""What ``neuronmap`` sets before anything imports Ray or Prefect: quiet, offline defaults,
and Ray kept on loopback for a local run. Imported first by ``flows.cli``."""

from __future__ import annotations

import os
import sys

# Defaults that keep a laptop run quiet and offline; explicit settings win.
for _k, _v in {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "RAY_USAGE_STATS_ENABLED": "0",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    # a fresh Prefect database on a busy 2-core machine outlasts Prefect's 20 s default
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
}.items():
    os.environ.setdefault(_k, _v)


def _named_ray_address(argv: list[str]) -> str | None:
    for i, a in enumerate(argv):
        if a == "--ray-address" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--ray-address="):
            return a.split("=", 1)[1]
    return os.environ.get("RAY_ADDRESS") or None


def _loopback_only(address: str) -> bool:
    """Whether ``address`` is a Ray head of this machine that listens on loopback only (one
    started with ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``). Its drivers need the same setting:
    without it Ray turns 127.0.0.1 into the machine's network address, where nothing listens,
    and retries for minutes. A head listening on the network is reached as Ray does it."""
    import ipaddress
    import socket

    if "://" in address or address == "auto":  # Ray Client: no local raylet to find
        return False
    host, _, port = address.rpartition(":")
    try:
        ip = ipaddress.ip_address(socket.gethostbyname(host.strip("[]") or "localhost"))
        port_n = int(port)
    except (OSError, ValueError):
        return False
    if not ip.is_loopback:
        return False
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:  # the address Ray would advertise (no packet is sent)
            s.connect(("8.8.8.8", 53))
            outward = s.getsockname()[0]
        except OSError:
            return True  # loopback is all this machine has
    try:
        socket.create_connection((outward, port_n), timeout=0.5).close()
    except OSError:
        return True
    return False


# A local run keeps Ray on loopback (else it advertises the VM's address). Ray reads this at
# import, and it also turns joining a multi-node cluster off: so only when no cluster is named,
# or the one named is a head of this machine on loopback only.
_address = _named_ray_address(sys.argv)
if _address is None or _loopback_only(_address):
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

