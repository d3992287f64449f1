"""The pipeline run's own bookkeeping: its MLflow parent run opened, the run remembered for the
next one, and the parent run closed with its summary and cost. One function each, so that the
Prefect tasks around them call one library function (and a user's own orchestration can too).
"""

from __future__ import annotations

from typing import Any

from mydistill import tracking
from mydistill.config import PipelineConfig
from mydistill.pipeline import changes
from mydistill.pipeline.plan import StagePlan
from mydistill.stage_functions.common import run_costs
from mydistill.stage_functions.evaluation import summary_metrics


def open_pipeline_run(cfg: PipelineConfig, plan: StagePlan, *, tags: dict[str, str] | None = None) -> tuple[str, list[str]]:
    """Start the pipeline's MLflow parent run (tagged with ``tags``, e.g. the orchestrator's run id)
    with the validated config as params and artifact, the plan, and its input datasets by
    reference; returns its id and the ids of
    runs left RUNNING by killed processes, which were marked KILLED first."""
    tracking.configure(cfg.tracking.tracking_uri, cfg.tracking.artifact_location)
    killed = tracking.mark_dead_runs_killed(cfg.tracking.experiment)
    run_id = tracking.start_run(cfg.tracking.experiment, cfg.name, tags={"mydistill.pipeline": "true", **(tags or {})})
    tracking.log_params(run_id, cfg.model_dump())
    tracking.log_dict(run_id, cfg.model_dump(mode="json"), "config.json")
    tracking.log_dict(run_id, plan.as_dict(), "plan.json")
    for name, fp in plan.fingerprints.items():  # what the run starts from, on its Datasets list
        if fp["kind"] == "data":
            tracking.log_dataset_reference(run_id, name=name, source=fp["uri"], digest=fp["sha256"], context="pipeline input")
    return run_id, list(killed)


def record_run(cfg: PipelineConfig, plan: StagePlan, parent_run_id: str | None, decision: dict[str, Any] | None) -> None:
    """Remember this run's fingerprints for the next one (what changed since); on the parent run, the
    champion's score after this run's decision and the champion's history over past runs."""
    if parent_run_id and decision:
        holder = tracking.alias_holder(cfg.registry.model_name, cfg.registry.alias)  # after this run's decision
        if holder is not None and holder.get("score") is not None:
            tracking.log_metrics(parent_run_id, {"champion_score": float(holder["score"])})
        tracking.log_metrics(parent_run_id, {tracking.SCORE_METRIC: float(decision["score"])})  # before the search below
        runs = tracking.pipeline_runs(cfg.tracking.experiment, cfg.name)
        tracking.log_figure(parent_run_id, changes.champion_history_figure(runs), "plots/champion_history.png")
    changes.record_run(cfg.work_dir, cfg.name, plan, mlflow_run_id=parent_run_id)


def close_pipeline_run(
    cfg: PipelineConfig, run_id: str, report: dict[str, Any] | None, decision: dict[str, Any] | None, *, failed: bool = False,
    stopped: bool = False,
) -> dict[str, float]:
    """Log the summary, the gate's decision and what the run cost on the parent run, then end it
    (FINISHED, FAILED, or KILLED when ``stopped`` from outside: a cancelled flow run); returns the cost."""
    if report:
        tracking.log_metrics(run_id, summary_metrics(report))
    if decision:
        gate = "passed" if decision["passed"] else "failed"
        tracking.set_tags(run_id, {"mydistill.gate": gate, "mydistill.gate_reason": decision["reason"]})
    retained = (report or {}).get("models", {}).get("student", {}).get("teacher_retained")
    cost = run_costs(cfg, run_id, retained)
    tracking.end_run(run_id, "KILLED" if stopped else "FAILED" if failed else "FINISHED")
    return cost
