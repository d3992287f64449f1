"""What a person sees in the Prefect UI, under the test harness: a long stage's progress (lines in
the flow run's log and a progress artifact that moves and ends at 100, for training on launched
workers and for a stage in process), and the link to the run in MLflow's model training view."""

from __future__ import annotations

import logging
import os
import re
import sys
import time

import pytest

pytestmark = pytest.mark.slow  # the test harness starts a Prefect server (about 20 s)

from mydistill.config import load_config
from mydistill.pipeline.plan import make_plan
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


def fake_train(config, plan, stage, parent_run_id=None, *, progress=False, on_line=None, labels=None):
    """The training stage's contract with the task, on real worker processes (no model)."""
    run_workers([sys.executable, "-c", WORKER], on_line=relay_marked(on_line), env={MARKED_ENV: "1"})
    return {"final_metrics": {"loss": 1.9, "tokens_per_s": 100.0}}


def fake_evaluate(config, plan, parent_run_id=None):
    """An in-process stage of two parts (two models' answers), reported as the scoring code does."""
    import logging

    for i, model in enumerate(("teacher", "student")):
        answers = ProgressLog(f"evaluate: {model}", 5, logging.getLogger("e"), unit="answers", part=(i, 2))
        for _ in range(5):
            time.sleep(0.3)
            answers(1)
    return {"models": {"student": {"exact_match": 0.5, "perplexity": 2.0, "parameters": 1000}}}


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


