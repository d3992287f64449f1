"""The hook of a cancelled or crashed flow run: its MLflow runs still open end KILLED, no others."""

from __future__ import annotations

import uuid

from mydistill import tracking
from mydistill.config import load_config


def test_the_hook_ends_the_cancelled_flow_runs_open_mlflow_runs_killed(tmp_path):
    from prefect.client.schemas.objects import FlowRun
    from prefect.settings import PREFECT_LOGGING_TO_API_ENABLED, temporary_settings
    from prefect.states import Cancelled

    from flows.pipeline_flow import distill_pipeline
    from tasks.stopped import STOPPED_HOOKS, kill_mlflow_runs

    assert kill_mlflow_runs in distill_pipeline.on_cancellation_hooks and kill_mlflow_runs in distill_pipeline.on_crashed_hooks
    assert kill_mlflow_runs in STOPPED_HOOKS
    experiment = f"hook-{uuid.uuid4().hex[:6]}"
    config = load_config("demo-tiny", [f"work_dir={tmp_path}/work", f"tracking.experiment={experiment}"])
    run_id, other_id = uuid.uuid4(), uuid.uuid4()
    tracking.configure(config.tracking.tracking_uri)
    parent = tracking.start_run(experiment, "pipeline", tags={"prefect.flow_run_id": str(run_id)})
    training = tracking.start_run(experiment, "distill", parent_run_id=parent)
    another = tracking.start_run(experiment, "pipeline", tags={"prefect.flow_run_id": str(other_id)})

    # what Prefect hands the hook: its flow, the flow run (with the config), the state
    flow_run = FlowRun(id=run_id, flow_id=uuid.uuid4(), name="cancelled-run", parameters={"config": config.model_dump(mode="json")})
    with temporary_settings({PREFECT_LOGGING_TO_API_ENABLED: False}):  # no API here to send the hook's log line to
        kill_mlflow_runs(distill_pipeline, flow_run, Cancelled())

    status = {run: tracking.client().get_run(run).info.status for run in (parent, training, another)}
    assert status == {parent: "KILLED", training: "KILLED", another: "RUNNING"}
    assert tracking.client().get_run(training).data.tags["mydistill.error"] == "the Prefect flow run was cancelled"
    tracking.end_run(another)
