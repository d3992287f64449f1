import json
import subprocess
import sys
from pathlib import Path

import pytest

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
    for name in ("inputs", "prompts", "teacher", "fingerprint", "runs"):  # fingerprints, and what would run
        assert name in out.stdout


def test_a_run_that_prefect_loses_track_of_is_run_once_more_and_reported(monkeypatch):
    """Under load the ephemeral API has failed a finished run (ObjectNotFound): the CLI runs the flow
    again (its stages answer from their artifacts) and reports the outcome, instead of failing."""
    from prefect.exceptions import ObjectNotFound
    from typer.testing import CliRunner

    import flows.cli as cli
    import flows.pipeline_flow as pipeline_flow
    import mydistill.pipeline.preflight as preflight

    calls = []
    result = {
        "report": {"models": {"teacher": {"exact_match": 1.0, "perplexity": 1.1, "parameters": 10}}},
        "decision": {"passed": True, "reason": "ok", "registered": False},
        "plan": {"finetune_uri": "runs/finetune-x", "distill_uri": "runs/distill-x"}, "mlflow_run_id": "r1",
    }

    def flaky(config):
        calls.append(config)
        if len(calls) == 1:
            raise ObjectNotFound(http_exc=Exception("flow run not found"))
        return result

    monkeypatch.setattr(pipeline_flow, "distill_pipeline", flaky)
    monkeypatch.setattr(preflight, "require_preflight", lambda cfg: None)
    out = CliRunner().invoke(cli.app, ["run", "demo-tiny"])
    assert out.exit_code == 0, out.output
    assert len(calls) == 2 and "Prefect's API lost track of the run" in out.output
    assert "quality gate" in out.output


def test_summary_shows_the_chosen_metrics_and_says_when_retention_is_undefined(monkeypatch):
    from rich.console import Console

    from flows import cli

    console = Console(record=True, width=250)
    monkeypatch.setattr(cli, "console", console)
    why = "the teacher scores 0 on contains, so the share of its score a student keeps is undefined"
    report = {
        "metrics": ["exact_match", "contains"], "gate_metric": "contains", "retained_undefined": why,
        "models": {
            "teacher": {"exact_match": 0.0, "contains": 0.0, "perplexity": 2.0, "parameters": 100},
            "student": {"exact_match": 0.0, "contains": 0.25, "perplexity": 3.0, "parameters": 40, "teacher_retained": None},
        },
    }
    decision = {"passed": False, "reason": f"% of teacher retained is undefined: {why}"}
    cli.print_summary({"report": report, "decision": decision, "plan": {"finetune_uri": None, "distill_uri": "d"},
                       "mlflow_run_id": "r"}, 1.0)
    text = console.export_text()
    assert "% of teacher (contains)" in text and "contains" in text and "undefined" in text
    assert "0.0%" not in text.split("student")[1].split("\n")[0].split("25.0%")[1]  # no 0.0% retained
    assert "quality gate not passed: % of teacher retained is undefined" in text


@pytest.mark.slow
def test_a_pipeline_run_prints_no_library_warnings_or_progress_bars(tmp_path):
    """What a newcomer sees from `mydistill run`: the stage lines and the summary, not library noise
    (MLflow's dataset and schema warnings, transformers' per-load progress bars)."""
    import os
    import re

    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db", "PREFECT_HOME": str(tmp_path / "prefect")}
    for key in ("PYTHONWARNINGS", "HF_HUB_DISABLE_PROGRESS_BARS"):
        env.pop(key, None)
    out = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", "demo-tiny", f"work_dir={tmp_path}/runs", f"demo.cache_dir={tmp_path}/cache"],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=600,
    )
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    assert "pipeline finished" in text and "registered mydistill-demo-tiny-student" in text
    noise = [line for line in text.splitlines() if re.search(r"Warning\b|WARNING|Loading weights|Writing model shards", line)]
    assert noise == [], "\n".join(noise[:20])


def test_the_summary_links_the_run_in_mlflows_model_training_view(monkeypatch):
    from rich.console import Console

    from flows import cli

    console = Console(record=True, width=250)
    monkeypatch.setattr(cli, "console", console)
    report = {"models": {"teacher": {"exact_match": 0.5, "perplexity": 2.0, "parameters": 100}}}
    url = "http://127.0.0.1:5000/#/experiments/1/runs/r?workflowType=machine_learning"
    cli.print_summary({"report": report, "decision": {"passed": True, "reason": "ok"}, "plan": {"finetune_uri": "f"},
                       "mlflow_run_id": "r", "mlflow_run_url": url}, 1.0)
    assert f"MLflow run: {url}" in console.export_text()
