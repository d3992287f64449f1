"""MLflow down at registration (tests/faulty_proxy.py in front of an MLflow server), through the CLI:
the run fails in one line naming the tracking server; the re-run, whose registration request
reaches the server but whose answer is lost (so MLflow's client sends it again), still ends with
exactly one model version."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.conftest import REPO, _free_port
from tests.faulty_proxy import FaultyProxy


@pytest.fixture
def mlflow_server(tmp_path):
    port = _free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path}/server.db", "--artifacts-destination", str(tmp_path / "artifacts")],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(f"{url}/health", timeout=1)
                break
            except Exception:
                if proc.poll() is not None:
                    pytest.fail("the MLflow server did not start")
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.slow
def test_mlflow_down_at_registration_fails_in_one_line_and_the_rerun_registers_once(mlflow_server, tmp_path):
    with FaultyProxy(mlflow_server) as proxy:
        env = {
            **os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": proxy.endpoint, "PREFECT_HOME": str(tmp_path / "prefect"),
            # MLflow's client gives up after two quick retries instead of minutes of them
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
        }
        args = [sys.executable, "-m", "flows.cli", "run", "demo-tiny", f"work_dir={tmp_path}/runs", f"demo.cache_dir={tmp_path}/cache",
                "registry.model_name=down-student", "tracking.experiment=down"]

        proxy.schedule = lambda i, line: "503" if "/model-versions/create" in line else None
        first = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        out = first.stdout + first.stderr
        assert first.returncode == 2, out[-3000:]
        errors = [line for line in out.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and f"MLflow at {proxy.endpoint}" in errors[0] and "HTTP 503 from " in errors[0] and "/api/2.0/mlflow/model-versions/create" in errors[0], errors
        assert "Traceback" not in out
        # the flow run's own state (what the Prefect UI shows) carries the same line, not MLflow's raw exception
        failed = [line for line in out.splitlines() if "Finished in state Failed(" in line]
        assert any(f"TrackingUnavailable: MLflow at {proxy.endpoint}" in line for line in failed), failed

        lost = {"n": 0}

        def lose_the_first_answer(i: int, line: str) -> str | None:
            if "/model-versions/create" in line:
                lost["n"] += 1
                return "lost" if lost["n"] == 1 else None
            return None

        proxy.schedule = lose_the_first_answer
        second = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        out = second.stdout + second.stderr
        assert second.returncode == 0, out[-3000:]
        assert lost["n"] == 2, "MLflow's client sent the create again after the lost answer"

    import mlflow

    versions = mlflow.MlflowClient(tracking_uri=mlflow_server).search_model_versions("name = 'down-student'")
    assert [v.version for v in versions] == ["1"], [(v.version, v.tags.get("mydistill.student_sha256")) for v in versions]
    assert "registered down-student version" in out