def logs_and_artifacts(flow_run_id, last_line: str) -> tuple[list[str], list]:
    """The flow run's log lines and artifacts, once ``last_line`` (a prefix) is among the lines: logs
    reach the API in batches, a moment after the flow returns."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, LogFilter, LogFilterFlowRunId

    deadline = time.monotonic() + 30
    while True:
        with get_client(sync_client=True) as client:
            logs = [log.message for log in client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))]
            artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
        if any(line.startswith(last_line) for line in logs) or time.monotonic() > deadline:
            return logs, artifacts
        time.sleep(0.5)


def test_progress_lines_and_an_artifact_that_reaches_100_for_each_long_stage(harness, monkeypatch, tmp_path):
    from prefect import flow

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
    logs, artifacts = logs_and_artifacts(state.state_details.flow_run_id, "evaluation (")
    distill = [line for line in logs if re.match(r"distill: \d+/12 steps \(\d+%\), [\d.]+ steps/s, loss [\d.]+, about .+ left", line)]
    evaluate = [line for line in logs if re.match(r"evaluate: (teacher|student): \d+/5 answers \(\d+%\), .* left \(part [12] of 2\)$", line)]
    assert len(distill) >= 3 and distill[-1].startswith("distill: 12/12 steps (100%)"), logs
    assert len(evaluate) >= 4 and evaluate[-1].startswith("evaluate: student: 5/5 answers (100%)"), logs
    progress = {a.key: a for a in artifacts if a.type == "progress"}
    assert {"distill-progress", "evaluate-progress"} <= set(progress)
    assert all(progress[k].data == 100 for k in ("distill-progress", "evaluate-progress"))
    # the bar moved on the way, in order: over both parts of evaluate as one bar (the teacher's half, then the student's)
    for stage in ("distill", "evaluate"):
        assert len(moved[stage]) >= 3 and moved[stage] == sorted(moved[stage]) and 0 < moved[stage][0] < 100, moved
    assert any(40 <= p <= 60 for p in moved["evaluate"]), moved


def test_the_pipeline_run_is_linked_in_mlflows_model_training_view(harness, monkeypatch, tmp_path):
    from prefect import flow

    from mydistill import tracking

    monkeypatch.setenv(tracking.UI_URL_ENV, "https://mlflow.example")
    monkeypatch.delenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", raising=False)
    config = load_config("demo-tiny", [f"work_dir={tmp_path}/runs", f"demo.cache_dir={tmp_path}/cache", "tracking.experiment=prefect-ui-test"])

    @flow
    def open_run() -> str:
        return t.open_pipeline_run(config, make_plan(config))

    state = open_run(return_state=True)
    assert state.is_completed(), state
    run_id = state.result()
    url = tracking.run_reference(run_id)["url"]
    assert url.endswith(f"/runs/{run_id}?workflowType=machine_learning")
    logs, artifacts = logs_and_artifacts(state.state_details.flow_run_id, "MLflow run ")
    assert f"MLflow run {run_id}: {url}" in logs
    assert [a.data for a in artifacts if a.key == "mlflow-run"] == [f"[MLflow run {run_id}]({url})"]
    # MLflow's own "View run" lines would open the GenAI view: they are switched off
    assert os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] == "true"


def test_a_deployment_of_a_preset_and_a_run_from_its_form_pass_prefects_server_validation(harness):
    """The form's schema (optional fields as plain inputs) against what the Prefect server checks:
    a deployment's parameters (plain JSON schema: the stack leaves unset fields out) and a flow run
    made from the form's values (Prefect's own validation: nulls from the form pass); a wrong type
    is still refused."""
    import httpx
    from prefect.client.orchestration import get_client
    from prefect.exceptions import PrefectHTTPStatusError
    from prefect.utilities.callables import parameter_schema

    from flows.pipeline_flow import distill_pipeline
    from mydistill.config.section import dump_without_unset

    config = load_config("demo-tiny")
    schema = parameter_schema(distill_pipeline).model_dump_for_openapi()
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name("distill-pipeline")
        deployment_id = client.create_deployment(
            flow_id=flow_id, name="form-test", parameters={"config": dump_without_unset(config)},
            parameter_openapi_schema=schema, enforce_parameter_schema=True,
        )
        form = {"config": {**config.model_dump(mode="json"), "name": "from-the-form"}}  # nulls as the form sends them
        run = client.create_flow_run_from_deployment(deployment_id, parameters=form)
        assert run.parameters["config"]["name"] == "from-the-form"
        form["config"]["distill"]["steps"] = "many"
        with pytest.raises(PrefectHTTPStatusError) as refused:
            client.create_flow_run_from_deployment(deployment_id, parameters=form)
        assert refused.value.response.status_code == httpx.codes.CONFLICT and "distill.steps" in refused.value.response.text
    # the deployment's parameters come back as the same config
    assert load_config("demo-tiny").model_dump() == type(config).model_validate(dump_without_unset(config)).model_dump()


def test_a_stage_waiting_on_another_runs_lock_says_so_in_the_run_log_once(harness, tmp_path):
    """The library's INFO lines (here the lock's "waiting") reach the flow run's log, once each; a
    line logged outside any run goes nowhere near the API and warns about nothing."""
    import threading
    import warnings

    from prefect import flow, task

    from mydistill.storage.locks import artifact_lock
    from tests.flows.test_pipeline import flow_run_logs

    artifact = str(tmp_path / "distill-abc")
    held, release = threading.Event(), threading.Event()

    def other_run():
        with artifact_lock(artifact, what="distill"):
            held.set()
            release.wait(10)

    @task
    def stage():
        threading.Timer(1.0, release.set).start()
        with artifact_lock(artifact, what="distill", poll_s=0.2):
            return "done"

    @flow
    def waits():
        return stage()

    holder = threading.Thread(target=other_run)
    holder.start()
    assert held.wait(10)
    state = waits(return_state=True)
    holder.join(10)
    assert state.result() == "done"
    # the last lines reach the API from Prefect's log worker in batches: on a loaded machine, after the run ended
    deadline = time.monotonic() + 30
    while True:
        lines = flow_run_logs(state.state_details.flow_run_id)
        if any("is ours after" in line for line in lines) or time.monotonic() > deadline:
            break
        time.sleep(1)
    waiting = [line for line in lines if line.startswith("distill: ") and "is held by pid" in line and "waiting for it to finish" in line]
    assert len(waiting) == 1, lines
    assert sum(line.startswith("distill: ") and "is ours after" in line for line in lines) == 1, lines

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Prefect's API handler would warn: no flow run to send it to
        logging.getLogger("mydistill").info("outside any run")
