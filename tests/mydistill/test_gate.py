"""The quality gate's logic (mydistill.stage_functions.registry.quality_gate): the lower bound of the
retention, every category, and a gain over the champion that must be more than noise."""

from __future__ import annotations

from mydistill.stage_functions import quality_gate
from mydistill.stage_functions.registry import gate_inputs


def test_a_collapsed_category_fails_the_gate_though_the_average_passes():
    decision = quality_gate(
        0.6, 0.9, retained_low=0.85, retained_high=0.95, min_teacher_retained=0.8, champion=None, metric="contains",
        category_retained={"capital": 1.0, "arithmetic": 0.2, "opposite": 0.95}, min_category_retained=0.7,
    )
    assert not decision["passed"] and decision["failed_categories"] == ["arithmetic"]
    assert "its lower end is at least the gate's 80%" in decision["reason"]
    assert "category arithmetic keeps 20.0% of the teacher's contains, below the gate's 70% per category" in decision["reason"]


def test_every_category_above_the_bar_passes_and_names_the_lowest():
    decision = quality_gate(
        0.6, 0.9, retained_low=0.85, min_teacher_retained=0.8, champion=None,
        category_retained={"reverse": 0.97, "sort": 0.75, "new": None}, min_category_retained=0.7,
    )
    assert decision["passed"] and decision["failed_categories"] == []
    assert "every category keeps at least 70% (lowest: sort 75.0%)" in decision["reason"]
    assert "not checked, the teacher scores 0 there: new" in decision["reason"]
    # 0 turns the per-category check off
    off = quality_gate(0.6, 0.9, min_teacher_retained=0.8, champion=None, category_retained={"sort": 0.1})
    assert off["passed"] and "category" not in off["reason"]


def test_the_lower_end_of_the_retention_must_clear_the_bar():
    # 90% kept on a handful of questions: the point estimate clears 80%, its interval does not
    decision = quality_gate(0.45, 0.9, retained_low=0.6, retained_high=1.1, min_teacher_retained=0.8, champion=None)
    assert not decision["passed"]
    assert "keeps 90.0% of the teacher's exact match (95% interval 60.0%–110.0%); its lower end 60.0% is below the gate's 80%" in decision["reason"]


def test_a_gain_within_the_noise_does_not_beat_the_champion_and_a_clear_one_does():
    champion = {"version": "3", "score": 0.50, "metric": "exact"}
    noise = {"difference": 0.02, "low": -0.03, "high": 0.07, "questions": 200}
    within = quality_gate(0.52, 0.9, min_teacher_retained=0.8, champion=champion, versus_champion=noise)
    assert not within["passed"]
    assert "does not beat champion v3 by more than noise (+2.0 points on the same 200 questions, 95% interval -3.0 to +7.0)" in within["reason"]
    clear = {"difference": 0.12, "low": 0.06, "high": 0.18, "questions": 200}
    beats = quality_gate(0.62, 0.9, min_teacher_retained=0.8, champion=champion, versus_champion=clear)
    assert beats["passed"] and "beats champion v3 by more than noise (+12.0 points" in beats["reason"]


def test_the_gate_reads_the_interval_and_the_categories_from_the_report():
    report = {
        "confidence": 0.9,
        "models": {"student": {"exact_match": 0.5, "teacher_retained": 0.8, "teacher_retained_low": 0.7, "teacher_retained_high": 0.9}},
        "by_category": {"sort": {"count": 5, "teacher": {}, "student": {"teacher_retained": 0.4}}},
    }
    assert gate_inputs(report) == {
        "retained_low": 0.7, "retained_high": 0.9, "category_retained": {"sort": 0.4}, "confidence": 0.9,
    }


def test_register_applies_the_configured_category_bar():
    from mydistill import stage_functions
    from mydistill.config import load_config
    from mydistill.pipeline.plan import make_plan

    cfg = load_config("demo", ["registry.enabled=false", "registry.min_category_retained=0.7"])
    report = {
        "gate_metric": "exact", "confidence": 0.95,
        "models": {"student": {"exact_match": 0.5, "teacher_retained": 0.9, "teacher_retained_low": 0.85}},
        "by_category": {"reverse": {"count": 100, "student": {"teacher_retained": 1.0}},
                        "sort": {"count": 100, "student": {"teacher_retained": 0.3}}},
    }
    decision = stage_functions.register(cfg, make_plan(cfg), report)
    assert not decision["passed"] and decision["failed_categories"] == ["sort"] and not decision["registered"]
