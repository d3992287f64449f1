"""MLflow tracking helpers, links for people, and the model registry's quality gate (sqlite store)."""

from __future__ import annotations

import contextlib
import json
import uuid
from pathlib import Path

import pytest

from mydistill import io, stage_functions, tracking
from mydistill.config import load_config
from mydistill.pipeline.plan import make_plan

from tests.conftest import save_tiny_model


@pytest.fixture(autouse=True)
def _configured(monkeypatch):
    monkeypatch.delenv(tracking.UI_URL_ENV, raising=False)
    tracking.configure()  # the test session's sqlite store (tests/conftest.py)


# ----------------------------------------------------------------------------------------------
# params and links


def test_secret_looking_params_are_masked_by_whole_words():
    params = {
        "generate.api_key": "sk-123", "hub.hf_token": "hf_abc", "s3.secret_access_key": "xyz", "db.password": "pw",
        "generate.api_key_env": "OPENAI_API_KEY", "evaluate.max_new_tokens": 16,
        "generate.api_max_tokens_param": "max_tokens", "teacher.tokenizer_uri": "s3://b/t", "generate.api_key2": None,
    }
    masked = tracking.mask_secrets(params)
    assert {k for k, v in masked.items() if v == tracking.MASK} == {
        "generate.api_key", "hub.hf_token", "s3.secret_access_key", "db.password",
    }
    assert masked["evaluate.max_new_tokens"] == 16 and masked["generate.api_key_env"] == "OPENAI_API_KEY"


def test_display_uri_hides_a_password():
    assert tracking.display_uri("https://alice:hunter2@mlflow.example:8443/x") == "https://alice:***@mlflow.example:8443/x"
    assert tracking.display_uri("sqlite:////tmp/mlflow.db") == "sqlite:////tmp/mlflow.db"


def test_run_reference_links_to_the_ui_only_with_a_server(monkeypatch):
    run_id = tracking.start_run("tracking-test", "links")
    ref = tracking.run_reference(run_id)
    assert ref["run_id"] == run_id and ref["url"] is None and ref["tracking_uri"].startswith("sqlite:")
    assert tracking.model_version_url("m", "3") is None

    monkeypatch.setenv(tracking.UI_URL_ENV, "https://mlflow.example/")
    ref = tracking.run_reference(run_id)
    # the link opens MLflow's model training view (3.17 shows the GenAI one unless the page asks)
    assert ref["url"] == f"https://mlflow.example/#/experiments/{ref['experiment_id']}/runs/{run_id}?workflowType=machine_learning"
    assert tracking.model_version_url("my model", "3") == "https://mlflow.example/#/models/my%20model/versions/3?workflowType=machine_learning"


def test_ui_base_url_of_a_tracking_server_drops_credentials(monkeypatch):
    import mlflow

    monkeypatch.setattr(mlflow, "get_tracking_uri", lambda: "http://bob:pw@127.0.0.1:5000/")
    assert tracking.ui_base_url() == "http://127.0.0.1:5000"


def test_new_experiments_open_as_model_training_in_the_ui():
    name = f"kind-{uuid.uuid4().hex[:6]}"
    experiment = tracking.client().get_experiment(tracking.experiment_id(name))
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


# ----------------------------------------------------------------------------------------------
# the quality gate


@pytest.mark.parametrize(
    ("score", "retained", "champion", "passed", "reason"),
    [
        (0.9, 0.95, None, True, "keeps 95.0% of the teacher's exact match (at least the gate's 80%); no champion yet"),
        (0.5, 0.60, None, False, "keeps 60.0% of the teacher's exact match (below the gate's 80%)"),
        (0.9, 0.95, {"version": "2", "score": 0.8}, True, "beats champion v2 (0.900 > 0.800)"),
        (0.8, 0.95, {"version": "2", "score": 0.8}, False, "does not beat champion v2 (0.800 ≤ 0.800)"),
        (0.9, 0.95, {"version": "2", "score": None}, True, "champion v2 has no recorded score to beat"),
        (0.9, None, None, False, "no teacher score to compare with"),
        (0.9, 0.95, {"version": "2", "score": 0.95, "metric": "contains"}, True, "scored on contains, not exact: not compared"),
    ],
)
def test_quality_gate(score, retained, champion, passed, reason):
    decision = stage_functions.quality_gate(score, retained, min_teacher_retained=0.8, champion=champion)
    assert decision["passed"] is passed
    assert reason in decision["reason"]


