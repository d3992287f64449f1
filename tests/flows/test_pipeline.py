"""The whole pipeline flow on a shrunken demo, under Prefect's test harness, tracked in MLflow."""

from __future__ import annotations

import shutil

import pytest

from mydistill import io
from mydistill.config import PipelineConfig, load_config
from mydistill.pipeline.plan import make_plan

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SHRUNKEN = [
    "demo.num_real=40", "demo.num_prompts=160", "demo.num_eval=30",
    "demo.teacher_arch.hidden_size=32", "demo.teacher_arch.num_hidden_layers=1",
    "demo.teacher_arch.num_attention_heads=2", "demo.teacher_arch.intermediate_size=64",
    "demo.teacher_train_examples=1000", "demo.teacher_steps=80",
    "student.arch.hidden_size=16", "student.arch.num_hidden_layers=1",
    "student.arch.num_attention_heads=2", "student.arch.intermediate_size=32",
    "generate.max_new_tokens=8", "generate.shard_size=64",
    "distill.steps=8", "distill.batch_size=16", "distill.log_every=4", "distill.eval_every=4",
    # stage 1 runs as production does: launched workers under ZeRO-3 (2 CPU processes, gloo)
    "distill.launcher=torchrun", "distill.num_processes=2", "distill.deepspeed=deploy/deepspeed/zero3.json", "distill.threads=1",
    "finetune.steps=4", "finetune.batch_size=16", "finetune.log_every=2",
    "evaluate.max_new_tokens=8", "registry.model_name=test-student", "registry.min_teacher_retained=0.0",
    "registry.min_category_retained=0.0",  # the demo asks 70% of every category; a shrunken student is not that good
    "tracking.experiment=pipeline-test",
]


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    return load_config("demo", [f"work_dir={root}/runs", f"demo.cache_dir={root}/cache", *SHRUNKEN])


