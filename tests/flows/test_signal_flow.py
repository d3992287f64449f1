"""The pipeline with the teacher-signal stage, and the signal stage's own flow, on the shrunken demo."""

from __future__ import annotations

import pytest

from mydistill import io
from mydistill.config import load_config
from mydistill.pipeline.plan import make_plan

from tests.flows import test_pipeline
from tests.flows.test_pipeline import SHRUNKEN, run_pipeline, task_states

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.usefixtures("harness")]

harness = test_pipeline.harness  # the same Prefect test server fixture, for this module

# the signal stage adds a teacher pass; leaving the baseline out keeps this as quick as the pipeline test
WITH_SIGNAL = [*SHRUNKEN, "signal.enabled=true", "evaluate.baseline=false", "tracking.experiment=signal-flow-test"]


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    root = tmp_path_factory.mktemp("signal-flow")
    return load_config("demo", [f"work_dir={root}/runs", f"demo.cache_dir={root}/cache", *WITH_SIGNAL])


def test_pipeline_with_the_signal_stage_distils_from_the_store(config):
    from mlflow import MlflowClient

    result, flow_run_id = run_pipeline(config)
    plan = make_plan(config)
    assert result["plan"]["signal_uri"] == plan.signal_uri
    assert task_states(flow_run_id)["signal"] == "Completed"

    store = io.read_manifest(plan.signal_uri)
    assert store is not None and store["counts"]["tokens"] > 0
    assert store["mode"] == "sampled"  # the default 'auto' with the default forward_kl loss, recorded concretely
    assert store["temperature"] == config.distill.loss.temperature
    # the distill stage read this store (its checkpoint's inputs name it) and trained under it
    distilled = io.read_manifest(plan.distill_uri)
    assert distilled["inputs"]["signal_uris"] == [plan.signal_uri]
    assert distilled["history"][-1]["kd"] > 0

    client = MlflowClient()
    parent = client.get_run(result["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    by_stage = {r.data.tags["mydistill.stage"]: r for r in children}
    assert {"generate", "mix", "signal", "distill", "finetune", "evaluate", "register"} <= set(by_stage)
    assert all(r.info.status == "FINISHED" for r in children)
    signal = by_stage["signal"]
    assert signal.data.params["signal.mode"] == "sampled" and signal.data.params["output_uri"] == plan.signal_uri
    assert signal.data.metrics["bytes_per_token"] > 0
    assert plan.signal_uri in by_stage["distill"].data.params["signal_uris"]


def test_the_signal_flow_runs_the_stage_alone(config):
    from flows.stage_flows import signal_flow

    if io.read_manifest(make_plan(config).signal_uri) is None:  # this test run alone: make the stages before it first
        run_pipeline(config)
    plan = make_plan(config)  # (after the demo's data exists: the plan fingerprints it)
    state = signal_flow(config=config, return_state=True)
    assert state.is_completed(), state
    assert state.result() == plan.signal_uri
    assert task_states(state.state_details.flow_run_id)["signal"] == "Cached"  # the pipeline's store, not made again

    off = config.model_copy(update={"signal": config.signal.model_copy(update={"enabled": False})})
    state = signal_flow(config=off, return_state=True)
    assert state.is_failed()
    with pytest.raises(ValueError, match="signal.enabled is false"):
        state.result()


def test_the_signal_and_distill_flows_with_a_served_teacher(config):
    """signal.backend: openai in the flows: the project's server serves the pipeline's teacher, the signal
    flow writes the store from its /v1/completions answers, and the distill flow trains from that store."""
    from flows.stage_flows import distill_flow, signal_flow
    from mydistill.signal import SignalConfig
    from tests.mydistill import generation_fixtures as fx

    plan = make_plan(config)
    if io.read_manifest(plan.mix_uri) is None:  # this test run alone: make the stages before it first
        run_pipeline(config)
    server = fx.ServerProcess(plan.teacher_uri, "--model-name", "demo-teacher", "--dtype", "float32", "--max-logprobs", "64")
    try:
        signal = SignalConfig(**{**config.signal.model_dump(), "backend": "openai", "api_base": server.api_base})
        served = config.model_copy(update={"signal": signal})
        served_plan = make_plan(served)
        state = signal_flow(config=served, return_state=True)
        assert state.is_completed(), state
        assert state.result() == served_plan.signal_uri != plan.signal_uri
        store = io.read_manifest(served_plan.signal_uri)
        assert store["backend"] == "openai" and store["teacher"]["model"] == "demo-teacher" and store["mode"] == "topk"
        assert store["counts"]["examples"] == io.read_manifest(plan.signal_uri)["counts"]["examples"]
        state = distill_flow(config=served, return_state=True)
        assert state.is_completed(), state
        distilled = io.read_manifest(served_plan.distill_uri)
        assert distilled["inputs"]["signal_uris"] == [served_plan.signal_uri] and distilled["history"][-1]["kd"] > 0
    finally:
        server.close()
