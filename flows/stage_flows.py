"""One flow per stage, each running that stage alone from the artifacts of the stages before it."""

from __future__ import annotations

from typing import Any

from prefect import flow

from mydistill.config import PipelineConfig, load_config
from mydistill.pipeline.plan import make_plan
from tasks import stage_tasks as t
from tasks.stopped import STOPPED_HOOKS


def _tracked(config: PipelineConfig, stage: str, run, parent_run_id: str | None = None):
    t.load_credentials()
    plan = make_plan(config)
    if parent_run_id:  # started by the pipeline (training_flow_runs): its MLflow run, which it closes
        return run(plan, parent_run_id)
    parent = t.open_pipeline_run(config.model_copy(update={"name": f"{config.name}-{stage}"}), plan)
    try:
        result = run(plan, parent)
    except BaseException as e:
        t.close_pipeline_run(config, parent, None, None, failed=True, stopped=not isinstance(e, Exception))  # a cancel's SIGTERM, Ctrl-C
        raise
    t.close_pipeline_run(config, parent, result if stage == "evaluate" else None, None)
    return result


@flow(name="generate")
def generate_flow(config: PipelineConfig = load_config("demo")) -> str:
    """Teacher responses for the prompts (the demo's data and teacher are prepared first)."""

    def run(plan, parent):
        if config.demo is not None:
            t.prepare_demo(config, plan)
            plan = make_plan(config)  # the demo's data and teacher exist now, with fingerprints
        return t.fresh_unless_done(t.generate, plan.generate_uri)(config, plan, plan.generate_uri, parent)

    return _tracked(config, "generate", run)


@flow(name="mix")
def mix_flow(config: PipelineConfig = load_config("demo")) -> str:
    """Mix teacher responses with real data (needs the generate stage's output)."""
    return _tracked(config, "mix", lambda plan, parent: t.fresh_unless_done(t.mix, plan.mix_uri)(config, plan, plan.mix_uri, parent))


@flow(name="signal")
def signal_flow(config: PipelineConfig = load_config("demo")) -> str:
    """The teacher's signal over the training mix, stored once for distill (needs the mix stage's
    output and signal.enabled: true)."""

    def run(plan, parent):
        if not plan.signal_uri:
            raise ValueError("signal.enabled is false in this config: there is no signal stage to run")
        return t.fresh_unless_done(t.teacher_signal, plan.signal_uri)(config, plan, plan.signal_uri, parent)

    return _tracked(config, "signal", run)


@flow(name="distill", on_cancellation=STOPPED_HOOKS, on_crashed=STOPPED_HOOKS)
def distill_flow(config: PipelineConfig = load_config("demo"), parent_run_id: str | None = None) -> str:
    """Stage 1: distil the student from the teacher (needs the mix stage's output). ``parent_run_id``:
    the pipeline's MLflow run, when the pipeline started this flow run (training_flow_runs)."""
    return _tracked(
        config, "distill",
        lambda plan, parent: t.fresh_unless_done(t.train, plan.distill_uri)(config, plan, "distill", plan.distill_uri, parent),
        parent_run_id,
    )


@flow(name="finetune", on_cancellation=STOPPED_HOOKS, on_crashed=STOPPED_HOOKS)
def finetune_flow(config: PipelineConfig = load_config("demo"), parent_run_id: str | None = None) -> str:
    """Stage 2: fine-tune the distilled student on the real task data (needs stage 1's output).
    ``parent_run_id``: as for :func:`distill_flow`."""

    def run(plan, parent):
        if not plan.finetune_uri:
            raise ValueError("finetune.enabled is false in this config")
        return t.fresh_unless_done(t.train, plan.finetune_uri)(config, plan, "finetune", plan.finetune_uri, parent)

    return _tracked(config, "finetune", run, parent_run_id)


@flow(name="baseline", on_cancellation=STOPPED_HOOKS, on_crashed=STOPPED_HOOKS)
def baseline_flow(config: PipelineConfig = load_config("demo"), parent_run_id: str | None = None) -> str:
    """The baseline student, trained on the real data alone for comparison (needs the mix stage's output).
    ``parent_run_id``: as for :func:`distill_flow`."""

    def run(plan, parent):
        if not plan.baseline_uri:
            raise ValueError("evaluate.baseline is false in this config: there is no baseline to train")
        return t.fresh_unless_done(t.train, plan.baseline_uri)(config, plan, "baseline", plan.baseline_uri, parent)

    return _tracked(config, "baseline", run, parent_run_id)


@flow(name="evaluate", on_cancellation=STOPPED_HOOKS, on_crashed=STOPPED_HOOKS)
def evaluate_flow(config: PipelineConfig = load_config("demo")) -> dict[str, Any]:
    """Score student, teacher and baseline (needs the training stages' outputs)."""

    def run(plan, parent):
        baseline = ()
        if plan.baseline_uri:
            baseline = (t.fresh_unless_done(t.train, plan.baseline_uri)(config, plan, "baseline", plan.baseline_uri, parent),)
        return t.fresh_unless_done(t.evaluate, plan.evaluate_uri)(config, plan, plan.evaluate_uri, parent, reads=baseline)

    return _tracked(config, "evaluate", run)
