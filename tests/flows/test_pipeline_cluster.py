"""The pipeline as it runs on a cluster, on this machine: the pipeline's flow run (the CPU side) sends
its distill stage to the stage's deployment on the GPU pool (``training_flow_runs``); a process worker
runs it as a child flow run, which trains with ``engine: kubeflow``: one TrainJob on the fake
Kubernetes API (tests/mydistill/training/fake_k8s.py), whose node pod runs the default template's
``torchrun -m mydistill.train --job <uri>`` as a local process.

What it leaves out: the pipeline runs in this test's process, not through a worker on the CPU pool
as the nightly deployment does; both pools are process pools here; and what the fake leaves out
(its docstring). One pipeline run checks both, to keep the suite's time down.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mydistill import io
from mydistill.config import load_config
from mydistill.pipeline.plan import make_plan
from mydistill.training import kubeflow
from tests.flows.test_pipeline import flow_run_logs
from tests.mydistill.training.fake_k8s import FakeKubernetes

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


def test_distill_runs_on_the_gpu_pool_as_a_child_flow_run_that_trains_through_a_trainjob(tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline_flow import distill_pipeline

    with FakeKubernetes(tmp_path / "cluster") as k8s, prefect_test_harness(server_startup_timeout=180):
        config = load_config("demo-tiny", [
            f"work_dir={tmp_path}/runs", f"demo.cache_dir={tmp_path}/cache", "tracking.experiment=cluster-test",
            "registry.model_name=cluster-test-student", "finetune.enabled=false", "evaluate.baseline=false",
            "training_flow_runs=true",
            "distill.engine=kubeflow", "distill.kubeflow.image=registry.example/mydistill:test", "distill.threads=1",
            f"distill.kubeflow.kubeconfig={k8s.write_kubeconfig(tmp_path / 'kubeconfig')}", "distill.kubeflow.poll_seconds=0.5",
        ])
        with get_client(sync_client=True) as client:
            client.create_work_pool(WorkPoolCreate(name="mydistill-gpu", type="process"))
            deployment_id = client.create_deployment(  # as deploy/prefect.yaml's `distill`
                flow_id=client.create_flow_from_name("distill"), name="distill", work_pool_name="mydistill-gpu",
                entrypoint="flows/stage_flows.py:distill_flow", path=str(REPO),
                pull_steps=[{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}],
            )
        env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_WORKER_QUERY_SECONDS": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        with open(tmp_path / "worker.log", "wb") as log:
            worker = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", "mydistill-gpu"],
                                      env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            state = distill_pipeline(config=config, return_state=True)
        finally:
            # a worker shutting down on a loaded machine may take longer than its grace: then it is killed,
            # with its process group (nothing of it may outlive the test)
            worker.terminate()
            try:
                worker.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait(timeout=30)
        assert state.is_completed(), f"{state}\n{(tmp_path / 'worker.log').read_text()[-3000:]}"
        with get_client(sync_client=True) as client:
            children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[state.state_details.flow_run_id])))
        (child,) = [run for run in children if run.deployment_id is not None]
        child_logs = flow_run_logs(child.id)

    # the training stage ran as its own flow run, on the GPU pool, linked to the pipeline's
    assert (child.deployment_id, child.work_pool_name) == (deployment_id, "mydistill-gpu")
    assert child.state.is_completed()
    # ... where it submitted one TrainJob, owned by that flow run, and followed it to the end
    distill_uri = make_plan(config).distill_uri
    name = kubeflow.trainjob_name("distill", distill_uri)
    assert k8s.created == [name]
    trainjob = k8s.jobs[("default", name)].body
    assert trainjob["metadata"]["labels"][kubeflow.FLOW_RUN_LABEL] == str(child.id)
    assert kubeflow.condition(trainjob, "Complete")
    assert any(line.startswith("[node 0] ") and "[mydistill] done" in line for line in child_logs)  # the pod's log, in Prefect's
    assert io.read_manifest(distill_uri) is not None
    assert state.result()["report"]["models"]["student"]
