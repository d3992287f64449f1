"""The nightly deployment run by the local stack's workers, on both pools, and twice at once.

One stack for the module (``scripts/stack.py up --gpu-worker --worker-limit 2``: moto S3, an MLflow
server, a Prefect server, a process worker on ``mydistill-cpu`` and one on ``mydistill-gpu``, each
running up to two flow runs), with the ``demo-tiny`` preset as the deployments' parameters; the flow
runs are created through the Prefect API as the UI's Run button does.

1. Two pools: the pipeline's flow run, with ``training_flow_runs: true``, runs on the CPU pool and
   sends distill, finetune and baseline to their deployments on the GPU pool as child flow runs;
   the GPU worker runs those and nothing else; the student is registered in MLflow.
2. Two runs at once: two flow runs of ``nightly`` with the same parameters, the second created while
   the first runs. Both complete; the second waits on a lock the first holds (its log says so);
   each training stage is trained once; one model version is registered.

What the simulation leaves out: both pools are process pools on this one machine (on a cluster, a
Kubernetes pool whose flow runs are pods on other nodes, the GPU pool's on GPU nodes), so the
workers share one file system, one CPU and the demo teacher's cache folder; the artifacts are on
moto's S3 in memory; there is no GPU (the GPU pool trains on the CPU).
"""

from __future__ import annotations

import copy
import re
import time
import urllib.parse

import psutil
import pytest

from tests.e2e.stack_support import api, flow_run_messages, running_stack, tail, wait_for_flow_run

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(1500)]

BUCKET = "pools"
RUN_TIMEOUT_S = 900  # the first run trains the demo teacher too (about 3 minutes on a busy 2-core machine)
TRAINING_DEPLOYMENTS = ("distill", "finetune", "baseline")


@pytest.fixture(scope="module")
def stack(tmp_path_factory, demo_cache):
    up_args = [
        "--bucket", BUCKET, "--preset", "demo-tiny", "--set", f"demo.cache_dir={demo_cache}", "--no-schedule",
        "--gpu-worker", "--worker-limit", "2",
    ]
    with running_stack(tmp_path_factory.mktemp("stack"), up_args) as (info, up_stdout):
        assert "pool mydistill-gpu: signal, distill, finetune, baseline (worker started here)" in up_stdout, up_stdout
        yield info


def _deployments(stack) -> dict[str, dict]:
    return {d["name"]: d for d in api(f"{stack['prefect_api_url']}/deployments/filter", {})}


def _run_nightly(stack, config: dict, name: str) -> dict:
    """A flow run of the nightly deployment with ``config`` as its parameter, as the UI's Custom run makes it."""
    nightly = _deployments(stack)["nightly"]
    return api(f"{stack['prefect_api_url']}/deployments/{nightly['id']}/create_flow_run", {
        "name": name, "parameters": {"config": config}, "state": {"type": "SCHEDULED"},
    })


def _flow_runs(stack, **filters) -> list[dict]:
    return api(f"{stack['prefect_api_url']}/flow_runs/filter", {**filters, "limit": 200})


