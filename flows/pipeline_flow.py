"""The distillation pipeline: generate → mix → (signal) → distill → finetune → evaluate → register."""

from __future__ import annotations

from typing import Any

from prefect import flow

from mydistill.config import PipelineConfig, load_config
from mydistill.plan import make_plan
from tasks import stage_tasks as t
from tasks.cluster import delete_cluster_jobs


@flow(name="distill-pipeline", log_prints=True, on_cancellation=[delete_cluster_jobs], on_crashed=[delete_cluster_jobs])
def distill_pipeline(config: PipelineConfig = load_config("demo")) -> dict[str, Any]:
    """Distil the teacher into the student and evaluate it against the teacher and a baseline.

    Returns the evaluation report, the registration decision and where every artifact is.
    """
    t.load_credentials()
    t.preflight(config)
    plan = make_plan(config)
    if config.demo is not None:
        t.prepare_demo(config, plan)
        plan = make_plan(config)  # again: the demo's data and teacher exist now, with fingerprints
    parent = t.open_pipeline_run(config, plan)
    report = decision = None
    try:
        t.what_changed(config, plan, parent)
        t.fresh_unless_done(t.generate, plan.generate_uri)(config, plan, plan.generate_uri, parent)
        t.fresh_unless_done(t.mix, plan.mix_uri)(config, plan, plan.mix_uri, parent)
        if plan.signal_uri:
            t.fresh_unless_done(t.teacher_signal, plan.signal_uri)(config, plan, plan.signal_uri, parent)
        t.fresh_unless_done(t.train, plan.distill_uri)(config, plan, "distill", plan.distill_uri, parent)
        if plan.finetune_uri:
            t.fresh_unless_done(t.train, plan.finetune_uri)(config, plan, "finetune", plan.finetune_uri, parent)
        if plan.baseline_uri:
            t.fresh_unless_done(t.train, plan.baseline_uri)(config, plan, "baseline", plan.baseline_uri, parent)
        report = t.fresh_unless_done(t.evaluate, plan.evaluate_uri)(config, plan, plan.evaluate_uri, parent)
        decision = t.register(config, plan, report, parent)
        t.record_run(config, plan, parent, decision)
    except BaseException:
        t.close_pipeline_run(config, parent, report, decision, failed=True)
        raise
    cost = t.close_pipeline_run(config, parent, report, decision)
    return {"mlflow_run_id": parent, "report": report, "decision": decision, "plan": plan.as_dict(), "cost": cost}


if __name__ == "__main__":
    distill_pipeline()
