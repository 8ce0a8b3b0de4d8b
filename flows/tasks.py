"""Shared Prefect task options: no result caching (the atlas manifest is the cache) and
retries only for failures that retrying can fix; and no stack traces in Prefect's run logs
for bad input, whose one-line message says everything."""

from __future__ import annotations

import logging
from typing import Any

from prefect.cache_policies import NONE as NO_CACHE

from ops.errors import NeuronmapError
from storage.errors import AtlasError

USER_ERRORS: tuple[type[Exception], ...] = (NeuronmapError, AtlasError)
"""Bad input (``flows.config.JobConfigError`` included): retrying cannot fix it, and its
message, not a traceback, is what the user needs."""


def retryable(_task: Any, _run: Any, state: Any) -> bool:
    """Retrying cannot fix bad input; it can fix a lost worker or a flaky filesystem."""
    return not isinstance(state.data, USER_ERRORS)


TASK: dict[str, Any] = dict(
    cache_policy=NO_CACHE, retries=1, retry_delay_seconds=1, retry_condition_fn=retryable
)


class UserErrorsWithoutTraceback(logging.Filter):
    """Drops the traceback from a Prefect run-log record whose exception is a user error.

    Prefect logs a failed flow run ("Encountered exception during execution") with its
    traceback, 45-100 lines of engine frames, before the CLI prints its one clear line. The
    record itself stays (it is the run's log in the Prefect UI too), one line long; every
    other exception keeps its traceback.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if isinstance(record.exc_info, tuple) else None
        if isinstance(exc, USER_ERRORS):
            record.exc_info = None
            record.exc_text = None
        return True


_FILTER = UserErrorsWithoutTraceback()

# Filters on a logger see the records made on that very logger: these are the ones Prefect's
# flow and task engines log run failures on. A logger keeps its filters when Prefect
# (re)configures logging.
for _name in ("prefect.flow_runs", "prefect.task_runs", "prefect.engine"):
    if _FILTER not in logging.getLogger(_name).filters:
        logging.getLogger(_name).addFilter(_FILTER)
