"""Two `mydistill run`s of one config and work dir started together (last night's run still going
when tonight's starts; two people pressing "Run"): both end well, each stage is trained once, one
model version is registered, nothing is left half-written or running."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil
import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_two_cli_runs_started_together_train_each_stage_once_and_register_once(tmp_path):
    env = {
        **os.environ, "PYTHONPATH": str(REPO),
        # one MLflow store and one Prefect home, fresh, shared by both runs as on one machine
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db", "PREFECT_HOME": str(tmp_path / "prefect"),
    }
    args = [
        sys.executable, "-m", "flows.cli", "run", "demo-tiny", f"work_dir={tmp_path}/runs",
        f"demo.cache_dir={tmp_path}/cache", "registry.model_name=overlap-student", "tracking.experiment=overlap",
    ]
    runs = [subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [run.communicate(timeout=900)[0] for run in runs]
    for run, out in zip(runs, outputs):
        assert run.returncode == 0, out[-3000:]
        assert "pipeline finished" in out

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    versions = client.search_model_versions("name = 'overlap-student'")
    assert len(versions) == 1, [(v.version, v.run_id) for v in versions]
    assert sum("registered overlap-student version 1" in out for out in outputs) == 2

    # each training stage trained once: the other run found its checkpoint (Prefect's cache, or the
    # stage's lock then its manifest: its MLflow run is tagged reused)
    experiment = client.get_experiment_by_name("overlap")
    stage_runs = client.search_runs([experiment.experiment_id], "tags.mlflow.parentRunId != ''", max_results=100)
    for stage in ("distill", "finetune", "baseline"):
        trained = [r for r in stage_runs if r.data.tags.get("mydistill.stage") == stage and r.data.tags.get("mydistill.reused") != "true"]
        assert len(trained) == 1, (stage, [r.info.run_id for r in trained])
    assert {r.info.status for r in stage_runs} == {"FINISHED"}

    # nothing half-written, one artifact per stage, no process of either run left
    leftovers = [os.path.join(d, f) for d, dirs, files in os.walk(tmp_path / "runs") for f in files + dirs if ".tmp-" in f]
    assert leftovers == []
    time.sleep(1)
    alive = [p.info for p in psutil.process_iter(["pid", "cmdline"]) if str(tmp_path) in " ".join(p.info["cmdline"] or [])]
    assert alive == []
