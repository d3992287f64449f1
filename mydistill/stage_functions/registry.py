"""The end of the pipeline: the student as an MLflow model, the quality gate, and registration."""

from __future__ import annotations

import re
from typing import Any

from mydistill import io, tracking
from mydistill.config import PipelineConfig
from mydistill.plan import StagePlan
from mydistill.stage_functions.common import one_writer
from mydistill.tokenization import PROMPT_PREFIX_KEY, prompt_prefix_of


def log_model(cfg: PipelineConfig, plan: StagePlan, run_id: str, checkpoint_uri: str) -> dict[str, str]:
    """The checkpoint as an MLflow model (transformers flavor) logged once: a checkpoint already
    logged (the same inputs, an earlier night) is referenced, not logged again."""
    fingerprint = (io.read_manifest(checkpoint_uri) or {}).get("inputs_sha256") or io.sha256_of(checkpoint_uri)
    logged = tracking.find_logged_model(cfg.tracking.experiment, fingerprint)
    if logged is None:
        logged = tracking.log_checkpoint_model(
            run_id, io.localize(checkpoint_uri), fingerprint=fingerprint, example_prompt=_example_prompt(cfg, plan),
            max_new_tokens=cfg.evaluate.max_new_tokens, prompt_prefix=prompt_prefix_of(checkpoint_uri),
            name=logged_model_name(checkpoint_uri),
        )
    tracking.set_tags(run_id, {"mydistill.model_uri": logged["model_uri"]})
    return logged


