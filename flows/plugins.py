"""``resources.plugins``: modules that extend neuronmap on import (a model family through
``ops.models.register_arch``, an SAE architecture through ``ops.sae.register``).

Registration is per process: a family registered only in the driver is unknown to the
workers that load the models. So the runtime imports the plugins in the driver before any
work and in every worker before any model loads (``flows.runtime``); preflight only checks,
without importing anything heavy, that each module can be found.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Sequence

from ops.errors import ConfigError

_FIELD = "field 'resources.plugins'"


def check_plugins(modules: Sequence[str]) -> None:
    """Each module can be found (nothing is imported): a cheap preflight check."""
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError) as e:  # a parent package that does not import
            raise ConfigError(f"{_FIELD}: module {name!r} cannot be found ({e})") from None
        if not found:
            raise ConfigError(f"{_FIELD}: module {name!r} cannot be found on this Python's "
                              "path (install it, or add its directory to PYTHONPATH)")  # fmt: skip


def _registered() -> int:
    from ops.configs import ARCHITECTURES
    from ops.models import ARCHS

    return len(ARCHS) + len(ARCHITECTURES)


def import_plugins(modules: Sequence[str]) -> None:
    """Import each module; one that does not import, or that registers nothing when first
    imported, is a :class:`ConfigError` naming it."""
    for name in modules:
        fresh = name not in sys.modules
        before = _registered() if fresh else 0
        try:
            importlib.import_module(name)
        except Exception as e:  # ImportError, or the plugin's own error on import
            sys.modules.pop(name, None)
            raise ConfigError(f"{_FIELD}: module {name!r} does not import: "
                              f"{type(e).__name__}: {e}") from None  # fmt: skip
        if fresh and _registered() == before:
            raise ConfigError(f"{_FIELD}: module {name!r} registered nothing (a plugin calls "
                              "ops.models.register_arch or ops.sae.register on import)")  # fmt: skip
