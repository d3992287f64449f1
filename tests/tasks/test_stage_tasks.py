"""The Prefect task layer's own logic: what people read in the Prefect UI, and credentials."""

from __future__ import annotations

import logging
import os

import pytest

from tasks import stage_tasks as t

REPORT = {
    "models": {
        "teacher": {"exact_match": 0.9, "perplexity": 1.5, "parameters": 1_120_000},
        "student": {"exact_match": 0.81, "perplexity": 1.9, "parameters": 150_000, "teacher_retained": 0.9,
                    "kl_to_teacher": 0.12, "top1_agreement": 0.95},
    }
}


def test_report_markdown_links_to_the_mlflow_run_on_a_server():
    md = t.report_markdown(REPORT, {
        "run_id": "abc123", "experiment_id": "7", "url": "http://127.0.0.1:5000/#/experiments/7/runs/abc123",
        "tracking_uri": "http://127.0.0.1:5000",
    })
    assert "| student | 81.0% | 90.0% | 1.900 | 0.120 | 95.0% | — | — | — | 150,000 |" in md
    assert "[run abc123](http://127.0.0.1:5000/#/experiments/7/runs/abc123) (experiment 7)" in md


def test_report_markdown_names_the_run_in_a_local_store():
    md = t.report_markdown(REPORT, {"run_id": "abc123", "experiment_id": "7", "url": None, "tracking_uri": "sqlite:///x.db"})
    assert "run `abc123` in `sqlite:///x.db`" in md and "](" not in md
    assert "MLflow" not in t.report_markdown(REPORT)


def test_report_markdown_shows_the_chosen_metrics_categories_and_undefined_retention():
    report = {
        "metrics": ["contains", "rouge_l"], "gate_metric": "contains",
        "retained_undefined": "the teacher scores 0 on contains, so the share of its score a student keeps is undefined",
        "models": {
            "teacher": {"contains": 0.0, "rouge_l": 0.2, "perplexity": 3.0, "parameters": 10},
            "student": {"contains": 0.5, "rouge_l": 0.25, "perplexity": 4.0, "parameters": 5, "teacher_retained": None,
                        "text_agreement": 0.4, "calibration_ece": 0.1, "length_vs_teacher": 1.5},
        },
        "by_category": {"capital": {"count": 2, "teacher": {"contains": 0.0}, "student": {"contains": 0.5}}},
    }
    md = t.report_markdown(report)
    assert md.splitlines()[0].startswith("| model | contains | rouge_l | % of teacher (contains) |")
    assert "| student | 50.0% | 25.0% | undefined | 4.000 | — | — | 40.0% | 0.100 | 1.50 | 5 |" in md
    assert "**% of teacher retained is undefined:** the teacher scores 0 on contains" in md
    assert "- *capital* (2 questions, contains): teacher 0.0%; student 50.0%" in md


def test_decision_markdown():
    decision = {"passed": False, "reason": "does not beat champion v2 (0.800 ≤ 0.810)", "model_name": "m",
                "version": "3", "alias": None, "version_url": "http://h/#/models/m/versions/3"}
    md = t.decision_markdown(decision)
    assert md.startswith("**Quality gate failed**: does not beat champion v2")
    assert "[m v3](http://h/#/models/m/versions/3); alias left where it was." in md


class _FakeSecret:
    def __init__(self, value):
        self.value = value

    def get(self):
        return self.value


@pytest.fixture
def secret_block(monkeypatch, caplog):
    """``Secret.load`` answering from a dict of blocks; logs to caplog instead of a Prefect run."""
    from prefect.blocks.system import Secret

    blocks: dict[str, object] = {}

    def load(name, *args, **kwargs):
        if name not in blocks:
            raise ValueError(f"Unable to find block document named {name} for block type secret")
        return _FakeSecret(blocks[name])

    monkeypatch.setattr(Secret, "load", load)
    monkeypatch.setattr(t, "get_run_logger", lambda: logging.getLogger("test-credentials"))
    monkeypatch.delenv(t.CREDENTIALS_BLOCK_ENV, raising=False)
    caplog.set_level(logging.INFO, "test-credentials")
    return blocks


