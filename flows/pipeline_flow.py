"""The distillation pipeline: generate → mix → (signal) → distill → finetune → evaluate → register."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound

from mydistill import io
from mydistill.config import PipelineConfig, load_config
from mydistill.pipeline.plan import StagePlan, make_plan
from tasks import stage_tasks as t
from tasks.stopped import STOPPED_HOOKS


@flow(name="distill-pipeline", log_prints=True, on_cancellation=STOPPED_HOOKS, on_crashed=STOPPED_HOOKS)
def distill_pipeline(config: PipelineConfig = load_config("demo")) -> dict[str, Any]:
    """Distil the teacher into the student and evaluate it against the teacher and a baseline.

    Returns the evaluation report, the registration decision and where every artifact is.
    """
    try:
        return _pipeline(config)
    except Exception as e:
        # a service that kept failing anywhere in the run (opening its MLflow run, a stage, closing it) ends the
        # flow run with one line as its state message, which the Prefect UI shows and the CLI prints
        told = unavailable_service_error(e, config)
        if told is None:
            raise
        raise told from None


def _pipeline(config: PipelineConfig) -> dict[str, Any]:
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
        # each task's returned URI goes into the next, so the Prefect UI draws the DAG's edges
        responses = t.fresh_unless_done(t.generate, plan.generate_uri)(config, plan, plan.generate_uri, parent)
        mixed = t.fresh_unless_done(t.mix, plan.mix_uri)(config, plan, plan.mix_uri, parent, reads=(responses,))
        signal = None
        if plan.signal_uri:
            signal = t.fresh_unless_done(t.teacher_signal, plan.signal_uri)(config, plan, plan.signal_uri, parent, reads=(mixed,))
        students = [_train(config, plan, "distill", plan.distill_uri, parent, reads=(mixed, *([signal] if signal else [])))]
        if plan.finetune_uri:
            students.append(_train(config, plan, "finetune", plan.finetune_uri, parent, reads=(students[0], mixed)))
        if plan.baseline_uri:
            students.append(_train(config, plan, "baseline", plan.baseline_uri, parent))
        report = t.fresh_unless_done(t.evaluate, plan.evaluate_uri)(config, plan, plan.evaluate_uri, parent, reads=tuple(students))
        decision = t.register(config, plan, report, parent)
        t.record_run(config, plan, parent, decision)
    except BaseException as e:
        t.close_pipeline_run(config, parent, report, decision, failed=True, stopped=not isinstance(e, Exception))  # a cancel's SIGTERM, Ctrl-C
        raise
    cost = t.close_pipeline_run(config, parent, report, decision)
    return {"mlflow_run_id": parent, "report": report, "decision": decision, "plan": plan.as_dict(), "cost": cost}


def unavailable_service_error(error: Exception, config: PipelineConfig) -> Exception | None:
    """A service that kept failing after every retry (MLflow, the object store), told in one line
    that names it and says the finished stages are kept; None for any other error."""
    from mydistill import raised_by_us, tracking

    if raised_by_us(error):
        return None
    if tracking.tracking_unavailable(error):
        return tracking.unavailable_error(error)
    if io.store_unavailable(error):
        return io.store_unavailable_error(error, _strings(config.model_dump(mode="json")))
    return None


def _strings(value: Any) -> list[str]:
    """Every string in a config dump (where its buckets are named)."""
    if isinstance(value, dict):
        return [u for v in value.values() for u in _strings(v)]
    if isinstance(value, list):
        return [u for v in value for u in _strings(v)]
    return [value] if isinstance(value, str) else []


# the stage deployments (deploy/prefect.yaml, on the GPU pool) that training_flow_runs sends training to
TRAINING_DEPLOYMENTS = {"distill": "distill/distill", "finetune": "finetune/finetune", "baseline": "baseline/baseline"}


def _train(config: PipelineConfig, plan: StagePlan, stage: str, output_uri: str, parent: str, reads: tuple[str, ...] = ()) -> str:
    """One training stage: a task of this flow run, or (``training_flow_runs``) a flow run of the stage's
    deployment, linked as a subflow, so only that run holds a GPU worker."""
    if not config.training_flow_runs:
        return t.fresh_unless_done(t.train, output_uri)(config, plan, stage, output_uri, parent, reads=reads)
    if io.read_manifest(output_uri) is not None:  # done before, for the same inputs: no GPU run to start
        get_run_logger().info("%s: done already → %s", stage, output_uri)
        return output_uri
    name = TRAINING_DEPLOYMENTS[stage]
    try:
        child = run_deployment(name, parameters={"config": config, "parent_run_id": parent}, as_subflow=True, timeout=None)
    except ObjectNotFound:
        raise ValueError(
            f"training_flow_runs: there is no deployment {name!r} to run {stage} on; deploy deploy/prefect.yaml "
            "(prefect deploy --all) or set training_flow_runs: false"
        ) from None
    if not child.state or not child.state.is_completed():
        state = child.state.name if child.state else "unknown"
        raise RuntimeError(f"{stage}: flow run {child.name} of {name} ended {state}: {child.state.message if child.state else ''}".rstrip(": "))
    return output_uri


if __name__ == "__main__":
    distill_pipeline()
