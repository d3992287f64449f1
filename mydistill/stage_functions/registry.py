"""The end of the pipeline: the student as an MLflow model, the quality gate, and registration."""

from __future__ import annotations

import re
from typing import Any

from mydistill import io, tracking
from mydistill.config import PipelineConfig
from mydistill.pipeline.plan import StagePlan
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
            name=logged_model_name(checkpoint_uri), source_name=source_name(checkpoint_uri),
        )
    tracking.set_tags(run_id, {"mydistill.model_uri": logged["model_uri"]})
    return logged


def logged_model_name(checkpoint_uri: str) -> str:
    """The checkpoint folder's name ("distill-<key>", "finetune-<key>", "baseline-<key>"), so a run
    page's "Logged models" tells a pipeline's students apart (MLflow's default would be "model")."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", io.basename(checkpoint_uri)).strip("-.")
    return name or "model"


def source_name(checkpoint_uri: str) -> str:
    """What a logged model's "Logged from" says: the stage that trained it and that stage's entry
    point (``mydistill finetune stage (mydistill.stage_functions.train)``)."""
    stage = logged_model_name(checkpoint_uri).split("-")[0]
    if stage in ("distill", "finetune", "baseline"):
        return f"mydistill {stage} stage (mydistill.stage_functions.train)"
    return "mydistill register stage (mydistill.stage_functions.register)"  # a checkpoint no stage logged


def _example_prompt(cfg: PipelineConfig, plan: StagePlan) -> str:
    """An input example for the logged model: the first eval prompt."""
    if io.exists(plan.eval_uri):
        for record in io.iter_records(plan.eval_uri):
            return str(record.get(cfg.data.prompt_field, ""))
    return "Hello"


def quality_gate(
    score: float, teacher_retained: float | None, *, min_teacher_retained: float, champion: dict[str, Any] | None,
    beat_champion: bool = True, metric: str = "exact", retained_undefined: str | None = None,
    retained_low: float | None = None, retained_high: float | None = None, confidence: float = 0.95,
    category_retained: dict[str, float | None] | None = None, min_category_retained: float = 0.0,
    versus_champion: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Decide whether a student may take the alias, and say why in one sentence.

    Three checks, each with its own clause in the reason (a failing one names the bound or the
    category that failed):

    1. *Retention.* The share of the teacher's ``metric`` score kept must reach
       ``min_teacher_retained``; with ``retained_low`` (the lower end of its paired interval at
       ``confidence``) the lower end must, so a student that passes only by luck on a small eval set
       does not. ``retained_undefined`` says why there is no share (a teacher scoring 0): the gate
       then passes only when ``min_teacher_retained`` is 0.
    2. *Every category.* With ``min_category_retained`` > 0, each category's share
       (``category_retained``; None: the teacher scores 0 there, not checked) must reach it: an
       average that passes cannot hide a collapsed skill.
    3. *The champion.* With ``beat_champion``, the student must beat ``champion`` (``{"version",
       "score", "metric"}`` of the version the alias holds; None: no champion yet, which passes) by
       more than noise: ``versus_champion`` (``{"difference", "low", "high", "questions"}``, the
       paired difference on the same questions) must lie above 0. Without it (a champion registered
       without per-question scores, or on other questions) its score must be exceeded. A champion
       with no recorded score, or one scored on another metric, cannot be compared and does not block.
    """
    said = "exact match" if metric == "exact" else metric
    failed_categories: list[str] = []
    if teacher_retained is None:
        # undefined is not 0%: it blocks only a gate that asks for some share of the teacher's score
        passed = min_teacher_retained == 0
        reasons = [f"% of teacher retained is undefined: {retained_undefined}" if retained_undefined
                   else "no teacher score to compare with"]
        if passed:
            reasons.append("the gate asks for no share of it (min_teacher_retained 0)")
    elif retained_low is not None:
        passed = retained_low >= min_teacher_retained
        interval = f"{confidence:.0%} interval {retained_low:.1%}–{retained_high if retained_high is not None else teacher_retained:.1%}"
        verdict = (f"its lower end is at least the gate's {min_teacher_retained:.0%}" if passed
                   else f"its lower end {retained_low:.1%} is below the gate's {min_teacher_retained:.0%}")
        reasons = [f"student keeps {teacher_retained:.1%} of the teacher's {said} ({interval}); {verdict}"]
    else:
        passed = teacher_retained >= min_teacher_retained
        relation = "at least" if passed else "below"
        reasons = [f"student keeps {teacher_retained:.1%} of the teacher's {said} ({relation} the gate's {min_teacher_retained:.0%})"]
    if min_category_retained > 0 and category_retained:
        failed_categories = [c for c, kept in category_retained.items() if kept is not None and kept < min_category_retained]
        checked = {c: kept for c, kept in category_retained.items() if kept is not None}
        if failed_categories:
            passed = False
            shares = ", ".join(f"{c} keeps {category_retained[c]:.1%}" for c in failed_categories)
            reasons.append(f"category {shares} of the teacher's {said}, below the gate's {min_category_retained:.0%} per category")
        elif checked:
            lowest = min(checked, key=lambda c: checked[c])
            reasons.append(f"every category keeps at least {min_category_retained:.0%} (lowest: {lowest} {checked[lowest]:.1%})")
        unchecked = sorted(c for c, kept in category_retained.items() if kept is None)
        if unchecked:
            reasons.append(f"not checked, the teacher scores 0 there: {', '.join(unchecked)}")
    if beat_champion:
        reasons.append(_versus_champion(champion, score, metric, versus_champion, confidence))
        if reasons[-1].startswith("does not beat"):
            passed = False
    return {
        "passed": passed,
        "reason": "; ".join(reasons),
        "metric": metric,
        "score": score,
        "teacher_retained": teacher_retained,
        "teacher_retained_low": retained_low,
        "confidence": confidence,
        "threshold": min_teacher_retained,
        "failed_categories": failed_categories,
        "champion_version": champion["version"] if champion else None,
        "champion_score": champion.get("score") if champion else None,
        "versus_champion": versus_champion,
    }


