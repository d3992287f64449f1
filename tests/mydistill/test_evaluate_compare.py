"""Students from separate runs compared on the same questions (mydistill.evaluation.compare)."""

from __future__ import annotations

import json

import pytest

from mydistill.evaluation.compare import compare_students, comparison_lines, main


def _report(student: list[float], teacher: list[float], ids: list[str] | None = None) -> dict:
    """The parts of an evaluation report the comparison reads, as evaluate_models writes them."""
    n = len(student)
    share = sum(student) / sum(teacher)
    return {
        "confidence": 0.95, "num_examples": n,
        "question_scores": {"metric": "contains", "ids": ids or [f"q{i}" for i in range(n)],
                            "models": {"teacher": teacher, "student": student}},
        "models": {"teacher": {"contains": sum(teacher) / n},
                   "student": {"contains": sum(student) / n, "contains_low": 0.0, "contains_high": 1.0,
                               "teacher_retained": share, "teacher_retained_low": share / 2, "teacher_retained_high": 1.0}},
        "by_category": {"sums": {"count": n, "student": {"teacher_retained": share, "teacher_retained_low": 0.1,
                                                         "teacher_retained_high": 0.9}}},
    }


def test_two_students_are_compared_paired_on_the_same_questions():
    teacher = [1.0] * 40
    clear = compare_students({"measured": _report([1.0] * 30 + [0.0] * 10, teacher),
                              "hand": _report([1.0] * 10 + [0.0] * 30, teacher)})
    d = clear["differences"]["measured_vs_hand"]
    assert d["difference"] == pytest.approx(0.5) and d["low"] > 0  # 20 more questions right of 40: not noise
    assert clear["students"]["hand"]["teacher_retained"] == pytest.approx(0.25)
    assert clear["students"]["measured"]["by_category"]["sums"]["teacher_retained"] == pytest.approx(0.75)
    lines = comparison_lines(clear)
    assert lines[-1].startswith("measured − hand on the same 40 questions: +50.0 points") and "more than noise" in lines[-1]
    # one question apart: within the noise
    close = compare_students({"a": _report([1.0] * 21 + [0.0] * 19, teacher), "b": _report([1.0] * 20 + [0.0] * 20, teacher)})
    c = close["differences"]["a_vs_b"]
    assert c["low"] <= 0 <= c["high"] and "within the noise" in comparison_lines(close)[-1]


def test_reports_that_are_not_paired_are_refused(tmp_path, capsys):
    teacher = [1.0, 0.0, 1.0, 1.0]
    base = _report([1.0, 0.0, 0.0, 1.0], teacher)
    with pytest.raises(ValueError, match="another eval set"):
        compare_students({"a": base, "b": _report([1.0, 0.0, 0.0, 1.0], teacher, ids=["x", "y", "z", "w"])})
    with pytest.raises(ValueError, match="the teacher's answers score differently"):
        compare_students({"a": base, "b": _report([1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0])})
    with pytest.raises(ValueError, match="at least two"):
        compare_students({"a": base})
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "metrics.json").write_text(json.dumps(base))
    assert main([f"a={tmp_path / 'a'}", f"b={tmp_path / 'missing'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing/metrics.json not found" in err[0]
    assert main([f"a={tmp_path / 'a'}", f"b={tmp_path / 'a'}"]) == 0
    assert "a − b on the same 4 questions: +0.0 points" in capsys.readouterr().out
