"""A long stage's progress in the Prefect UI: a log line in the flow run and a progress artifact.

The library reports progress through :mod:`mydistill.progress` (it never imports prefect); a task
wraps its one library call in :func:`progress_in_prefect`, whose callback writes each report
(about every 30 s, ``MYDISTILL_PROGRESS_EVERY_S``) as a line in the flow run's log and moves the
stage's progress artifact (key ``<stage>-progress``: a bar on the flow run's Artifacts tab).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from uuid import UUID

from prefect import get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from mydistill.progress import Progress, reporting_to


def artifact_key(stage: str) -> str:
    """``distill`` → ``distill-progress`` (keys hold only lowercase letters, digits and dashes)."""
    return re.sub(r"[^a-z0-9-]+", "-", stage.lower()).strip("-") + "-progress"


class PrefectProgress:
    """The callback :func:`mydistill.progress.reporting_to` receives: log line + progress artifact.

    The artifact is made when the stage starts (at 0, so the bar is there from the first moment) and
    set to 100 when it ends well, also when it had nothing to do (a reused checkpoint). A failure to
    reach the Prefect API is logged once and never fails the stage: progress is for people.
    """

    def __init__(self, stage: str) -> None:
        self.stage, self.logger = stage, get_run_logger()
        self.artifact_id: UUID | None = None
        self.percent = 0.0
        self.broken = False
        self._artifact(0.0, f"{stage}: starting")

    def __call__(self, progress: Progress) -> None:
        self.logger.info(progress.line())
        self._artifact(progress.stage_percent, progress.line())  # a stage of parts (evaluate: one per model) fills one bar

    def finish(self) -> None:
        if self.percent < 100:
            self._artifact(100.0, f"{self.stage}: done")

    def _artifact(self, percent: float, description: str) -> None:
        if self.broken:
            return
        try:
            if self.artifact_id is None:
                self.artifact_id = create_progress_artifact(percent, key=artifact_key(self.stage), description=description)
            else:
                update_progress_artifact(self.artifact_id, percent, description=description)
            self.percent = percent
        except Exception as e:  # noqa: BLE001 - the API being away must not stop training
            self.broken = True
            self.logger.warning("%s: could not update the progress artifact (%s); progress stays in the log", self.stage, e)


@contextlib.contextmanager
def progress_in_prefect(stage: str) -> Iterator[PrefectProgress]:
    """Inside a task: every progress report made in this block goes to the flow run's log and to the
    stage's progress artifact."""
    sink = PrefectProgress(stage)
    with reporting_to(sink):
        yield sink
    sink.finish()
