import json

import pytest

from mydistill import io
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
        {"teacher": tiny_model_dir, "student": tiny_model_dir}, eval_data, out, max_new_tokens=4, num_samples=3
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