def test_a_teacher_scoring_zero_makes_retention_undefined_and_fails_the_gate():
    from mydistill.evaluation.evaluate import retention

    assert retention(0.4, 0.8, "contains") == (0.5, None)
    retained, why = retention(0.4, 0.0, "contains")
    assert retained is None and "teacher scores 0 on contains" in why and "undefined" in why
    decision = stage_functions.quality_gate(0.4, None, min_teacher_retained=0.8, champion=None, metric="contains",
                                            retained_undefined=why)
    assert not decision["passed"]
    assert decision["reason"].startswith("% of teacher retained is undefined: the teacher scores 0 on contains")


def test_the_gate_uses_the_configured_metric():
    from mydistill.config import load_config
    from mydistill.pipeline.plan import make_plan

    cfg = load_config("demo", ["evaluate.metrics=[exact, contains]", "registry.gate_metric=contains", "registry.enabled=false"])
    report = {"gate_metric": "contains", "models": {"student": {"exact_match": 0.0, "contains": 0.9, "teacher_retained": 0.9}}}
    decision = stage_functions.register(cfg, make_plan(cfg), report)
    assert decision["passed"] and decision["score"] == 0.9 and decision["metric"] == "contains"
    assert "90.0% of the teacher's contains" in decision["reason"]


def test_beating_the_champion_can_be_switched_off():
    decision = stage_functions.quality_gate(0.1, 0.9, min_teacher_retained=0.8, champion={"version": "1", "score": 0.9}, beat_champion=False)
    assert decision["passed"] and "champion" not in decision["reason"]


# ----------------------------------------------------------------------------------------------
# registering: the alias moves only to a version that passes


@pytest.fixture
def registry(tmp_path, demo_tokenizer):
    """Register students with given scores under a fresh model name; returns ``register(score, retained)``."""
    name = f"gate-test-{uuid.uuid4().hex[:6]}"
    cfg = load_config("demo", [f"work_dir={tmp_path}", f"registry.model_name={name}", "tracking.experiment=registry-test"])
    plan = make_plan(cfg)
    student = tmp_path / plan.student_uri.rsplit("/", 1)[-1]
    save_tiny_model(student, demo_tokenizer, seed=0)

    def register(score: float, retained: float | None = 1.0, questions: list[float] | None = None) -> tuple[dict, str]:
        parent = tracking.start_run(cfg.tracking.experiment, "pipeline")
        report = {"models": {"student": {"exact_match": score, **({"teacher_retained": retained} if retained is not None else {})}}}
        if questions is not None:  # per-question scores, as evaluate_models reports them
            report["question_scores"] = {"metric": "exact_match", "ids": [f"q{i}" for i in range(len(questions))],
                                         "models": {"student": questions}}
        return stage_functions.register(cfg, plan, report, parent), name

    register.student_dir = student
    return register


def _champion(name: str) -> str:
    return str(tracking.client().get_model_version_by_alias(name, "champion").version)


def test_alias_moves_only_to_a_student_that_passes_and_beats_the_champion(registry):
    first, name = registry(0.50)
    assert first["passed"] and first["alias"] == "champion" and _champion(name) == first["version"]
    assert "no champion yet" in first["reason"]

    worse, _ = registry(0.40)
    assert not worse["passed"] and worse["alias"] is None and worse["registered"]
    assert _champion(name) == first["version"]
    assert worse["champion_version"] == first["version"] and worse["champion_score"] == pytest.approx(0.5)

    too_far_from_teacher, _ = registry(0.90, retained=0.5)
    assert not too_far_from_teacher["passed"] and _champion(name) == first["version"]

    better, _ = registry(0.60)
    assert better["passed"] and _champion(name) == better["version"]
    assert f"beats champion v{first['version']} (0.600 > 0.500)" in better["reason"]


