"""The pipeline with every artifact on S3 (a moto server on loopback), its credentials from a Prefect
Secret block only, and checked for never writing them where people or machines read."""

from __future__ import annotations

import json
import uuid

import pytest

from mydistill import io
from mydistill.config import load_config
from mydistill.pipeline.plan import make_plan

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

KEY_ID = f"AKIAMYDISTILL{uuid.uuid4().hex[:8].upper()}"
SECRET = f"s3cr3t-{uuid.uuid4().hex}"


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture
def credentials_only_in_a_block(harness, s3_endpoint, tmp_path, monkeypatch):
    """No S3 credentials anywhere but the Prefect Secret block ``mydistill-credentials``."""
    from prefect.blocks.system import Secret
    from s3fs import S3FileSystem

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "MYDISTILL_CREDENTIALS_BLOCK"):
        monkeypatch.setenv(name, "x")  # so that deleting it is undone afterwards
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    S3FileSystem.clear_instance_cache()
    with pytest.raises(Exception, match="credentials"):
        io.exists("s3://mydistill-test/anything")
    Secret(value={"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET}).save("mydistill-credentials", overwrite=True)
    yield
    S3FileSystem.clear_instance_cache()


def test_pipeline_on_s3_with_credentials_from_a_block(credentials_only_in_a_block, tmp_path, capfd, caplog):
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    from flows.pipeline_flow import distill_pipeline

    config = load_config("demo-tiny", [
        "work_dir=s3://mydistill-test/pipeline-s3", f"demo.cache_dir={tmp_path}/cache",
        "registry.model_name=test-student-s3", "tracking.experiment=pipeline-s3-test",
    ])
    state = distill_pipeline(config=config, return_state=True)
    assert state.is_completed(), state
    result = state.result()

    # every stage's artifact is on S3, finished
    plan = make_plan(config)
    assert plan.prompts_uri.startswith("s3://") and io.exists(plan.prompts_uri) and io.exists(plan.eval_uri)
    for uri in (plan.generate_uri, plan.mix_uri, plan.distill_uri, plan.finetune_uri,
                plan.baseline_uri, plan.evaluate_uri):
        assert uri.startswith("s3://mydistill-test/pipeline-s3/") and io.read_manifest(uri) is not None, uri
    assert io.exists(io.join(plan.finetune_uri, "model.safetensors"))

    # tracked as usual: plots as images, the student registered and, first of its name, champion
    client = MlflowClient()
    parent = client.get_run(result["mlflow_run_id"])
    assert parent.data.params["work_dir"] == "s3://mydistill-test/pipeline-s3"
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert plots == {"plots/loss_curves.png", "plots/comparison.png", "plots/champion_history.png", "plots/category_retention.png"}
    assert result["decision"]["alias"] == "champion"
    assert client.get_model_version_by_alias("test-student-s3", "champion").tags["gate_passed"] == "True"

    # the credentials: in no MLflow param or tag, no log line, no Prefect parameter or result
    runs = client.search_runs([parent.info.experiment_id])
    assert len(runs) == 8  # the pipeline run and its seven stages
    recorded = json.dumps([{**r.data.params, **r.data.tags} for r in runs])
    with get_client(sync_client=True) as prefect:
        flow_run_id = state.state_details.flow_run_id
        logs = [entry.message for entry in prefect.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))]
        flow_run = prefect.read_flow_run(flow_run_id)
    assert "credentials from Secret block 'mydistill-credentials': AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY" in logs
    out, err = capfd.readouterr()
    for text in (recorded, "\n".join(logs), out, err, caplog.text, json.dumps(flow_run.parameters), json.dumps(result, default=str)):
        assert SECRET not in text and KEY_ID not in text
