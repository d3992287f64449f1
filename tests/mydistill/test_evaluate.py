import json

import pytest

from mydistill import io
from mydistill.config import EvaluateConfig
from mydistill.evaluation.evaluate import evaluate_models
from mydistill.evaluation.scoring import normalise_answer


@pytest.fixture
def eval_data(tmp_path):
    from mydistill.demo.task import make_examples

    uri = str(tmp_path / "eval.jsonl")
    io.write_records(uri, make_examples(12, seed=9))
    return uri


def test_report_scores_every_model_and_compares_with_the_teacher(tmp_path, eval_data, tiny_model_dir):
    out = str(tmp_path / "eval-out")
    report = evaluate_models(
        {"teacher": tiny_model_dir, "student": tiny_model_dir}, eval_data, out, EvaluateConfig(max_new_tokens=4, num_samples=3)
    )
    teacher, student = report["models"]["teacher"], report["models"]["student"]
    # the same weights: no divergence, full agreement, identical scores
    assert student["kl_to_teacher"] == pytest.approx(0.0, abs=1e-6)
    assert student["top1_agreement"] == 1.0
    assert student["exact_match"] == teacher["exact_match"]
    assert student["perplexity"] == pytest.approx(teacher["perplexity"])
    assert student["parameters_vs_teacher"] == 1.0
    assert len(report["samples"]) == 3
    assert json.loads(open(f"{out}/metrics.json").read()) == report
    assert len(io.read_records(f"{out}/samples.jsonl")) == 12
    assert open(f"{out}/comparison.png", "rb").read(4) == b"\x89PNG"


def test_eval_data_without_answers_is_refused(tmp_path, tiny_model_dir):
    uri = str(tmp_path / "eval.jsonl")
    io.write_records(uri, [{"prompt": "reverse: ab"}])
    with pytest.raises(io.DataError, match="record 1 has no 'answer' field"):
        evaluate_models({"student": tiny_model_dir}, uri, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_answers_are_compared_after_whitespace_normalisation():
    assert normalise_answer("  ab  c\n") == "ab c"


def test_every_score_has_its_interval_and_a_collapsed_category_shows(tmp_path, tiny_model_dir, monkeypatch):
    """Answers are fixed (generation replaced) so the numbers are known: the teacher gets all 40 right;
    the student every `reverse` and no `sort` (50% overall, 0% of the teacher's sort); the baseline none."""
    from mydistill.evaluation import evaluate
    from mydistill.demo.task import make_examples

    rows = [{**e, "category": e["prompt"].split(":")[0]} for e in make_examples(40, seed=9)]
    uri = str(tmp_path / "eval.jsonl")
    io.write_records(uri, rows)

    def answers(model, tokenizer, prompts, *, label, **_):
        right = {"teacher": lambda r: True, "student": lambda r: r["category"] == "reverse", "baseline": lambda r: False}[label]
        return [r["answer"] if right(r) else "?" for r in rows]

    monkeypatch.setattr(evaluate.scoring, "generate_answers", answers)
    out = str(tmp_path / "out")
    models = {"teacher": tiny_model_dir, "student": tiny_model_dir, "baseline": tiny_model_dir}
    report = evaluate_models(models, uri, out, EvaluateConfig(max_new_tokens=4, metrics=["exact"]), gate_metric="exact")

    student = report["models"]["student"]
    reverse = sum(r["category"] == "reverse" for r in rows)
    assert student["exact_match"] == reverse / 40
    # Wilson around the student's rate; the teacher's 40/40 still has room below 1
    assert student["exact_match_low"] < student["exact_match"] < student["exact_match_high"]
    assert report["models"]["teacher"]["exact_match_high"] == 1.0 and report["models"]["teacher"]["exact_match_low"] < 0.92
    assert student["teacher_retained_low"] < student["teacher_retained"] == reverse / 40 < student["teacher_retained_high"]
    by = report["by_category"]
    assert by["sort"]["student"]["teacher_retained"] == 0.0 and by["reverse"]["student"]["teacher_retained"] == 1.0
    assert by["reverse"]["student"]["teacher_retained_low"] == 1.0  # all the teacher's, on every resample
    gain = report["comparisons"]["student_vs_baseline"]
    assert gain["difference"] == reverse / 40 and 0 < gain["low"] < gain["difference"] < gain["high"]
    assert report["question_scores"]["models"]["student"] == [float(r["category"] == "reverse") for r in rows]
    assert len(set(report["question_scores"]["ids"])) == 40
    assert open(f"{out}/category_retention.png", "rb").read(4) == b"\x89PNG"
    lines = evaluate.category_lines(report)
    assert any(line.startswith("sort (") and "keeps 0.0% (0.0–0.0)" in line for line in lines)
    assert "more than noise" in evaluate.comparison_lines(report)[0]
    columns, table = evaluate.summary_table(report)
    assert f"{reverse / 40:.1%} (" in table[1][1]


def test_a_model_answers_once_per_eval_set_across_runs_with_an_answer_cache(tmp_path, eval_data, tiny_model_dir, demo_tokenizer, monkeypatch):
    """The teacher of run after run on the same questions: generated once, read back the next time;
    another model, answer length or precision generates again."""
    from mydistill.evaluation import evaluate
    from tests.conftest import save_tiny_model

    generated = []
    real = evaluate.scoring.generate_answers

    def counting(model, tokenizer, prompts, *, label, **kw):
        generated.append(label)
        return real(model, tokenizer, prompts, label=label, **kw)

    monkeypatch.setattr(evaluate.scoring, "generate_answers", counting)
    other = save_tiny_model(tmp_path / "other", demo_tokenizer, seed=5)
    cache, cfg = str(tmp_path / "answer-cache"), EvaluateConfig(max_new_tokens=4)
    first = evaluate_models({"teacher": tiny_model_dir, "student": other}, eval_data, str(tmp_path / "a"), cfg, answer_cache_uri=cache)
    assert generated == ["teacher", "student"]
    again = evaluate_models({"teacher": tiny_model_dir, "student": other}, eval_data, str(tmp_path / "b"), cfg,
                            answer_cache_uri=cache, confidence=0.9)  # another report, the same answers
    assert generated == ["teacher", "student"]
    assert again["samples"] == first["samples"] and again["models"]["student"]["exact_match"] == first["models"]["student"]["exact_match"]
    evaluate_models({"teacher": tiny_model_dir, "student": other}, eval_data, str(tmp_path / "c"), EvaluateConfig(max_new_tokens=3),
                    answer_cache_uri=cache)
    evaluate_models({"teacher": tiny_model_dir, "student": other}, eval_data, str(tmp_path / "d"), cfg, answer_cache_uri=cache,
                    dtypes={"teacher": "bfloat16"})
    assert generated == ["teacher", "student", "teacher", "student", "teacher"]
