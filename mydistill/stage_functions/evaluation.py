"""The evaluate stage: student, teacher and baseline scored, and the report, samples and plots logged."""

from __future__ import annotations

import os
import time
from typing import Any

from mydistill import io, tracking
from mydistill.pipeline import costs
from mydistill.config import PipelineConfig
from mydistill.pipeline.plan import StagePlan
from mydistill.stage_functions.common import on_gpu, one_writer, require_done, sweep_debris


@one_writer(lambda cfg, plan, *_, **__: plan.evaluate_uri, "evaluate")
def evaluate(cfg: PipelineConfig, plan: StagePlan, parent_run_id: str | None = None) -> dict[str, Any]:
    """Score student, teacher and baseline; log the report, samples and plots to MLflow.

    The plots (student vs teacher vs baseline with intervals, the share of the teacher's score kept
    per category when eval rows carry one, and the loss curves of both training stages from their
    checkpoint manifests) go to the evaluate run and to the pipeline run, as images.
    """
    from mydistill.evaluation.evaluate import CATEGORY_PLOT_FILE, PLOT_FILE, SAMPLES_FILE, evaluate_models, loss_curves_figure

    models = {"teacher": plan.teacher_uri, "student": plan.student_uri}
    if plan.baseline_uri:
        models["baseline"] = plan.baseline_uri
    require_done(plan.student_uri, "finetune" if plan.finetune_uri else "distill")
    require_done(plan.baseline_uri, "baseline")
    sweep_debris(plan.evaluate_uri)
    started = time.perf_counter()
    with tracking.stage_run(parent_run_id, "evaluate", cfg.tracking.experiment) as run_id:
        ev = cfg.evaluate
        judge = judge_id = None
        if "judge" in ev.metrics:
            from mydistill.evaluation.judge import judge_cache_uri, make_judge

            assert ev.judge is not None  # the config requires it with the judge metric
            judge = make_judge(ev.judge, cache_uri=ev.judge.cache_uri or judge_cache_uri(cfg.work_dir))
            judge_id = f"{ev.judge.base_url}|{ev.judge.model}|{ev.judge.mode}"
        report = evaluate_models(
            models, plan.eval_uri, plan.evaluate_uri, ev, fields=cfg.data, gate_metric=cfg.registry.gate_metric,
            confidence=cfg.registry.confidence, judge=judge, judge_id=judge_id,
            dtypes={name: cfg.teacher.dtype if name == "teacher" else cfg.student.dtype for name in models},
            answer_cache_uri=io.join(cfg.work_dir, "answer-cache"),  # the teacher answers once per eval set
        )
        if run_id:
            tracking.log_metrics(run_id, costs.stage_cost(
                wall_s=time.perf_counter() - started, gpu=on_gpu("auto"), eval_examples=report["num_examples"] * len(models),
            ))
            tracking.log_params(run_id, {"evaluate": cfg.evaluate.model_dump(exclude={"judge"}), "models": models})
            tracking.log_dataset(run_id, io.read_records(plan.eval_uri), name="eval", source=plan.eval_uri, context="evaluation")
            tracking.log_metrics(run_id, summary_metrics(report))
            tracking.log_table(run_id, io.read_records(io.join(plan.evaluate_uri, SAMPLES_FILE)), "evaluation/samples.json")
            evaluation = io.localize(plan.evaluate_uri)
            tracking.log_artifacts(run_id, evaluation, "evaluation")
            histories = {
                stage: (io.read_manifest(uri) or {}).get("history", [])
                for stage, uri in (("distill", plan.distill_uri), ("finetune", plan.finetune_uri), ("baseline", plan.baseline_uri))
                if uri
            }
            curves = loss_curves_figure(histories)
            for target in (run_id, parent_run_id):
                tracking.log_figure(target, curves, "plots/loss_curves.png")
                tracking.log_artifact(target, os.path.join(evaluation, PLOT_FILE), "plots")
                if os.path.exists(os.path.join(evaluation, CATEGORY_PLOT_FILE)):  # eval rows with categories
                    tracking.log_artifact(target, os.path.join(evaluation, CATEGORY_PLOT_FILE), "plots")
    return report


def summary_metrics(report: dict[str, Any]) -> dict[str, float]:
    """Flat ``<model>_<metric>`` numbers from an evaluation report (with ``_low`` / ``_high``, the
    interval's ends), ``<model>_<category>_<metric>`` per category and ``<a>_vs_<b>_difference`` (with
    its ends) per paired comparison; undefined values (None) are left out."""
    out = {
        f"{model}_{k}": float(v) for model, m in report["models"].items() for k, v in m.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    for category, row in report.get("by_category", {}).items():
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(category))
        for model, m in row.items():
            if isinstance(m, dict):
                out.update({f"{model}_{safe}_{k}": float(v) for k, v in m.items() if isinstance(v, (int, float))})
    for name, c in report.get("comparisons", {}).items():
        out.update({f"{name}_difference": c["difference"], f"{name}_difference_low": c["low"], f"{name}_difference_high": c["high"]})
    return out