def test_a_gain_within_the_noise_does_not_replace_the_champion_and_a_clear_gain_does(registry):
    """Paired on the same 200 questions: the champion's per-question scores are read back from its register run."""
    champion_scores = [float(i % 2) for i in range(200)]  # 50%
    first, name = registry(0.5, questions=champion_scores)
    # +1 point: 6 questions gained, 4 lost; a strict "higher mean" gate would have promoted it
    noisy = champion_scores[:]
    for i in (0, 2, 4, 6, 8, 10):
        noisy[i] = 1.0
    for i in (1, 3, 5, 7):
        noisy[i] = 0.0
    within, _ = registry(sum(noisy) / 200, questions=noisy)
    assert not within["passed"] and _champion(name) == first["version"]
    assert f"does not beat champion v{first['version']} by more than noise (+1.0 points on the same 200 questions" in within["reason"]
    assert within["versus_champion"]["low"] < 0 < within["versus_champion"]["high"]
    # +10 points, nothing lost: more than noise
    clear = champion_scores[:]
    for i in range(0, 40, 2):
        clear[i] = 1.0
    better, _ = registry(sum(clear) / 200, questions=clear)
    assert better["passed"] and _champion(name) == better["version"]
    assert f"beats champion v{first['version']} by more than noise (+10.0 points on the same 200 questions" in better["reason"]


def test_the_champion_is_paired_when_each_student_was_logged_by_its_training_stage(tmp_path, demo_tokenizer):
    """As in a pipeline: each student is a new checkpoint, logged by the stage that trained it, so a
    version's own run is that stage's, and the champion's per-question scores are read from the run
    that registered it (found by the version's tag), not from its training run."""
    name = f"stage-gate-test-{uuid.uuid4().hex[:6]}"
    # an experiment of its own: a checkpoint another test logged (the same seed) would be found there and reused
    cfg = load_config("demo", [f"work_dir={tmp_path}", f"registry.model_name={name}", f"tracking.experiment={name}"])
    plan = make_plan(cfg)

    def trained_and_registered(seed: int, scores: list[float]) -> dict:
        save_tiny_model(plan.student_uri, demo_tokenizer, seed=seed)  # another checkpoint each time, with its manifest
        io.write_manifest(plan.student_uri, stage="distill", inputs={"seed": seed})
        parent = tracking.start_run(cfg.tracking.experiment, "pipeline")
        with tracking.stage_run(parent, "distill", cfg.tracking.experiment) as stage_run:
            stage_functions.log_model(cfg, plan, stage_run, plan.student_uri)
        report = {"models": {"student": {"exact_match": sum(scores) / len(scores), "teacher_retained": 1.0}},
                  "question_scores": {"metric": "exact_match", "ids": [f"q{i}" for i in range(len(scores))],
                                      "models": {"student": scores}}}
        decision = stage_functions.register(cfg, plan, report, parent)
        assert tracking.client().get_model_version(name, decision["version"]).run_id == stage_run
        return decision

    champion_scores = [float(i % 2) for i in range(200)]
    first = trained_and_registered(1, champion_scores)
    # +1 point on the means (6 gained, 4 lost): a mean-only gate would promote it
    noisy = champion_scores[:]
    for i in (0, 2, 4, 6, 8, 10):
        noisy[i] = 1.0
    for i in (1, 3, 5, 7):
        noisy[i] = 0.0
    within = trained_and_registered(2, noisy)
    assert not within["passed"] and _champion(name) == first["version"]
    assert f"does not beat champion v{first['version']} by more than noise (+1.0 points on the same 200 questions" in within["reason"]
    clear = champion_scores[:]
    for i in range(0, 40, 2):
        clear[i] = 1.0
    better = trained_and_registered(3, clear)
    assert better["passed"] and _champion(name) == better["version"]
    assert f"beats champion v{first['version']} by more than noise (+10.0 points" in better["reason"]


