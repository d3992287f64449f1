"""Progress where there is no terminal: periodic log lines instead of a progress bar.

A worker's log (what the Prefect UI shows) has no terminal, so a bar is drawn nowhere and a long
stage used to stay silent for minutes. :class:`ProgressLog` is the bar's stand-in: call it with the
number of items just finished; at most every ``every_s`` seconds (``MYDISTILL_PROGRESS_EVERY_S``,
default 30) it logs done / total, the rate and the time left.
"""

from __future__ import annotations

import logging
import os
import time


class ProgressLog:
    def __init__(self, label: str, total: int, logger: logging.Logger, every_s: float | None = None):
        self.label, self.total, self.logger = label, total, logger
        self.every_s = every_s if every_s is not None else float(os.environ.get("MYDISTILL_PROGRESS_EVERY_S", "30"))
        self.done = 0
        self.started = self.last = time.monotonic()

    def __call__(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last < self.every_s and self.done < self.total:
            return
        self.last = now
        rate = self.done / max(now - self.started, 1e-9)
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        self.logger.info(
            "%s: %d/%d (%.0f%%), %.1f/s, about %s left", self.label, self.done, self.total,
            100 * self.done / max(self.total, 1), rate, _duration(left),
        )


def _duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