def task_states(flow_run_id) -> dict[str, str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    import time

    # the API records task-run states from events, a moment after the flow returns: wait for them
    deadline = time.monotonic() + 30
    while True:
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        if all(r.state is not None for r in runs) or time.monotonic() > deadline:
            return {r.name: r.state.name if r.state else "Unknown" for r in runs}
        time.sleep(0.5)


def task_edges(flow_run_id) -> set[tuple[str, str]]:
    """(upstream task, downstream task) pairs as the Prefect API records them: the edges the UI draws."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    names = {r.id: r.name for r in runs}
    return {
        (names[i.id], r.name) for r in runs for inputs in r.task_inputs.values() for i in inputs
        if getattr(i, "input_type", None) == "task_run" and i.id in names
    }


def flow_run_logs(flow_run_id) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return [log.message for log in logs]


def run_pipeline(config):
    from flows.pipeline_flow import distill_pipeline

    state = distill_pipeline(config=config, return_state=True)
    assert state.is_completed(), state
    return state.result(), state.state_details.flow_run_id


def test_pipeline_runs_end_to_end_and_tracks_everything(harness, config, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.setenv("MYDISTILL_PROGRESS_EVERY_S", "0")  # a report per step: the stages here take seconds
    result, flow_run_id = run_pipeline(config)
    report = result["report"]
    assert set(report["models"]) == {"teacher", "student", "baseline"}
    for metrics in report["models"].values():
        assert 0.0 <= metrics["exact_match"] <= 1.0 and metrics["perplexity"] > 1.0
    assert result["decision"]["registered"] and result["decision"]["alias"] == "champion"

    client = MlflowClient()
    parent = client.get_run(result["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["prefect.flow_run_id"] == str(flow_run_id)
    assert parent.data.params["mix.teacher_fraction"] == "0.7"
    assert "student_exact_match" in parent.data.metrics
    # what the run cost, per stage and summed on the pipeline run (CPU here: no GPU-hours)
    assert parent.data.metrics["cost/wall_s"] > 0 and parent.data.metrics["cost/train_tokens"] > 0
    assert parent.data.metrics["cost/teacher_prompt_tokens"] > 0 and parent.data.metrics["cost/gpu_s"] == 0
    assert result["cost"]["cost/wall_s"] == parent.data.metrics["cost/wall_s"]
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    by_stage = {r.data.tags["mydistill.stage"]: r for r in children}
    assert set(by_stage) == {"generate", "mix", "distill", "finetune", "baseline", "evaluate", "register"}
    assert all(r.info.status == "FINISHED" for r in children)

    distill = by_stage["distill"]
    curve = client.get_metric_history(distill.info.run_id, "loss")
    assert [m.step for m in curve] == [4, 8]
    assert {"kd", "ce", "tokens_per_s", "peak_memory_mb"} <= set(distill.data.metrics)
    assert "val_loss" in by_stage["finetune"].data.metrics
    logs = flow_run_logs(flow_run_id)
    assert any("[mydistill] done" in line for line in logs)  # worker output streamed
    # progress: rank 0 of the launched distill workers and the in-process finetune report into the log
    for stage, steps in (("distill", 8), ("finetune", 4)):
        lines = [line for line in logs if line.startswith(f"{stage}: ") and f"/{steps} steps (" in line]
        assert len(lines) >= 2 and lines[-1].startswith(f"{stage}: {steps}/{steps} steps (100%)"), lines
        assert ", loss " in lines[-1]
    assert not any("[mydistill progress]" in line for line in logs)  # the marked lines were turned into reports
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as prefect:
        artifacts = prefect.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    bars = {a.key: a.data for a in artifacts if a.type == "progress"}
    assert {f"{s}-progress" for s in ("generate", "distill", "finetune", "baseline", "evaluate")} <= set(bars), bars
    assert set(bars.values()) == {100}, bars
    # each task's returned URI went into the next: the Prefect UI draws the DAG's edges
    assert {("generate", "mix"), ("mix", "distill"), ("distill", "finetune"), ("mix", "finetune"), ("finetune", "evaluate"),
            ("baseline", "evaluate"), ("evaluate", "register"), ("register", "record-run")} <= task_edges(flow_run_id)
    # each trained model is an MLflow model of the transformers flavor, logged by its stage's run
    import mlflow

    for stage in ("distill", "finetune", "baseline"):
        model_uri = by_stage[stage].data.tags["mydistill.model_uri"]
        assert client.get_logged_model(model_uri.removeprefix("models:/")).source_run_id == by_stage[stage].info.run_id
        assert "transformers" in mlflow.models.get_model_info(model_uri).flavors
    mix_inputs = {d.dataset.name for d in by_stage["mix"].inputs.dataset_inputs}
    assert {"train", "val", "task_train"} <= mix_inputs
    assert by_stage["mix"].data.metrics["teacher_fraction_realised"] == pytest.approx(0.7, abs=0.02)
    evaluation = {a.path for a in client.list_artifacts(by_stage["evaluate"].info.run_id, "evaluation")}
    assert {"evaluation/metrics.json", "evaluation/comparison.png"} <= evaluation
    version = client.get_model_version_by_alias("test-student", "champion")
    assert version.tags["gate_passed"] == "True"
    assert version.source == by_stage["finetune"].data.tags["mydistill.model_uri"]  # registered, not logged again


def test_rerun_skips_finished_stages_and_redoes_a_deleted_one(harness, config):
    first, _ = run_pipeline(config)
    again, flow_run_id = run_pipeline(config)
    assert again["report"] == first["report"]
    states = task_states(flow_run_id)
    for stage in ("generate", "mix", "distill", "finetune", "baseline", "evaluate"):
        assert states[stage] == "Cached", states

    plan = make_plan(config)
    shutil.rmtree(plan.mix_uri)
    _, flow_run_id = run_pipeline(config)
    states = task_states(flow_run_id)
    assert states["mix"] == "Completed"
    assert io.read_manifest(plan.mix_uri) is not None


def test_a_bad_input_fails_the_flow_at_preflight_with_the_message_as_its_state(harness, tmp_path, tiny_model_dir):
    """A UI-triggered run with a broken eval file fails in its first task, before any stage writes."""
    prompts, real, evals = tmp_path / "p.jsonl", tmp_path / "r.jsonl", tmp_path / "e.jsonl"
    io.write_records(str(prompts), [{"prompt": "q"}])
    io.write_records(str(real), [{"prompt": "q", "answer": "a"}])
    evals.write_text('{"prompt": "q", "answer": "a"}\n{"prompt": "q", "answer": \n')
    bad = load_config("demo-tiny", [
        "demo=null", f"teacher.uri={tiny_model_dir}", f"data.prompts_uri={prompts}", f"data.real_uri={real}",
        f"data.eval_uri={evals}", f"work_dir={tmp_path}/runs",
    ])
    from flows.pipeline_flow import distill_pipeline

    state = distill_pipeline(config=bad, return_state=True)
    assert state.is_failed()
    assert f"{evals}:2: malformed JSON line" in state.message
    assert task_states(state.state_details.flow_run_id) == {"load-credentials": "Completed", "preflight": "Failed"}
    assert not [p for p in (tmp_path / "runs").iterdir() if not p.name.startswith(".")]


def test_credentials_in_urls_never_reach_prefects_flow_parameters(harness):
    from prefect import flow
    from prefect.client.orchestration import get_client

    @flow(name="credentials-probe")
    def probe(config: PipelineConfig) -> str:
        return config.generate.api_base  # the run itself has the credentials it was given

    cfg = load_config("demo-tiny", ["generate.backend=openai", "generate.api_base=http://user:hunter2@127.0.0.1:8000/v1",
                                    "tracking.tracking_uri=http://admin:s3cret@127.0.0.1:5000"])
    state = probe(config=cfg, return_state=True)
    assert state.result() == "http://user:hunter2@127.0.0.1:8000/v1"
    with get_client(sync_client=True) as client:
        recorded = client.read_flow_run(state.state_details.flow_run_id).parameters
    text = str(recorded)
    assert "hunter2" not in text and "s3cret" not in text and "http://***@127.0.0.1:8000/v1" in text
