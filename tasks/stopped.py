"""Flow state hooks for a flow run stopped from outside: its MLflow runs end KILLED.

A cancelled flow run's process gets SIGTERM and ends the stage and pipeline runs it holds as
KILLED itself (:func:`mydistill.tracking.stopped_status`). These hooks cover the runs whose process
could not: killed after the grace period, or gone (a crash). Every run of the pipeline's experiment
tagged with the flow run's id, and its children, still RUNNING, is ended KILLED.
"""

from __future__ import annotations

from typing import Any

from mydistill import tracking
from mydistill.config import PipelineConfig, load_config
from tasks.cluster import delete_cluster_jobs


def kill_mlflow_runs(flow: Any, flow_run: Any, state: Any) -> None:
    """``on_cancellation`` / ``on_crashed`` hook: end the flow run's MLflow runs still open as KILLED."""
    from prefect.logging.loggers import flow_run_logger

    given = (flow_run.parameters or {}).get("config")
    config = PipelineConfig.model_validate(given) if given is not None else load_config("demo")
    what = state.name.lower() if state else "stopped"
    tracking.configure(config.tracking.tracking_uri, config.tracking.artifact_location)
    ended = tracking.kill_open_runs(
        config.tracking.experiment, {"prefect.flow_run_id": str(flow_run.id)}, f"the Prefect flow run was {what}",
    )
    if ended:
        flow_run_logger(flow_run, flow).info("flow run %s: MLflow run(s) %s ended KILLED", what, ", ".join(ended))


# the hooks of a flow that trains: a cancelled or crashed run's TrainJobs deleted, its MLflow runs ended KILLED
STOPPED_HOOKS = [delete_cluster_jobs, kill_mlflow_runs]