def test_credentials_from_a_block_go_into_the_environment_and_only_their_names_into_logs(secret_block, monkeypatch, caplog):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "from-the-worker")  # restored afterwards
    monkeypatch.setenv("MYDISTILL_TEST_KEY_ID", "x")
    secret_block["mydistill-credentials"] = {"AWS_SECRET_ACCESS_KEY": "sekrit-value", "MYDISTILL_TEST_KEY_ID": "id-value"}
    assert t.load_credentials.fn() == ["AWS_SECRET_ACCESS_KEY", "MYDISTILL_TEST_KEY_ID"]
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == "sekrit-value"  # the block wins over the worker's environment
    assert "AWS_SECRET_ACCESS_KEY, MYDISTILL_TEST_KEY_ID" in caplog.text
    assert "sekrit-value" not in caplog.text and "id-value" not in caplog.text


def test_no_block_leaves_the_environment_as_it_is(secret_block, monkeypatch, caplog):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "from-the-worker")
    assert t.load_credentials.fn() == []
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == "from-the-worker"
    assert "credentials come from the worker's environment" in caplog.text


def test_the_block_name_comes_from_the_environment_and_empty_turns_it_off(secret_block, monkeypatch):
    secret_block["team-s3"] = {"MYDISTILL_TEST_OTHER": "1"}
    monkeypatch.setenv("MYDISTILL_TEST_OTHER", "0")
    monkeypatch.setenv(t.CREDENTIALS_BLOCK_ENV, "team-s3")
    assert t.load_credentials.fn() == ["MYDISTILL_TEST_OTHER"]
    monkeypatch.setenv(t.CREDENTIALS_BLOCK_ENV, "")
    assert t.load_credentials.fn() == []


@pytest.mark.parametrize("value", ["just-a-string", ["AWS_ACCESS_KEY_ID"], {"not a name": "x"}, {"lower_case": "x"}])
def test_a_block_that_is_not_a_mapping_of_variables_is_refused(secret_block, value):
    secret_block["mydistill-credentials"] = value
    with pytest.raises(ValueError, match="must hold a JSON object of environment variables"):
        t.load_credentials.fn()


class _FailedState:
    def __init__(self, error):
        self.error = error

    def result(self):
        raise self.error


@pytest.mark.parametrize(("error", "retried"), [
    (ConnectionResetError("reset by peer"), True),
    (TimeoutError("timed out"), True),
    (OSError("network is unreachable"), True),
    (__import__("httpx").ReadTimeout("slow"), True),
    (__import__("mydistill.io", fromlist=["DataError"]).DataError("eval.jsonl:7: malformed JSON line"), False),
    (__import__("mydistill.config", fromlist=["ConfigError"]).ConfigError("bad field"), False),
    (__import__("mydistill.generation.openai_api", fromlist=["APIError"]).APIError("HTTP 401"), False),
    (FileNotFoundError("no such file"), False),
    (ValueError("wrong value"), False),
    (TypeError("a bug"), False),
])
def test_only_errors_a_retry_can_fix_are_retried(error, retried):
    assert t._transient(None, None, _FailedState(error)) is retried


def test_a_stage_handed_an_artifact_it_does_not_read_says_which(tmp_path):
    from mydistill.config import load_config
    from mydistill.pipeline.plan import make_plan
    from tasks.stage_tasks import check_reads

    plan = make_plan(load_config("demo", [f"work_dir={tmp_path}/runs", f"demo.cache_dir={tmp_path}/cache"]))
    check_reads(plan, "finetune", (plan.distill_uri, plan.mix_uri))
    check_reads(plan, "baseline", ())
    with pytest.raises(ValueError, match=r"finetune was handed \[.*generate-.*\], which it does not read; it reads \['distill', 'mix'\]"):
        check_reads(plan, "finetune", (plan.generate_uri,))
