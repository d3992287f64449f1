"""Flow state hooks for the cluster engine: a cancelled or crashed flow run takes its TrainJobs down.

A training task stopped inside its process deletes its own TrainJob
(:func:`mydistill.training.kubeflow.run_trainjob`); these hooks cover the runs whose process is
gone before it could (a worker killed it, its pod was evicted): every TrainJob labelled with the
flow run's id is deleted, in the namespace of each stage with ``engine: kubeflow``.
"""

from __future__ import annotations

from typing import Any

from mydistill.config import PipelineConfig, load_config


def delete_cluster_jobs(flow: Any, flow_run: Any, state: Any) -> None:
    """``on_cancellation`` / ``on_crashed`` hook: delete the flow run's TrainJobs."""
    from prefect.logging.loggers import flow_run_logger

    from mydistill.training import kubeflow

    logger = flow_run_logger(flow_run, flow)
    given = (flow_run.parameters or {}).get("config")
    config = PipelineConfig.model_validate(given) if given is not None else load_config("demo")
    seen = set()
    for stage in (config.distill, config.finetune):
        where = (stage.kubeflow.kubeconfig, stage.kubeflow.context, stage.kubeflow.namespace)
        if stage.engine != "kubeflow" or where in seen:
            continue
        seen.add(where)
        deleted = kubeflow.delete_trainjobs(stage.kubeflow, {kubeflow.FLOW_RUN_LABEL: str(flow_run.id)})
        if deleted:
            logger.info("flow run %s: deleted TrainJob(s) %s in %s", state.name if state else "stopped", ", ".join(deleted), stage.kubeflow.namespace)