def _versus_champion(
    champion: dict[str, Any] | None, score: float, metric: str, paired: dict[str, Any] | None, confidence: float,
) -> str:
    """The champion clause of the gate's reason; it starts with "does not beat" when the student loses."""
    if champion is None:
        return "no champion yet"
    v = champion["version"]
    if champion.get("score") is None:
        return f"champion v{v} has no recorded score to beat"
    if champion.get("metric", "exact") != metric:
        return f"champion v{v} was scored on {champion.get('metric', 'exact')}, not {metric}: not compared"
    if paired is not None:
        gain = (f"{paired['difference'] * 100:+.1f} points on the same {paired['questions']} questions, {confidence:.0%} "
                f"interval {paired['low'] * 100:+.1f} to {paired['high'] * 100:+.1f}")
        if paired["low"] > 0:
            return f"beats champion v{v} by more than noise ({gain})"
        return f"does not beat champion v{v} by more than noise ({gain})"
    if score > champion["score"]:
        return f"beats champion v{v} ({score:.3f} > {champion['score']:.3f}) on means (no per-question scores to pair)"
    return f"does not beat champion v{v} ({score:.3f} ≤ {champion['score']:.3f})"


QUESTION_SCORES_FILE = "question_scores.json"  # on the register run: the student's gate-metric score per question