def _task_run_names(stack, flow_run_id: str) -> list[str]:
    runs = api(f"{stack['prefect_api_url']}/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}, "limit": 200})
    return [r["name"] for r in runs]


def _mlflow(stack, path: str, body: dict | None = None):
    return api(f"{stack['mlflow_tracking_uri']}/api/2.0/mlflow/{path}", body)


def _mlflow_runs(stack, experiment: str, filter_string: str = "") -> list[dict]:
    exp = _mlflow(stack, f"experiments/get-by-name?experiment_name={urllib.parse.quote(experiment)}")["experiment"]
    found = _mlflow(stack, "runs/search", {"experiment_ids": [exp["experiment_id"]], "filter": filter_string, "max_results": 500})
    return found.get("runs", [])


def _tags(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def _model_versions(stack, name: str) -> list[dict]:
    query = urllib.parse.quote(f"name='{name}'")
    return _mlflow(stack, f"model-versions/search?filter={query}").get("model_versions", [])


def _is_worker(process: psutil.Process) -> bool:
    """A Prefect worker itself (the stack runs each under ``stack.py supervise``), not a flow run of it."""
    cmd = process.cmdline()
    return "worker" in cmd and "start" in cmd and any(part.endswith("prefect") for part in cmd[:3])


def _no_flow_run_processes_left(stack) -> None:
    """The workers' flow-run processes (and theirs: training workers) have all ended."""
    supervisors = [stack["processes"][name]["pid"] for name in ("worker-cpu", "worker-gpu")]
    deadline = time.monotonic() + 60
    while True:
        left = [f"{p.pid} {' '.join(p.cmdline()[:4])}" for pid in supervisors for p in psutil.Process(pid).children(recursive=True)
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE and not _is_worker(p)]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert left == [], f"flow-run processes still running after their runs ended: {left}"


def test_the_pipeline_runs_on_the_cpu_pool_and_each_training_stage_on_the_gpu_pool(stack):
    deployments = _deployments(stack)
    config = copy.deepcopy(deployments["nightly"]["parameters"]["config"])
    config["training_flow_runs"] = True
    created = _run_nightly(stack, config, "two-pools")
    run = wait_for_flow_run(stack, created["id"], RUN_TIMEOUT_S)
    assert run["state"]["type"] == "COMPLETED", (
        f"{run['state']}\nCPU worker:\n{tail(stack, 'worker-cpu')}\nGPU worker:\n{tail(stack, 'worker-gpu')}")
    assert run["work_pool_name"] == "mydistill-cpu" and run["deployment_id"] == deployments["nightly"]["id"]

    # each training stage: one child flow run of its deployment, on the GPU pool, completed
    children = _flow_runs(stack, flow_runs={"parent_flow_run_id": {"any_": [run["id"]]}})
    by_deployment = {d["id"]: name for name, d in deployments.items()}
    started = sorted(by_deployment.get(c["deployment_id"], "(none)") for c in children)
    assert started == sorted(TRAINING_DEPLOYMENTS), [(c["name"], c["deployment_id"]) for c in children]
    for child in children:
        assert (child["work_pool_name"], child["state"]["type"]) == ("mydistill-gpu", "COMPLETED"), child
        stage = by_deployment[child["deployment_id"]]
        assert stage in _task_run_names(stack, child["id"]), stage  # the train task ran there, named by its stage

    # the GPU worker ran those three and nothing else; the rest ran in the pipeline's own flow run
    on_gpu_pool = _flow_runs(stack, work_pools={"name": {"any_": ["mydistill-gpu"]}})
    assert sorted(r["id"] for r in on_gpu_pool) == sorted(c["id"] for c in children)
    submitted = set(re.findall(r"flow run '([0-9a-f-]{36})'", (stack["state"] / "logs" / "worker-gpu.log").read_text()))
    assert submitted == {c["id"] for c in children}, submitted
    in_pipeline = _task_run_names(stack, run["id"])
    assert {"generate", "mix", "evaluate", "register"} <= set(in_pipeline), in_pipeline
    assert not set(TRAINING_DEPLOYMENTS) & set(in_pipeline), in_pipeline  # no training task in the CPU-pool run

    # MLflow: the pipeline's run (tagged with this flow run), its training stages, the student registered from it
    experiment = config["tracking"]["experiment"]
    (parent,) = _mlflow_runs(stack, experiment, f"tags.`prefect.flow_run_id` = '{run['id']}'")
    parent_id = parent["info"]["run_id"]
    stage_runs = _mlflow_runs(stack, experiment, f"tags.`mlflow.parentRunId` = '{parent_id}'")
    assert {_tags(r).get("mydistill.stage") for r in stage_runs} >= {*TRAINING_DEPLOYMENTS, "register"}
    register_runs = {r["info"]["run_id"] for r in stage_runs if _tags(r).get("mydistill.stage") == "register"}
    versions = _model_versions(stack, config["registry"]["model_name"])
    ours = [v for v in versions if {t["key"]: t["value"] for t in v.get("tags", [])}.get("mydistill.register_run_id") in register_runs]
    assert len(ours) == 1, versions
    assert _tags(parent).get("mydistill.gate") == "passed"
    _no_flow_run_processes_left(stack)


def test_two_nightly_runs_at_once_train_each_stage_once_and_register_once(stack):
    config = copy.deepcopy(_deployments(stack)["nightly"]["parameters"]["config"])
    # its own work dir, experiment and model, so that the test above (or a re-run) leaves nothing to reuse
    config.update(name="overlap", work_dir=f"s3://{BUCKET}/runs/overlap")
    config["registry"]["model_name"] = "overlap-student"
    config["tracking"]["experiment"] = "overlap"

    first = _run_nightly(stack, config, "overlap-first")
    deadline = time.monotonic() + 120
    while (state := api(f"{stack['prefect_api_url']}/flow_runs/{first['id']}")["state"]["type"]) in ("SCHEDULED", "PENDING"):
        assert time.monotonic() < deadline, f"the first run did not start; CPU worker:\n{tail(stack, 'worker-cpu')}"
        time.sleep(0.5)
    assert state == "RUNNING", state
    second = _run_nightly(stack, config, "overlap-second")

    runs = [wait_for_flow_run(stack, r["id"], RUN_TIMEOUT_S) for r in (first, second)]
    for run in runs:
        assert run["state"]["type"] == "COMPLETED", f"{run['name']}: {run['state']}\nCPU worker:\n{tail(stack, 'worker-cpu')}"
        assert run["work_pool_name"] == "mydistill-cpu"
    started = sorted(run["start_time"] for run in runs)
    assert runs[1]["start_time"] < runs[0]["end_time"], started  # they did overlap

    # the second waited on a lock the first held, then went on from the first's artifact
    second_log = flow_run_messages(stack, second["id"])
    waited = [line for line in second_log if re.match(r"^[\w -]+: \S+\.lock is held by pid \d+ on .*; waiting for it to finish$", line)]
    assert waited, "\n".join(second_log)
    print("the second run waited:", *waited, sep="\n  ")
    assert len([line for line in second_log if re.match(r"^[\w -]+: \S+\.lock is ours after \d+ s$", line)]) == len(waited)

    # each training stage trained once (the other run found the checkpoint: its MLflow run is tagged
    # reused, or Prefect's cache answered and it made none); one model version for the student
    stage_runs = _mlflow_runs(stack, "overlap", "tags.`mlflow.parentRunId` != ''")
    for stage in TRAINING_DEPLOYMENTS:
        trained = [r for r in stage_runs if _tags(r).get("mydistill.stage") == stage and _tags(r).get("mydistill.reused") != "true"]
        assert len(trained) == 1, (stage, [r["info"]["run_id"] for r in trained])
    assert {r["info"]["status"] for r in stage_runs} == {"FINISHED"}
    versions = _model_versions(stack, "overlap-student")
    assert len(versions) == 1, [(v["version"], v["run_id"]) for v in versions]
    parents = _mlflow_runs(stack, "overlap", "tags.`prefect.flow_run_id` != ''")
    assert sorted(_tags(p)["prefect.flow_run_id"] for p in parents) == sorted(r["id"] for r in runs)
    assert {_tags(p).get("mydistill.gate") for p in parents} == {"passed"}

    # neither run touched the GPU pool (training_flow_runs is off in these parameters)
    assert not any(r["work_pool_name"] == "mydistill-gpu" for r in _flow_runs(stack, flow_runs={"parent_flow_run_id": {"any_": [r["id"] for r in runs]}}))
    _no_flow_run_processes_left(stack)
