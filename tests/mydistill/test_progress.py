"""Progress reports for logs without a terminal, and their way out of launched workers."""

import logging
import sys

from mydistill.progress import MARKED_ENV, Progress, ProgressLog, print_marked, relay_marked, reporting_to
from mydistill.training.launch import run_workers


def test_progress_is_logged_at_most_every_interval_and_always_at_the_end(caplog):
    caplog.set_level(logging.INFO)
    progress = ProgressLog("generate", 100, logging.getLogger("test.progress"), every_s=3600, unit="responses")
    for _ in range(99):
        progress(1)
    assert caplog.records == []  # within the interval: quiet
    progress(1)
    assert [r.getMessage().split(",")[0] for r in caplog.records] == ["generate: 100/100 responses (100%)"]
    every_call = ProgressLog("evaluate: student", 4, logging.getLogger("test.progress"), every_s=0)
    every_call(2)
    assert "evaluate: student: 2/4 items (50%)" in caplog.records[-1].getMessage() and "left" in caplog.records[-1].getMessage()


def test_reports_go_to_the_callers_sink_with_the_loss_read_only_when_due(monkeypatch):
    monkeypatch.setenv("MYDISTILL_PROGRESS_EVERY_S", "3600")
    seen: list[Progress] = []
    reads: list[int] = []

    def loss() -> float:
        reads.append(1)
        return 2.5

    with reporting_to(seen.append):
        steps = ProgressLog("distill", 10, logging.getLogger("test.progress"), unit="steps", start=4)  # resumed at 4
        for _ in range(6):
            steps(1, loss=loss)
    assert len(seen) == 1 and len(reads) == 1  # one report (the last step), one read of the loss
    last = seen[0]
    assert (last.done, last.total, last.percent, last.loss, last.left_s) == (10, 10, 100.0, 2.5, 0.0)
    assert last.line().startswith("distill: 10/10 steps (100%), ") and "loss 2.5, about 0 s left" in last.line()


def test_a_launched_workers_marked_lines_come_back_as_reports_and_other_lines_pass(tmp_path):
    script = (
        "import logging\n"
        "from mydistill.progress import ProgressLog, print_marked, reporting_to\n"
        "print('[rank0]: hello', flush=True)\n"
        "with reporting_to(print_marked):\n"
        "    p = ProgressLog('distill', 3, logging.getLogger('w'), every_s=0, unit='steps')\n"
        "    for i in range(3):\n"
        "        p(1, loss=lambda: 1.5)\n"
    )
    reports: list[Progress] = []
    lines: list[str] = []
    with reporting_to(reports.append):
        relay = relay_marked(lines.append)
    run_workers([sys.executable, "-c", script], on_line=relay, env={MARKED_ENV: "1"})
    assert lines == ["[rank0]: hello"]
    assert [(r.label, r.done, r.total, r.unit, r.loss) for r in reports] == [("distill", i, 3, "steps", 1.5) for i in (1, 2, 3)]
    # no sink where the launcher runs: the report's readable line goes to the line callback
    plain: list[str] = []
    relay_marked(plain.append)("[rank0]: [mydistill progress] " + '{"label": "x", "done": 1, "total": 2, "rate": 1.0, "left_s": null}')
    assert plain == ["x: 1/2 items (50%), 1 items/s, about ? left"]


def test_print_marked_round_trips(capsys):
    for p in (Progress("signal", 5, 10, 2.0, float("inf"), "examples"), Progress("evaluate: student", 3, 4, 1.0, 1.0, part=(1, 2))):
        print_marked(p)
        got: list[Progress] = []
        with reporting_to(got.append):
            relay_marked(None)(capsys.readouterr().out.strip())
        assert got == [p]


def test_a_part_of_a_stage_fills_its_share_of_the_stages_bar():
    second_of_two = Progress("evaluate: student", 3, 4, 1.0, 1.0, "answers", part=(1, 2))
    assert (second_of_two.percent, second_of_two.stage_percent) == (75.0, 87.5)
    assert second_of_two.line().endswith("about 1 s left (part 2 of 2)")
    assert Progress("distill", 1, 4, 1.0, 3.0).stage_percent == 25.0
