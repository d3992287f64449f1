"""The cluster engine (engine: kubeflow) against a fake Kubernetes API whose pods are local processes.

The pods here run a few lines of Python instead of torchrun (a second each, not fifteen), from a
template overriding the default one's command, as a user's would; the demo pipeline through
torchrun pods is tests/flows/test_pipeline_kubeflow.py.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from mydistill.config import KubeflowConfig, load_config
from mydistill.training import kubeflow
from mydistill.training.job import TrainJob
from tests.mydistill.training.fake_k8s import FakeKubernetes, group_alive

# what each node "pod" runs: says what the cluster gave it, then does what FAKE_MODE asks
POD = r"""
import json, os, sys, time
job = json.load(open(sys.argv[1]))
rank, mode = os.environ["PET_NODE_RANK"], os.environ.get("FAKE_MODE", "ok")
print(f"rank {rank} of {os.environ['PET_NNODES']} master {os.environ['PET_MASTER_ADDR']}:{os.environ['PET_MASTER_PORT']} "
      f"home {os.environ['HOME']} cwd {os.getcwd()} secret {os.environ.get('S3_KEY', '-')}", flush=True)
if mode == "sleep":
    print("sleeping", flush=True)
    time.sleep(600)
if mode == "fail":
    if rank == "1":
        time.sleep(0.5)
        raise ValueError("no such column 'response' in shard 3")
    time.sleep(600)  # the fake stops it once node 1 failed, as JobSet does
if rank == "0":
    os.makedirs(job["output_uri"], exist_ok=True)
    with open(os.path.join(job["output_uri"], "manifest.json"), "w") as f:
        json.dump({"final_metrics": {"loss": 1.5}}, f)
