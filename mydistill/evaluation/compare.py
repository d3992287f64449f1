"""Students from separate runs side by side, on the same eval questions and the same teacher.

Each run's evaluation report (``metrics.json``) holds its student's per-question gate-metric
scores and the teacher's. Two students evaluated on the same questions are compared as the gate
compares a student with the champion: their paired difference with a bootstrap interval over the
questions, beside each one's score, the share of the teacher's score it keeps and that share per
category (all with their intervals, as the reports give them). The SmolLM2 example uses it to set
the cut chosen by measurement (``student.init.layers: auto``) beside the hand-chosen one.

    python -m mydistill.evaluation.compare measured=runs/x/evaluate-… hand=runs/y/evaluate-…
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any

from mydistill import io
from mydistill.evaluation import uncertainty
from mydistill.evaluation.evaluate import METRICS_FILE
from mydistill.evaluation.report import with_interval


def compare_students(reports: Mapping[str, dict[str, Any]], *, student: str = "student", teacher: str = "teacher") -> dict[str, Any]:
    """``reports``: a name per evaluation report. Returns each student's row (its gate-metric score,
    ``teacher_retained`` and per-category retention, with intervals, from its report) and the paired
    difference of every pair in the given order, ``"<a>_vs_<b>"``, at the reports' confidence.

    Refuses reports that are not on the same questions, gate metric and teacher answers: their
    difference would not be paired."""
    if len(reports) < 2:
        raise ValueError(f"compare at least two students (got {len(reports)})")
    names = list(reports)
    first = reports[names[0]]
    scores: dict[str, list[float]] = {}
    rows: dict[str, dict[str, Any]] = {}
    for name in names:
        report = reports[name]
        q = report.get("question_scores")
        if not q or student not in q.get("models", {}):
            raise ValueError(f"{name}: the report has no per-question scores of the {student!r} model")
        for what in ("metric", "ids"):
            if q[what] != first["question_scores"][what]:
                raise ValueError(f"{name}: another {'gate metric' if what == 'metric' else 'eval set'} than {names[0]}'s; "
                                 "compare students evaluated on the same questions with the same gate metric")
        if q["models"].get(teacher) != first["question_scores"]["models"].get(teacher):
            raise ValueError(f"{name}: the teacher's answers score differently than in {names[0]}'s report (another "
                             "teacher or evaluate settings); the difference would not be paired")
        scores[name] = q["models"][student]
        m = report["models"][student]
        rows[name] = {
            "score": m[q["metric"]], "low": m.get(f"{q['metric']}_low"), "high": m.get(f"{q['metric']}_high"),
            **{k: m.get(k) for k in ("teacher_retained", "teacher_retained_low", "teacher_retained_high", "parameters")},
            "by_category": {
                category: {k: cell[student].get(k) for k in ("teacher_retained", "teacher_retained_low", "teacher_retained_high")}
                for category, cell in report.get("by_category", {}).items() if student in cell
            },
        }
    confidence = float(first.get("confidence", 0.95))
    differences = {}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            d = uncertainty.difference_interval(scores[a], scores[b], confidence)
            differences[f"{a}_vs_{b}"] = {"difference": d.value, "low": d.low, "high": d.high}
    return {"metric": first["question_scores"]["metric"], "num_examples": len(scores[names[0]]), "confidence": confidence,
            "students": rows, "differences": differences}


def comparison_lines(result: dict[str, Any]) -> list[str]:
    """The comparison as lines of text: one per student, one per paired difference."""
    metric, n, level = result["metric"], result["num_examples"], f"{result['confidence']:.0%}"
    lines = []
    for name, row in result["students"].items():
        categories = ", ".join(f"{c} {with_interval(cell, 'teacher_retained')}" for c, cell in row["by_category"].items())
        lines.append(
            f"{name}: {metric} {with_interval({'v': row['score'], 'v_low': row['low'], 'v_high': row['high']}, 'v')}, "
            f"keeps {with_interval(row, 'teacher_retained')} of the teacher's ({level} paired intervals, n={n})"
            + (f"; per category: {categories}" if categories else "")
        )
    for name, d in result["differences"].items():
        first, _, second = name.partition("_vs_")
        verdict = "more than noise" if d["low"] > 0 or d["high"] < 0 else "within the noise"
        lines.append(f"{first} − {second} on the same {n} questions: {d['difference'] * 100:+.1f} points "
                     f"({level} paired interval {d['low'] * 100:+.1f} to {d['high'] * 100:+.1f}: {verdict})")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2 or any("=" not in a for a in args):
        print("usage: python -m mydistill.evaluation.compare NAME=EVALUATE_DIR NAME=EVALUATE_DIR [...]", file=sys.stderr)
        return 2
    reports = {}
    for arg in args:
        name, _, uri = arg.partition("=")
        path = io.join(uri, METRICS_FILE)
        if not io.exists(path):
            print(f"error: {path} not found: give the folder of a finished evaluate stage (runs/…/evaluate-…)", file=sys.stderr)
            return 2
        reports[name] = io.read_json(path)
    try:
        result = compare_students(reports)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(comparison_lines(result)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
