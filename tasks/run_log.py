"""The library's log lines in the flow run's log.

The library logs on the ``mydistill`` loggers (it never imports prefect): a stage waiting for another
run's lock, the leftovers of a killed run swept, generation shards written. Inside a Prefect flow or
task run these lines go to that run's log (the Prefect UI, ``/logs/filter``); elsewhere (a unit test,
``mydistill check``) only where the root logger sends them.

Prefect's ``PREFECT_LOGGING_EXTRA_LOGGERS`` does not serve here: it takes effect only when set before
prefect is imported, which a worker's flow-run process does before it loads the flow's code, and it
leaves the logger's level to the root's WARNING, so INFO lines such as the lock's "waiting" never
reached a run's log.
"""

from __future__ import annotations

import logging

LIBRARY_LOGGER = "mydistill"


class RunLogHandler(logging.Handler):
    """Hands a record to Prefect's API log handler when a flow or task run is current; drops it
    otherwise (Prefect's handler would warn about every line logged outside a run)."""

    def __init__(self) -> None:
        super().__init__()
        self._api: logging.Handler | None = None

    def emit(self, record: logging.LogRecord) -> None:
        from prefect.context import FlowRunContext, TaskRunContext

        if FlowRunContext.get() is None and TaskRunContext.get() is None:
            return
        if self._api is None:
            from prefect.logging.handlers import APILogHandler

            self._api = APILogHandler()
        self._api.handle(record)


def send_library_lines_to_run_logs() -> None:
    """Give the ``mydistill`` logger a :class:`RunLogHandler` (once) and, unless someone chose a level
    for it, INFO."""
    logger = logging.getLogger(LIBRARY_LOGGER)
    if not any(isinstance(h, RunLogHandler) for h in logger.handlers):
        logger.addHandler(RunLogHandler())
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
