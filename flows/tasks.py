"""Shared Prefect task options: no result caching (the atlas manifest is the cache) and
retries only for failures that retrying can fix."""

from __future__ import annotations

from typing import Any

from prefect.cache_policies import NONE as NO_CACHE

from ops.errors import NeuronmapError
from storage.errors import AtlasError


def retryable(_task: Any, _run: Any, state: Any) -> bool:
    """Retrying cannot fix bad input; it can fix a lost worker or a flaky filesystem."""
    return not isinstance(state.data, NeuronmapError | AtlasError)


TASK: dict[str, Any] = dict(
    cache_policy=NO_CACHE, retries=1, retry_delay_seconds=1, retry_condition_fn=retryable
)
