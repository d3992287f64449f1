import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def cli(*args):
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, cwd=REPO)


def test_validate_prints_the_full_config():
    out = cli("validate", "demo", "distill.steps=7")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["distill"]["steps"] == 7


def test_bad_value_exits_2_with_one_clear_message():
    out = cli("validate", "demo", "mix.teacher_fraction=1.5", "distill.loss.temperature=0")
    assert out.returncode == 2
    text = " ".join(out.stdout.split())
    assert "mix.teacher_fraction: Input should be less than or equal to 1 (got 1.5)" in text
    assert "distill.loss.temperature: Input should be greater than 0 (got 0)" in text
    assert "Traceback" not in out.stdout + out.stderr


def test_plan_lists_every_stage(tmp_path):
    out = cli("plan", "demo", f"work_dir={tmp_path}")
    assert out.returncode == 0, out.stderr
    for stage in ("generate", "mix", "distill", "finetune", "baseline", "evaluate"):
        assert stage in out.stdout
