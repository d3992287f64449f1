"""Progress lines for logs without a terminal."""

import logging

from mydistill.progress import ProgressLog


def test_progress_is_logged_at_most_every_interval_and_always_at_the_end(caplog):
    caplog.set_level(logging.INFO)
    progress = ProgressLog("generate", 100, logging.getLogger("test.progress"), every_s=3600)
    for _ in range(99):
        progress(1)
    assert caplog.records == []  # within the interval: quiet
    progress(1)
    assert [r.getMessage().split(",")[0] for r in caplog.records] == ["generate: 100/100 (100%)"]
    every_call = ProgressLog("evaluate: student", 4, logging.getLogger("test.progress"), every_s=0)
    every_call(2)
    assert "evaluate: student: 2/4 (50%)" in caplog.records[-1].getMessage() and "left" in caplog.records[-1].getMessage()
