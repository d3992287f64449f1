"""A student with its own tokenizer goes through distill (ULD or sequence), evaluate and register.

Evaluate must feed each model its own token ids: KL / top-1 agreement only where the vocabulary is
the teacher's, text-level agreement with the teacher's answers otherwise.
"""

from __future__ import annotations

import pytest

from mydistill import stage_functions
from mydistill.config import EvaluateConfig, load_config
from mydistill.evaluation.evaluate import evaluate_models
from mydistill.pipeline.plan import make_plan
from tests.conftest import save_tiny_model
from tests.mydistill.training.test_cross_tokenizer import merged_tokenizer

SHRUNKEN = [
    "demo.num_real=40", "demo.num_prompts=60", "demo.num_eval=12",
    "demo.teacher_arch.hidden_size=32", "demo.teacher_arch.num_hidden_layers=1",
    "demo.teacher_arch.num_attention_heads=2", "demo.teacher_arch.intermediate_size=64",
    "demo.teacher_train_examples=1000", "demo.teacher_steps=80",
    "generate.max_new_tokens=8", "distill.steps=3", "distill.batch_size=8", "distill.warmup_steps=1",
    "finetune.enabled=false", "evaluate.max_new_tokens=6", "evaluate.metrics=[exact, contains, rouge_l]",
    "registry.gate_metric=rouge_l", "registry.min_teacher_retained=0.0",
]


@pytest.fixture(scope="module")
def other_student(tmp_path_factory):
    """A tiny student with a second, merged BPE tokenizer (its own ids and vocabulary size)."""
    return save_tiny_model(tmp_path_factory.mktemp("other-student"), merged_tokenizer(), seed=5)


def test_evaluate_compares_models_with_other_tokenizers_by_text(tmp_path, tiny_model_dir, other_student):
    from mydistill import io
    from mydistill.demo.task import make_examples

    eval_uri = str(tmp_path / "eval.jsonl")
    io.write_records(eval_uri, [{**e, "category": e["prompt"].split(":")[0]} for e in make_examples(10, seed=3)])
    report = evaluate_models(
        {"teacher": tiny_model_dir, "student": other_student, "baseline": tiny_model_dir}, eval_uri, str(tmp_path / "out"),
        EvaluateConfig(metrics=["exact", "contains", "rouge_l"], max_new_tokens=4), gate_metric="rouge_l",
    )
    student, baseline = report["models"]["student"], report["models"]["baseline"]
    assert "kl_to_teacher" not in student and "top1_agreement" not in student
    assert "text_agreement" in student and "differs" in student["tokenizer"]
    assert student["perplexity"] > 1.0  # scored on its own tokenization
    assert baseline["kl_to_teacher"] == pytest.approx(0.0, abs=1e-6) and baseline["text_agreement"] == pytest.approx(1.0)
    assert set(report["by_category"]) == {"reverse", "sort"} or set(report["by_category"]) <= {"reverse", "sort"}
    assert {"exact_match", "contains", "rouge_l"} <= set(student)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["uld", "sequence"])
def test_a_cross_tokenizer_run_completes_through_evaluate_and_register(tmp_path, other_student, method):
    cfg = load_config("demo", [
        f"work_dir={tmp_path}/runs", f"demo.cache_dir={tmp_path}/cache", *SHRUNKEN,
        f"student.init_uri={other_student}", f"distill.cross_tokenizer.method={method}",
    ])
    stage_functions.prepare_demo(cfg, make_plan(cfg))
    plan = make_plan(cfg)  # made again now that the demo teacher exists: its fingerprint is in the plan
    stage_functions.generate(cfg, plan)
    stage_functions.mix(cfg, plan)
    stage_functions.train(cfg, plan, "distill")
    stage_functions.train(cfg, plan, "baseline")
    report = stage_functions.evaluate(cfg, plan)
    student = report["models"]["student"]
    assert "kl_to_teacher" not in student and 0.0 <= student["text_agreement"] <= 1.0
    decision = stage_functions.register(cfg, plan, report)
    assert decision["metric"] == "rouge_l" and decision["registered"] is False
    assert decision["teacher_retained"] is None or decision["teacher_retained"] >= 0.0