def test_the_decision_is_recorded_on_the_version_and_the_register_run(registry):
    registry(0.5)
    decision, name = registry(0.4)
    c = tracking.client()
    version = c.get_model_version(name, decision["version"])
    assert version.tags["gate_passed"] == "False"
    assert version.tags["gate_reason"] == decision["reason"]
    assert version.tags[tracking.SCORE_TAG] == "0.400000"
    assert version.tags["champion_before"] == f"v{decision['champion_version']}"
    run = c.get_run(version.tags["mydistill.register_run_id"])
    assert run.data.tags["mydistill.gate"] == "failed" and run.data.tags["mydistill.gate_reason"] == decision["reason"]
    assert run.data.metrics[tracking.SCORE_METRIC] == pytest.approx(0.4)
    recorded = json.loads(Path(c.download_artifacts(run.info.run_id, "decision.json")).read_text())
    assert recorded["passed"] is False and recorded["reason"] == decision["reason"]


def test_the_versions_source_run_is_the_run_that_logged_the_model_and_it_names_its_stage(tmp_path, demo_tokenizer):
    cfg = load_config("demo", [f"work_dir={tmp_path}", "tracking.experiment=registry-test"])
    plan = make_plan(cfg)
    save_tiny_model(plan.student_uri, demo_tokenizer, seed=1)
    parent = tracking.start_run(cfg.tracking.experiment, "pipeline")
    with tracking.stage_run(parent, "finetune", cfg.tracking.experiment) as finetune_run:
        logged = stage_functions.log_model(cfg, plan, finetune_run, plan.student_uri)
    name = f"source-test-{uuid.uuid4().hex[:6]}"
    cfg = cfg.model_copy(update={"registry": cfg.registry.model_copy(update={"model_name": name})})
    decision = stage_functions.register(cfg, plan, {"models": {"student": {"exact_match": 0.5, "teacher_retained": 1.0}}}, parent)
    c = tracking.client()
    version = c.get_model_version(name, decision["version"])
    assert version.run_id == finetune_run == c.get_logged_model(logged["model_id"]).source_run_id  # not the register run
    assert c.get_run(version.tags["mydistill.register_run_id"]).data.tags["mydistill.stage"] == "register"
    source = c.get_logged_model(logged["model_id"]).tags["mlflow.source.name"]
    assert source == "mydistill finetune stage (mydistill.stage_functions.train)"  # not Prefect's engine.py


def test_unset_config_leaves_are_not_params_and_inputs_are_listed_by_reference():
    run_id = tracking.start_run("tracking-test", "params")
    tracking.log_params(run_id, {"name": "x", "teacher": {"uri": None, "dtype": "auto"}, "api_base": None})
    tracking.log_dataset_reference(run_id, name="prompts", source="s3://bucket/prompts.jsonl", digest="ab" * 32, context="pipeline input")
    run = tracking.client().get_run(run_id)
    assert run.data.params == {"name": "x", "teacher.dtype": "auto"}
    (dataset,) = run.inputs.dataset_inputs
    assert (dataset.dataset.name, dataset.dataset.digest, dataset.tags[0].value) == ("prompts", ("ab" * 32)[:36], "pipeline input")
    assert "s3://bucket/prompts.jsonl" in dataset.dataset.source


def test_a_student_that_answers_behind_a_prefix_carries_it_on_its_version(registry):
    """Distilled step-by-step, the student answers behind its label prefix: whoever serves it needs it."""
    from mydistill.tokenization import PROMPT_PREFIX_KEY

    plain, name = registry(0.5)
    assert PROMPT_PREFIX_KEY not in tracking.client().get_model_version(name, plain["version"]).tags
    io.write_manifest(str(registry.student_dir), stage="finetune", inputs={}, **{PROMPT_PREFIX_KEY: "[label] "})
    prefixed, _ = registry(0.6)
    assert tracking.client().get_model_version(name, prefixed["version"]).tags[PROMPT_PREFIX_KEY] == "[label] "


