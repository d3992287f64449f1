"""A long stage's progress reaches the Prefect UI: lines in the flow run's log and a progress
artifact that moves and ends at 100, for training on launched workers and for a stage in process."""

from __future__ import annotations

import re
import sys
import time

import pytest

pytestmark = pytest.mark.slow  # the test harness starts a Prefect server (about 20 s)

from mydistill.config import load_config
from mydistill.plan import make_plan
from mydistill.progress import MARKED_ENV, ProgressLog, relay_marked
from mydistill.training.launch import run_workers
from tasks import progress as prefect_progress
from tasks import stage_tasks as t

# a worker's rank 0 as launched: 12 steps in about 3 s, reporting as mydistill.train does
WORKER = """
import logging, os, time
from mydistill.progress import ProgressLog, print_marked, reporting_to
with reporting_to(print_marked):
    steps = ProgressLog("distill", 12, logging.getLogger("w"), unit="steps")
    for i in range(12):
        time.sleep(0.25)
        steps(1, loss=lambda: 3.0 - 0.1 * i)
"""


def fake_train(config, plan, stage, parent_run_id=None, *, progress=False, on_line=None):
    """The training stage's contract with the task, on real worker processes (no model)."""
    run_workers([sys.executable, "-c", WORKER], on_line=relay_marked(on_line), env={MARKED_ENV: "1"})
    return {"final_metrics": {"loss": 1.9, "tokens_per_s": 100.0}}


def fake_evaluate(config, plan, parent_run_id=None):
    """An in-process stage: answers reported as the scoring code does."""
    import logging

    answers = ProgressLog("evaluate: student", 8, logging.getLogger("e"), unit="answers")
    for _ in range(8):
        time.sleep(0.3)
        answers(1)
    return {"models": {"student": {"exact_match": 0.5, "perplexity": 2.0, "parameters": 1000}}}


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


def test_progress_lines_and_an_artifact_that_reaches_100_for_each_long_stage(harness, monkeypatch, tmp_path):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, LogFilter, LogFilterFlowRunId

    monkeypatch.setenv("MYDISTILL_PROGRESS_EVERY_S", "0.5")
    monkeypatch.setattr(t.stage_functions, "train", fake_train)
    monkeypatch.setattr(t.stage_functions, "evaluate", fake_evaluate)
    moved: dict[str, list[float]] = {}
    real_update = prefect_progress.update_progress_artifact

    def update(artifact_id, progress, description=None):
        moved.setdefault(description.split(":")[0], []).append(progress)
        return real_update(artifact_id, progress, description=description)

    monkeypatch.setattr(prefect_progress, "update_progress_artifact", update)
    config = load_config("demo-tiny", [f"work_dir={tmp_path}/runs", f"demo.cache_dir={tmp_path}/cache"])

    @flow
    def two_stages() -> None:
        plan = make_plan(config)
        t.train(config, plan, "distill", str(tmp_path / "distill"))
        t.evaluate(config, plan, str(tmp_path / "evaluate"))

    state = two_stages(return_state=True)
    assert state.is_completed(), state
    flow_run_id = state.state_details.flow_run_id
    deadline = time.monotonic() + 30
    while True:  # logs reach the API in batches, a moment after the flow returns: wait for the last lines
        with get_client(sync_client=True) as client:
            logs = [log.message for log in client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))]
            artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
        if any(line.startswith("evaluation (") for line in logs) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    distill = [line for line in logs if re.match(r"distill: \d+/12 steps \(\d+%\), [\d.]+ steps/s, loss [\d.]+, about .+ left", line)]
    evaluate = [line for line in logs if re.match(r"evaluate: student: \d+/8 answers \(\d+%\), .* left", line)]
    assert len(distill) >= 3 and distill[-1].startswith("distill: 12/12 steps (100%)"), logs
    assert len(evaluate) >= 3 and evaluate[-1].startswith("evaluate: student: 8/8 answers (100%)"), logs
    progress = {a.key: a for a in artifacts if a.type == "progress"}
    assert {"distill-progress", "evaluate-progress"} <= set(progress)
    assert all(progress[k].data == 100 for k in ("distill-progress", "evaluate-progress"))
    for stage in ("distill", "evaluate"):  # the bar moved on the way, in order
        assert len(moved[stage]) >= 3 and moved[stage] == sorted(moved[stage]) and 0 < moved[stage][0] < 100