"""


@pytest.fixture
def k8s(tmp_path):
    with FakeKubernetes(tmp_path / "cluster") as fake:
        yield fake


def python_template(tmp_path: Path) -> str:
    """deploy/kubeflow/trainjob.yaml with the node's command replaced (what a user's override does)."""
    tree = yaml.safe_load(kubeflow.DEFAULT_TEMPLATE.read_text())
    tree["spec"]["trainer"]["command"] = [sys.executable, "-c", POD, "{{ job_uri }}"]
    path = tmp_path / "trainjob.yaml"
    path.write_text(yaml.safe_dump(tree))
    return str(path)


def cluster_config(k8s: FakeKubernetes, tmp_path: Path, **overrides) -> KubeflowConfig:
    return KubeflowConfig(**{
        "image": "registry.example/mydistill:1", "kubeconfig": k8s.write_kubeconfig(tmp_path / "kubeconfig"),
        "template": python_template(tmp_path), "poll_seconds": 0.2, **overrides,
    })


def train_job(tmp_path: Path, stage: str = "distill") -> TrainJob:
    return TrainJob(stage=stage, data_uri=str(tmp_path / "data.jsonl"), output_uri=str(tmp_path / "work" / stage),
                    tokenizer_uri=str(tmp_path / "tokenizer"), train={})


def wait_for(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_the_default_template_renders_a_trainjob_with_the_stages_settings(tmp_path):
    cfg = KubeflowConfig(
        namespace="ml", image="registry.example/mydistill:1", resources_per_node={"nvidia.com/gpu": 8},
        env={"HF_HOME": "/cache/hf"}, secret_env={"AWS_SECRET_ACCESS_KEY": "s3-credentials/secret-key"},
    )
    job = train_job(tmp_path)
    manifest = kubeflow.trainjob_manifest(job, cfg, job_uri="s3://bucket/work/distill.job.json", nodes=2, num_processes=8,
                                          env={"MLFLOW_TRACKING_URI": "http://mlflow:5000"}, labels={kubeflow.FLOW_RUN_LABEL: "abc"})
    trainer = manifest["spec"]["trainer"]
    assert manifest["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and manifest["kind"] == "TrainJob"
    assert manifest["metadata"]["name"] == kubeflow.trainjob_name("distill", job.output_uri)
    assert manifest["metadata"]["labels"] == {kubeflow.FLOW_RUN_LABEL: "abc", kubeflow.STAGE_LABEL: "distill"}
    assert manifest["spec"]["runtimeRef"] == {"name": "torch-distributed"}
    assert trainer["command"] == ["torchrun", "-m", "mydistill.train", "--job", "s3://bucket/work/distill.job.json"]
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (2, 8)
    assert trainer["resourcesPerNode"] == {"limits": {"nvidia.com/gpu": 8}}
    assert {"name": "HF_HOME", "value": "/cache/hf"} in trainer["env"]
    assert {"name": "MLFLOW_TRACKING_URI", "value": "http://mlflow:5000"} in trainer["env"]
    assert {"name": "AWS_SECRET_ACCESS_KEY", "valueFrom": {"secretKeyRef": {"name": "s3-credentials", "key": "secret-key"}}} in trainer["env"]


def test_the_job_name_is_fixed_by_the_stage_output():
    a = kubeflow.trainjob_name("distill", "s3://b/runs/distill-1")
    assert a == kubeflow.trainjob_name("distill", "s3://b/runs/distill-1")
    assert a != kubeflow.trainjob_name("distill", "s3://b/runs/distill-2")
    assert len(a) <= 63


@pytest.mark.parametrize(("change", "expected"), [
    (lambda t: t["spec"]["trainer"].update(image="{{ imag }}"), "spec.trainer.image: unknown placeholder {{ imag }}"),
    (lambda t: t.update(kind="PyTorchJob"), "expected apiVersion trainer.kubeflow.org/v1alpha1 and kind TrainJob"),
    (lambda t: t["spec"]["trainer"].update(numNodes="two"), "spec.trainer.numNodes must be a whole number >= 1, got 'two'"),
    (lambda t: t["spec"].pop("runtimeRef"), "spec.runtimeRef.name is missing"),
])
def test_a_broken_template_is_one_error_naming_the_file_and_field(tmp_path, change, expected):
    tree = yaml.safe_load(kubeflow.DEFAULT_TEMPLATE.read_text())
    change(tree)
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(tree))
    cfg = KubeflowConfig(image="x", template=str(path))
    with pytest.raises(kubeflow.ManifestError) as e:
        kubeflow.trainjob_manifest(train_job(tmp_path), cfg, job_uri="/w/j.json", nodes=1, num_processes=1)
    assert str(e.value).startswith(f"TrainJob template {path}: {expected}")


def test_a_config_refuses_bad_secret_refs_and_a_kubeflow_stage_without_an_image():
    with pytest.raises(ValueError, match="expected 'secret-name/key'"):
        KubeflowConfig(secret_env={"TOKEN": "just-a-name"})
    with pytest.raises(ValueError, match="engine: kubeflow needs kubeflow.image"):
        load_config("demo-tiny", ["distill.engine=kubeflow"])


def test_the_node_count_is_the_stages_nodes_and_the_older_kubeflow_num_nodes_still_reads_as_it():
    image = "distill.kubeflow.image=registry.example/mydistill:1"
    # a TrainJob's pods run torchrun themselves: no local launcher is asked for
    assert load_config("demo-tiny", ["distill.engine=kubeflow", image, "distill.nodes=2"]).distill.nodes == 2
    assert load_config("demo-tiny", ["distill.engine=kubeflow", image, "distill.kubeflow.num_nodes=3"]).distill.nodes == 3
    with pytest.raises(ValueError, match=r"kubeflow.num_nodes \(3\) and nodes \(2\) disagree"):
        load_config("demo-tiny", ["distill.engine=kubeflow", image, "distill.kubeflow.num_nodes=3", "distill.nodes=2"])


def test_a_two_node_job_completes_with_each_pods_log_in_the_stage_log(k8s, tmp_path):
    k8s.secrets["s3"] = {"key": "from-the-secret"}
    cfg = cluster_config(k8s, tmp_path, secret_env={"S3_KEY": "s3/key"})
    lines: list[str] = []
    manifest = kubeflow.run_trainjob(train_job(tmp_path), cfg, nodes=2, num_processes=1, on_line=lines.append)
    assert manifest == {"final_metrics": {"loss": 1.5}}
    said = [line for line in lines if " rank " in line]
    assert sorted(line.split(" home ")[0].split(" master ")[0] for line in said) == ["[node 0] rank 0 of 2", "[node 1] rank 1 of 2"]
    homes = {line.split(" home ")[1].split(" ")[0] for line in said}
    assert len(homes) == 2  # each pod its own HOME (and working dir)
    assert all(line.endswith("secret from-the-secret") for line in said)
    assert lines[-1].endswith(": complete")
    # the job's JSON was written on the work dir, beside the output, for every node to read
    assert json.loads(Path(tmp_path / "work" / "distill.job.json").read_text())["output_uri"] == str(tmp_path / "work" / "distill")


def test_a_failing_pod_is_one_line_naming_the_node_and_its_last_words(k8s, tmp_path):
    cfg = cluster_config(k8s, tmp_path, env={"FAKE_MODE": "fail"})
    with pytest.raises(kubeflow.TrainJobFailed) as e:
        kubeflow.run_trainjob(train_job(tmp_path), cfg, nodes=2, num_processes=1)
    message = str(e.value)
    assert "\n" not in message
    assert "failed: node 1 (pod mydistill-distill-" in message
    assert message.endswith("exited with code 1: ValueError: no such column 'response' in shard 3")


def test_a_pod_that_cannot_start_fails_the_stage_at_once(k8s, tmp_path):
    cfg = cluster_config(k8s, tmp_path, secret_env={"S3_KEY": "missing-secret/key"})
    with pytest.raises(kubeflow.TrainJobFailed, match=r'node 0 \(pod .*\) cannot start: CreateContainerConfigError: secret "missing-secret" not found'):
        kubeflow.run_trainjob(train_job(tmp_path), cfg, nodes=1, num_processes=1)
    assert k8s.jobs == {}  # given up: deleted, not left waiting


def test_an_unknown_runtime_is_refused_in_one_line_with_the_apis_reason(k8s, tmp_path):
    cfg = cluster_config(k8s, tmp_path, runtime="deepspeed-distributed")
    with pytest.raises(kubeflow.ClusterRefused) as e:
        kubeflow.run_trainjob(train_job(tmp_path), cfg, nodes=1, num_processes=1)
    assert str(e.value).startswith(f"Kubernetes API {k8s.url} refused to create TrainJob mydistill-distill-")
    assert str(e.value).endswith("in namespace default: 422 spec.runtimeRef.name: ClusterTrainingRuntime "
                                 "'deepspeed-distributed' not found (the fake knows ['torch-distributed'])")


def test_the_stage_rides_out_an_api_server_restart_while_it_waits(k8s, tmp_path):
    cfg = cluster_config(k8s, tmp_path)
    lines: list[str] = []

    def on_line(line: str) -> None:
        lines.append(line)
        if ": submitted (" in line:
            k8s.unavailable = 3  # the wait's first three requests fail with 503

    assert kubeflow.run_trainjob(train_job(tmp_path), cfg, nodes=2, num_processes=1, on_line=on_line) == {"final_metrics": {"loss": 1.5}}
    assert k8s.unavailable == 0 and len(k8s.created) == 1


def test_a_retried_stage_reattaches_to_its_running_job_instead_of_submitting_another(k8s, tmp_path):
    cfg = cluster_config(k8s, tmp_path)
    job = train_job(tmp_path)
    # the first attempt submitted the job, then its process died (the job runs on)
    cluster = kubeflow.Cluster(cfg)
    uri = kubeflow.write_job(job)
    assert cluster.create(kubeflow.trainjob_manifest(job, cfg, job_uri=uri, nodes=2, num_processes=1))
    lines: list[str] = []
    assert kubeflow.run_trainjob(job, cfg, nodes=2, num_processes=1, on_line=lines.append) == {"final_metrics": {"loss": 1.5}}
    assert k8s.created == [kubeflow.trainjob_name("distill", job.output_uri)]  # one TrainJob, not two
    assert "already there (an earlier attempt's): following it" in lines[0]


def test_a_failed_earlier_job_is_replaced_on_retry(k8s, tmp_path):
    job = train_job(tmp_path)
    with pytest.raises(kubeflow.TrainJobFailed):
        kubeflow.run_trainjob(job, cluster_config(k8s, tmp_path, env={"FAKE_MODE": "fail"}), nodes=2, num_processes=1)
    assert kubeflow.run_trainjob(job, cluster_config(k8s, tmp_path), nodes=2, num_processes=1) == {"final_metrics": {"loss": 1.5}}
    assert len(k8s.created) == 2


def test_a_stopped_stage_deletes_its_job_and_no_pod_process_survives(k8s, tmp_path):
    cfg = cluster_config(k8s, tmp_path, env={"FAKE_MODE": "sleep"})

    def on_line(line: str) -> None:
        if line.endswith("sleeping"):
            raise KeyboardInterrupt  # what a cancelled or killed flow run raises in the task

    with pytest.raises(KeyboardInterrupt):
        kubeflow.run_trainjob(train_job(tmp_path), cfg, nodes=2, num_processes=1, on_line=on_line)
    assert k8s.jobs == {}
    groups = k8s.process_groups()
    assert len(groups) == 2
    wait_for(lambda: not any(group_alive(g) for g in groups))


def test_the_flows_cancel_hook_deletes_the_flow_runs_jobs_and_their_processes(k8s, tmp_path):
    from prefect.client.schemas.objects import FlowRun
    from prefect.settings import PREFECT_LOGGING_TO_API_ENABLED, temporary_settings
    from prefect.states import Cancelling

    from flows.pipeline_flow import distill_pipeline
    from tasks.cluster import delete_cluster_jobs

    cfg = cluster_config(k8s, tmp_path, env={"FAKE_MODE": "sleep"})
    config = load_config("demo-tiny", [f"work_dir={tmp_path}/work"]).model_copy()
    config.distill = config.distill.model_copy(update={"engine": "kubeflow", "kubeflow": cfg})
    job, run_id = train_job(tmp_path), uuid.uuid4()
    mine = kubeflow.trainjob_manifest(job, cfg, job_uri=kubeflow.write_job(job), nodes=2, num_processes=1,
                                      labels={kubeflow.FLOW_RUN_LABEL: str(run_id)})
    other = train_job(tmp_path, "finetune")
    others = kubeflow.trainjob_manifest(other, cfg, job_uri=kubeflow.write_job(other), nodes=2, num_processes=1,
                                        labels={kubeflow.FLOW_RUN_LABEL: "run-2"})
    cluster = kubeflow.Cluster(cfg)
    assert cluster.create(mine) and cluster.create(others)
    wait_for(lambda: all(p.phase == "Running" for j in k8s.jobs.values() for p in j.pods))
    groups = [p.proc.pid for p in k8s.jobs[("default", mine["metadata"]["name"])].pods]

    # what Prefect hands the hook when the run is cancelled: its flow, its flow run (with the config), the state
    flow_run = FlowRun(id=run_id, flow_id=uuid.uuid4(), name="cancelled-run", parameters={"config": config.model_dump(mode="json")})
    with temporary_settings({PREFECT_LOGGING_TO_API_ENABLED: False}):  # no API here to send the hook's log line to
        delete_cluster_jobs(distill_pipeline, flow_run, Cancelling())

    assert [name for _, name in k8s.jobs] == [others["metadata"]["name"]]  # another run's job is left alone
    wait_for(lambda: not any(group_alive(g) for g in groups))



@pytest.mark.slow
def test_a_flow_run_killed_by_sigterm_deletes_its_trainjob_and_no_pod_survives(k8s, tmp_path):
    # what a worker does to a flow run it cancels or stops: SIGTERM, which Prefect turns into a
    # TerminationSignal in the flow run's main thread, where the task waits on the TrainJob
    import os
    import signal

    from prefect import flow, task
    from prefect.exceptions import TerminationSignal
    from prefect.runtime import flow_run
    from prefect.testing.utilities import prefect_test_harness

    from tasks.cluster import delete_cluster_jobs

    cfg = cluster_config(k8s, tmp_path, env={"FAKE_MODE": "sleep"})
    job = train_job(tmp_path)

    def on_line(line: str) -> None:
        if line.endswith("sleeping"):
            os.kill(os.getpid(), signal.SIGTERM)

    @task
    def train_on_the_cluster() -> None:
        kubeflow.run_trainjob(job, cfg, nodes=2, num_processes=1, on_line=on_line, labels={kubeflow.FLOW_RUN_LABEL: str(flow_run.id)})

    @flow(on_crashed=[delete_cluster_jobs], on_cancellation=[delete_cluster_jobs])
    def stage(config: dict) -> None:
        train_on_the_cluster()

    config = load_config("demo-tiny", [f"work_dir={tmp_path}/work"]).model_dump(mode="json")
    config["distill"].update(engine="kubeflow", kubeflow=cfg.model_dump(mode="json"))
    # Prefect re-sends the SIGTERM to the handler it found once the flow run has crashed: a no-op
    # here, where the default would end pytest
    before = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        with prefect_test_harness(server_startup_timeout=180), pytest.raises(TerminationSignal):
            stage(config)  # the flow run ends Crashed, its on_crashed hook run
    finally:
        signal.signal(signal.SIGTERM, before)
    assert k8s.jobs == {} and len(k8s.created) == 1
    groups = k8s.process_groups()
    assert len(groups) == 2
    wait_for(lambda: not any(group_alive(g) for g in groups))
