"""The demo-tiny pipeline with its distill stage on a "cluster": engine kubeflow against the fake
Kubernetes API (tests/mydistill/training/fake_k8s.py), whose node pods run the default template's
``torchrun -m mydistill.train --job <uri>`` as local processes."""

from __future__ import annotations

import pytest

from mydistill.config import load_config
from mydistill.plan import make_plan
from mydistill.training import kubeflow
from tests.flows.test_pipeline import flow_run_logs
from tests.mydistill.training.fake_k8s import FakeKubernetes

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_the_demo_pipeline_completes_with_distill_on_kubeflow(tmp_path):
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline_flow import distill_pipeline

    with FakeKubernetes(tmp_path / "cluster") as k8s, prefect_test_harness(server_startup_timeout=180):
        config = load_config("demo-tiny", [
            f"work_dir={tmp_path}/runs", f"demo.cache_dir={tmp_path}/cache", "tracking.experiment=kubeflow-test",
            "registry.model_name=kubeflow-test-student", "evaluate.baseline=false",  # (the baseline trains as distill does)
            "distill.engine=kubeflow", "distill.kubeflow.image=registry.example/mydistill:test", "distill.threads=1",
            f"distill.kubeflow.kubeconfig={k8s.write_kubeconfig(tmp_path / 'kubeconfig')}", "distill.kubeflow.poll_seconds=0.5",
        ])
        state = distill_pipeline(config=config, return_state=True)
        assert state.is_completed(), state
        logs = flow_run_logs(state.state_details.flow_run_id)

    distill_uri = make_plan(config).distill_uri
    name = kubeflow.trainjob_name("distill", distill_uri)
    assert k8s.created == [name]  # one TrainJob, for distill alone (finetune trains locally)
    assert (k8s.jobs[("default", name)].body["metadata"]["labels"][kubeflow.FLOW_RUN_LABEL]
            == str(state.state_details.flow_run_id))
    assert kubeflow.condition(k8s.jobs[("default", name)].body, "Complete")
    # the node's torchrun output reached the Prefect task log, the final step included
    assert any(line.startswith("[node 0] ") and "[mydistill] done" in line for line in logs)
    assert state.result()["report"]["models"]["student"]