def paired_with_champion(report: dict[str, Any], champion: dict[str, Any] | None, confidence: float) -> dict[str, Any] | None:
    """The student's gain over the champion on the questions both answered (matched by question id),
    with its paired bootstrap interval; None when the champion's register run (``register_run_id``
    from :func:`tracking.alias_holder`) kept no per-question scores on this metric or they share no
    question."""
    from mydistill.evaluation import uncertainty

    mine = report.get("question_scores") or {}
    if champion is None or not champion.get("register_run_id") or "student" not in mine.get("models", {}):
        return None
    theirs = tracking.read_dict(champion["register_run_id"], QUESTION_SCORES_FILE)
    if not theirs or theirs.get("metric") != mine.get("metric"):
        return None
    by_id = dict(zip(theirs["ids"], theirs["scores"], strict=True))
    pairs = [(s, by_id[q]) for q, s in zip(mine["ids"], mine["models"]["student"], strict=True) if q in by_id]
    if not pairs:
        return None
    interval = uncertainty.difference_interval([a for a, _ in pairs], [b for _, b in pairs], confidence)
    return {"difference": interval.value, "low": interval.low, "high": interval.high, "questions": len(pairs)}


def gate_inputs(report: dict[str, Any]) -> dict[str, Any]:
    """What the gate reads from an evaluation report besides the score: the retention's interval
    and each category's share of the teacher's score (the student's)."""
    student = report["models"]["student"]
    return {
        "retained_low": student.get("teacher_retained_low"), "retained_high": student.get("teacher_retained_high"),
        "category_retained": {
            category: row["student"].get("teacher_retained")
            for category, row in (report.get("by_category") or {}).items() if "teacher_retained" in row.get("student", {})
        } or None,
        "confidence": report.get("confidence", 0.95),
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
def _log_what_the_gate_read(
    run_id: str, report: dict[str, Any], *, score: float, metric: str, retained: float | None, retained_low: float | None,
) -> None:
    """On the register run: the student's per-question scores (logged before the version exists: once it
    holds the alias, the next student is paired with these) and the numbers the gate read."""
    if "student" in (report.get("question_scores") or {}).get("models", {}):
        questions = report["question_scores"]
        tracking.log_dict(run_id, {"metric": questions["metric"], "ids": questions["ids"],
                                   "scores": questions["models"]["student"]}, QUESTION_SCORES_FILE)
    tracking.log_metrics(run_id, {
        "gate_score": score, **({tracking.SCORE_METRIC: score} if metric == "exact" else {}),
        **({"teacher_retained": retained} if retained is not None else {}),
        **({"teacher_retained_low": retained_low} if retained_low is not None else {}),
    })


@one_writer(lambda cfg, plan, *_, **__: f"{plan.student_uri}.register", "register")
def register(cfg: PipelineConfig, plan: StagePlan, report: dict[str, Any], parent_run_id: str | None = None) -> dict[str, Any]:
    """Register the student in the MLflow model registry; move the alias only if the gate passes.

    The gate (:func:`quality_gate`): the lower end of the share of the teacher's
    ``registry.gate_metric`` score the student keeps reaches ``registry.min_teacher_retained``, every
    category keeps ``registry.min_category_retained``, and the student beats the version the alias
    points to now by more than noise (paired on the same questions, from the champion's
    ``question_scores.json``; else its ``mydistill.score`` tag). Every student is registered,
    passing or not; the decision and its reason are tags on the new version and on the register run,
    and ``decision.json`` there, with the student's per-question scores (``question_scores.json``)
    for the next student to be paired with.
    Without tracking (no parent run) or with the registry off, only the decision is returned. A
    checkpoint registered before (a re-run, a nightly run on which nothing changed) is not
    registered again: its earlier decision is returned (``reused``).
    """
    from mydistill.evaluation.metrics import report_key

    reg = cfg.registry
    student = report["models"]["student"]
    metric = report.get("gate_metric", reg.gate_metric)
    score, retained = float(student[report_key(metric)]), student.get("teacher_retained")
    gate = {"metric": metric, "retained_undefined": report.get("retained_undefined"),
            "min_category_retained": reg.min_category_retained, **gate_inputs(report)}
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
            versus_champion=paired_with_champion(report, champion, gate["confidence"]), **gate,
        )
        tracking.log_params(run_id, {"register": reg.model_dump(), "student_uri": plan.student_uri})
        _log_what_the_gate_read(run_id, report, score=score, metric=metric, retained=retained, retained_low=gate["retained_low"])
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