def logged_model_name(checkpoint_uri: str) -> str:
    """The checkpoint folder's name ("distill-<key>", "finetune-<key>", "baseline-<key>"), so a run
    page's "Logged models" tells a pipeline's students apart (MLflow's default would be "model")."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", io.basename(checkpoint_uri)).strip("-.")
    return name or "model"


def _example_prompt(cfg: PipelineConfig, plan: StagePlan) -> str:
    """An input example for the logged model: the first eval prompt."""
    if io.exists(plan.eval_uri):
        for record in io.iter_records(plan.eval_uri):
            return str(record.get(cfg.data.prompt_field, ""))
    return "Hello"


def quality_gate(
    score: float, teacher_retained: float | None, *, min_teacher_retained: float, champion: dict[str, Any] | None,
    beat_champion: bool = True, metric: str = "exact", retained_undefined: str | None = None,
) -> dict[str, Any]:
    """Decide whether a student may take the alias, and say why in one sentence.

    It passes when it keeps at least ``min_teacher_retained`` of the teacher's ``metric`` score
    and, with ``beat_champion``, scores strictly higher than ``champion`` (``{"version", "score",
    "metric"}`` of the version the alias points to now; None: no champion yet, which passes; a
    champion with no recorded score, or one scored on another metric, cannot be compared and does
    not block). ``retained_undefined`` says why there is no share to compare (a teacher scoring 0):
    the gate then passes only when ``min_teacher_retained`` is 0.
    """
    if teacher_retained is None:
        # undefined is not 0%: it blocks only a gate that asks for some share of the teacher's score
        passed = min_teacher_retained == 0
        reasons = [f"% of teacher retained is undefined: {retained_undefined}" if retained_undefined
                   else "no teacher score to compare with"]
        if passed:
            reasons.append("the gate asks for no share of it (min_teacher_retained 0)")
    else:
        passed = teacher_retained >= min_teacher_retained
        relation = "at least" if passed else "below"
        said = "exact match" if metric == "exact" else metric
        reasons = [f"student keeps {teacher_retained:.1%} of the teacher's {said} ({relation} the gate's {min_teacher_retained:.0%})"]
    if beat_champion:
        if champion is None:
            reasons.append("no champion yet")
        elif champion.get("score") is None:
            reasons.append(f"champion v{champion['version']} has no recorded score to beat")
        elif champion.get("metric", "exact") != metric:
            reasons.append(f"champion v{champion['version']} was scored on {champion.get('metric', 'exact')}, not {metric}: not compared")
        elif score > champion["score"]:
            reasons.append(f"beats champion v{champion['version']} ({score:.3f} > {champion['score']:.3f})")
        else:
            passed = False
            reasons.append(f"does not beat champion v{champion['version']} ({score:.3f} ≤ {champion['score']:.3f})")
    return {
        "passed": passed,
        "reason": "; ".join(reasons),
        "metric": metric,
        "score": score,
        "teacher_retained": teacher_retained,
        "threshold": min_teacher_retained,
        "champion_version": champion["version"] if champion else None,
        "champion_score": champion.get("score") if champion else None,
    }


STUDENT_TAG = "mydistill.student_sha256"  # the checkpoint's identity (its manifest's inputs_sha256)


def _registered_before(cfg: PipelineConfig, existing: dict[str, Any]) -> dict[str, Any]:
    """The decision already taken for this checkpoint's version. If that run passed the gate but died
    before moving the alias, the alias moves now, unless a later version holds it."""
    reg, version, tags = cfg.registry, existing["version"], existing["tags"]
    passed = tags.get("gate_passed") == "True"
    holder = tracking.alias_holder(reg.model_name, reg.alias)
    if passed and (holder is None or int(holder["version"]) < int(version)):
        tracking.set_model_alias(reg.model_name, reg.alias, version)
        holder = {"version": version}
    score = float(tags[tracking.SCORE_TAG]) if tracking.SCORE_TAG in tags else float("nan")
    # the reason recorded then ("no champion yet") may no longer hold: say where the alias is now
    now = ("it holds the alias now" if holder is not None and holder["version"] == version
           else f"v{holder['version']} holds the alias now" if holder is not None else "no version holds the alias now")
    return {
        "passed": passed, "reason": f"already registered as v{version} (same checkpoint); {now}; when registered: {tags.get('gate_reason', '')}",
        "score": score, "teacher_retained": float(tags["teacher_retained"]) if "teacher_retained" in tags else None,
        "threshold": reg.min_teacher_retained, "champion_version": None, "champion_score": None,
        "registered": True, "reused": True, "model_name": reg.model_name, "version": version,
        "alias": reg.alias if holder is not None and holder["version"] == version else None,
        "version_url": tracking.model_version_url(reg.model_name, version),
    }


# one registration per checkpoint even when two runs reach this at once: the second finds the first's version
@one_writer(lambda cfg, plan, *_, **__: f"{plan.student_uri}.register", "register")
def register(cfg: PipelineConfig, plan: StagePlan, report: dict[str, Any], parent_run_id: str | None = None) -> dict[str, Any]:
    """Register the student in the MLflow model registry; move the alias only if the gate passes.

    The gate (:func:`quality_gate`): the student keeps at least ``registry.min_teacher_retained``
    of the teacher's ``registry.gate_metric`` score and beats the version the alias points to now (its
    ``mydistill.score`` tag). Every student is registered, passing or not; the decision and its
    reason are tags on the new version and on the register run, and ``decision.json`` there.
    Without tracking (no parent run) or with the registry off, only the decision is returned. A
    checkpoint registered before (a re-run, a nightly run on which nothing changed) is not
    registered again: its earlier decision is returned (``reused``).
    """
    from mydistill.metrics import report_key

    reg = cfg.registry
    student = report["models"]["student"]
    metric = report.get("gate_metric", reg.gate_metric)
    score, retained = float(student[report_key(metric)]), student.get("teacher_retained")
    gate = {"metric": metric, "retained_undefined": report.get("retained_undefined")}
    if not reg.enabled or parent_run_id is None:
        decision = quality_gate(
            score, retained, min_teacher_retained=reg.min_teacher_retained, champion=None, beat_champion=False, **gate,
        )
        return {**decision, "registered": False}
    # exactly once per checkpoint: a re-run (or a run killed after registering) finds its version
    fingerprint = (io.read_manifest(plan.student_uri) or {}).get("inputs_sha256")
    existing = tracking.find_model_version(reg.model_name, STUDENT_TAG, fingerprint) if fingerprint else None
    if existing is not None:
        return _registered_before(cfg, existing)
    with tracking.stage_run(parent_run_id, "register", cfg.tracking.experiment) as run_id:
        assert run_id is not None
        # read before registering: the new version must be compared with the one before it
        champion = tracking.alias_holder(reg.model_name, reg.alias) if reg.beat_champion else None
        decision = quality_gate(
            score, retained, min_teacher_retained=reg.min_teacher_retained, champion=champion, beat_champion=reg.beat_champion,
            **gate,
        )
        tracking.log_params(run_id, {"register": reg.model_dump(), "student_uri": plan.student_uri})
        tracking.log_metrics(run_id, {
            "gate_score": score, **({tracking.SCORE_METRIC: score} if metric == "exact" else {}),
            **({"teacher_retained": retained} if retained is not None else {}),
        })
        model = log_model(cfg, plan, run_id, plan.student_uri)  # found: the training stage logged it
        # the pipeline run lists its student under "Logged models"; the register run took it as input
        tracking.link_model(parent_run_id, model["model_id"], as_output=True)
        tracking.link_model(run_id, model["model_id"], as_output=False)
        version = tracking.register_model_version(
            reg.model_name, model, register_run_id=run_id,
            tags={
                "gate_passed": str(decision["passed"]), "gate_reason": decision["reason"], "student_uri": plan.student_uri,
                tracking.SCORE_TAG: f"{score:.6f}", tracking.SCORE_METRIC_TAG: metric,
                **({STUDENT_TAG: fingerprint} if fingerprint else {}),
                **({"teacher_retained": f"{retained:.6f}"} if retained is not None else {}),
                **({"champion_before": f"v{decision['champion_version']}"} if decision["champion_version"] else {}),
                # a student distilled step-by-step answers behind its label prefix: whoever serves it needs it
                **({PROMPT_PREFIX_KEY: prefix} if (prefix := prompt_prefix_of(plan.student_uri)) else {}),
            },
        )
        if fingerprint:  # a create whose answer was lost and that MLflow's client sent again made two
            version = tracking.keep_first_version(reg.model_name, STUDENT_TAG, fingerprint)
        if decision["passed"]:
            tracking.set_model_alias(reg.model_name, reg.alias, version)
        decision.update(
            registered=True, model_name=reg.model_name, version=version, alias=reg.alias if decision["passed"] else None,
            version_url=tracking.model_version_url(reg.model_name, version),
        )
        tracking.log_dict(run_id, decision, "decision.json")
        tracking.set_tags(run_id, {
            "mydistill.gate": "passed" if decision["passed"] else "failed", "mydistill.gate_reason": decision["reason"],
            "mydistill.model_version": f"{reg.model_name}/{version}",
        })
    return decision