def test_a_champion_without_a_score_tag_is_read_from_its_run(registry):
    first, name = registry(0.5)
    tracking.client().delete_model_version_tag(name, first["version"], tracking.SCORE_TAG)
    version = tracking.client().get_model_version(name, first["version"])
    assert tracking.alias_holder(name, "champion") == {
        "version": first["version"], "score": pytest.approx(0.5), "run_id": version.run_id,
        "metric": "exact", "register_run_id": version.tags["mydistill.register_run_id"],
    }


def test_no_model_or_no_alias_means_no_champion():
    assert tracking.alias_holder(f"missing-{uuid.uuid4().hex[:6]}", "champion") is None
    name = f"no-alias-{uuid.uuid4().hex[:6]}"
    tracking.client().create_registered_model(name)
    assert tracking.alias_holder(name, "champion") is None


def test_an_unreachable_registry_is_not_taken_for_no_champion(monkeypatch):
    import mlflow

    def down(*args, **kwargs):
        raise mlflow.exceptions.MlflowException("connection refused", error_code="TEMPORARILY_UNAVAILABLE")

    monkeypatch.setattr(mlflow.MlflowClient, "get_model_version_by_alias", down)
    with pytest.raises(mlflow.exceptions.MlflowException, match="connection refused"):
        tracking.alias_holder("any", "champion")


def test_without_tracking_nothing_is_registered(registry, tmp_path):
    cfg = load_config("demo", [f"work_dir={tmp_path}"])
    decision = stage_functions.register(cfg, make_plan(cfg), {"models": {"student": {"exact_match": 0.9, "teacher_retained": 0.95}}})
    assert decision["passed"] and decision["registered"] is False


def test_a_checkpoint_is_registered_exactly_once(registry):
    io.write_manifest(str(registry.student_dir), stage="finetune", inputs={"data": "x"})
    first, name = registry(0.50)
    again, _ = registry(0.50)  # the unchanged pipeline run again: no second version
    assert again["version"] == first["version"] and again["reused"]
    assert again["alias"] == "champion"
    # on a quiet night the reason says where the alias is now, beside the decision taken then
    assert again["reason"] == f"already registered as v{first['version']} (same checkpoint); it holds the alias now; when registered: {first['reason']}"
    versions = tracking.client().search_model_versions(f"name='{name}'")
    assert len(versions) == 1

    # a run killed after registering but before moving the alias: the re-run moves it
    tracking.client().delete_registered_model_alias(name, "champion")
    resumed, _ = registry(0.50)
    assert resumed["version"] == first["version"] and _champion(name) == first["version"]


def test_runs_left_running_by_a_dead_process_are_marked_killed():
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    experiment = f"stale-{uuid.uuid4().hex[:6]}"
    orphan = tracking.start_run(experiment, "killed pipeline", tags={tracking.OWNER_PID_TAG: dead.stdout.strip()})
    alive = tracking.start_run(experiment, "this process's run")
    assert tracking.mark_dead_runs_killed(experiment) == [orphan]
    assert tracking.client().get_run(orphan).info.status == "KILLED"
    assert tracking.client().get_run(alive).info.status == "RUNNING"
    tracking.end_run(alive)


def test_a_stage_stopped_from_outside_ends_killed_and_one_that_raised_ends_failed():
    experiment = f"stopped-{uuid.uuid4().hex[:6]}"
    parent = tracking.start_run(experiment, "pipeline")
    ended = {}
    for stage, exc in (("cancelled", KeyboardInterrupt()), ("broken", ValueError("bad row")), ("fine", None)):
        with pytest.raises(type(exc)) if exc else contextlib.nullcontext(), tracking.stage_run(parent, stage, experiment) as run_id:
            ended[stage] = run_id
            if exc:
                raise exc
    statuses = {stage: tracking.client().get_run(run_id).info.status for stage, run_id in ended.items()}
    assert statuses == {"cancelled": "KILLED", "broken": "FAILED", "fine": "FINISHED"}
    assert tracking.client().get_run(ended["cancelled"]).data.tags["mydistill.error"] == "stopped from outside (KeyboardInterrupt)"
    tracking.end_run(parent)


def test_the_open_runs_of_a_stopped_flow_run_end_killed_and_no_others():
    experiment = f"hook-{uuid.uuid4().hex[:6]}"
    ours = tracking.start_run(experiment, "pipeline", tags={"prefect.flow_run_id": "run-a"})
    running = tracking.start_run(experiment, "distill", parent_run_id=ours)
    done = tracking.start_run(experiment, "generate", parent_run_id=ours)
    tracking.end_run(done)
    other = tracking.start_run(experiment, "pipeline", tags={"prefect.flow_run_id": "run-b"})
    ended = tracking.kill_open_runs(experiment, {"prefect.flow_run_id": "run-a"}, "the Prefect flow run was cancelled")
    assert sorted(ended) == sorted([ours, running])
    status = {run: tracking.client().get_run(run).info.status for run in (ours, running, done, other)}
    assert status == {ours: "KILLED", running: "KILLED", done: "FINISHED", other: "RUNNING"}
    assert tracking.client().get_run(running).data.tags["mydistill.error"] == "the Prefect flow run was cancelled"
    assert tracking.kill_open_runs(experiment, {"prefect.flow_run_id": "run-a"}, "again") == []  # nothing left open
    assert tracking.kill_open_runs("no-such-experiment", {"prefect.flow_run_id": "run-a"}, "none") == []
    tracking.end_run(other)


def test_artifacts_go_beside_any_sqlite_store_or_where_configured(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MLflow's own default would be ./mlruns here
    try:
        tracking.configure(f"sqlite:///{tmp_path}/elsewhere/mlflow.db")
        exp = tracking.client().get_experiment(tracking.experiment_id("beside-the-store"))
        assert exp.artifact_location == (tmp_path / "elsewhere" / "artifacts" / "beside-the-store").as_uri()
        tracking.configure(f"sqlite:///{tmp_path}/elsewhere/mlflow.db", artifact_location=str(tmp_path / "art"))
        exp = tracking.client().get_experiment(tracking.experiment_id("configured"))
        assert exp.artifact_location.endswith("/art/configured")
        assert not (tmp_path / "mlruns").exists()
    finally:
        tracking.configure()


def test_the_registered_champion_is_an_mlflow_model_that_answers_as_the_checkpoint_does(registry):
    import mlflow

    from mydistill.evaluation.scoring import generate_answers
    from mydistill.models import load_model, load_tokenizer

    decision, name = registry(0.5)
    version = tracking.client().get_model_version(name, decision["version"])
    assert version.source.startswith("models:/m-")  # the version is the logged model, not a folder of files
    logged = tracking.client().get_logged_model(version.source.removeprefix("models:/"))
    assert tracking.CHECKPOINT_TAG in logged.tags
    assert logged.name == registry.student_dir.name  # "finetune-<key>": the run page tells the students apart
    parent = tracking.client().get_run(tracking.client().get_run(version.run_id).data.tags[tracking.PARENT_TAG])
    assert [m.model_id for m in parent.outputs.model_outputs] == [logged.model_id]  # "Logged models" of the pipeline run
    prompt = "reverse: dbcaf"
    student = str(registry.student_dir)
    expected = generate_answers(load_model(student), load_tokenizer(student), [prompt], max_new_tokens=8, batch_size=1)[0]

    served = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    assert served.metadata.flavors["transformers"]["task"] == "text-generation"
    answer = served.predict([prompt])
    assert answer[0].strip() == expected.strip()
    pipeline = mlflow.transformers.load_model(f"models:/{name}@champion")
    assert type(pipeline).__name__ == "TextGenerationPipeline"
    from mydistill.tokenization import format_prompt

    assert served.metadata.metadata["mydistill.prompt_template"] == format_prompt(load_tokenizer(student), "{prompt}")


def test_logged_model_names_come_from_the_checkpoint_folder():
    from mydistill.stage_functions.registry import logged_model_name

    assert logged_model_name("s3://bucket/runs/demo/distill-0123456789ab/") == "distill-0123456789ab"
    assert logged_model_name("/work/runs/baseline-ab12") == "baseline-ab12"
    assert logged_model_name("/odd/my student (v2)") == "my-student-v2"
