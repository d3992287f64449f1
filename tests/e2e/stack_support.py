"""The local operations stack (``scripts/stack.py``) brought up for a test module, and the small
helpers the stack tests share: the Prefect and MLflow REST APIs, process checks, logs."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import tenacity

REPO = Path(__file__).resolve().parents[2]
TERMINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


def clean_env(state: Path) -> dict[str, str]:
    """This process's environment without the test session's Prefect/MLflow/S3 settings."""
    drop = ("PREFECT_", "MLFLOW_", "AWS_", "MYDISTILL_S3_", "MYDISTILL_CREDENTIALS")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(
        PREFECT_WORKER_QUERY_SECONDS="2",  # pick the run up quickly
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120",
        AWS_SHARED_CREDENTIALS_FILE=str(state / "no-aws-credentials"), AWS_CONFIG_FILE=str(state / "no-aws-config"),
        AWS_EC2_METADATA_DISABLED="true",
        MYDISTILL_PROGRESS_EVERY_S="5",  # a run of minutes: progress every 5 s, not every 30
    )
    return env


@contextlib.contextmanager
def running_stack(state: Path, up_args: list[str]) -> Iterator[tuple[dict[str, Any], str]]:
    """``stack.py up`` with free loopback ports, state in ``state``; yields (``stack.json`` with
    ``state`` added, up's stdout). Taken down afterwards, also when the test failed, and then no
    process it started may still run."""
    env = clean_env(state)
    cmd = [sys.executable, str(REPO / "scripts" / "stack.py"), "--state-dir", str(state)]
    info = None
    try:
        up = subprocess.run(
            [*cmd, "up", "--prefect-port", "0", "--mlflow-port", "0", "--s3-port", "0", *up_args],
            env=env, cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
        )
        assert up.returncode == 0, f"stack up failed:\n{up.stdout}\n{up.stderr}"
        info = {**json.loads((state / "stack.json").read_text()), "state": state}
        yield info, up.stdout
    finally:
        down = subprocess.run([*cmd, "down"], env=env, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
        print(down.stdout, down.stderr)
        if info is not None:
            left = [f"{name} (pid {p['pid']})" for name, p in info["processes"].items() if alive(p["pid"])]
            assert not left, f"still running after stack down: {left}"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and ") Z" not in stat.read_text()


def api(url: str, body: dict | None = None) -> Any:
    """GET ``url``, or POST ``body`` as JSON to it; the decoded answer (None for an empty one)."""
    request = urllib.request.Request(
        url, data=json.dumps(body).encode() if body is not None else None,
        headers={"content-type": "application/json"}, method="POST" if body is not None else "GET",
    )
    # a Prefect server on a loaded 2-core machine sometimes answers 503 (or drops the connection): try again
    for attempt in tenacity.Retrying(
        retry=tenacity.retry_if_exception(_transient), wait=tenacity.wait_exponential(multiplier=1, max=10),
        stop=tenacity.stop_after_attempt(6), reraise=True,
    ):
        with attempt, urllib.request.urlopen(request, timeout=30) as r:
            text = r.read()
            return json.loads(text) if text else None
    raise AssertionError("unreachable")


def _transient(error: BaseException) -> bool:
    if isinstance(error, urllib.error.HTTPError):
        return error.code in (502, 503, 504)
    return isinstance(error, (urllib.error.URLError, ConnectionError, TimeoutError))


def wait_for_flow_run(stack: dict[str, Any], flow_run_id: str, timeout_s: float) -> dict[str, Any]:
    """The flow run once it reached a final state (or ``timeout_s`` passed: then as it is)."""
    deadline = time.monotonic() + timeout_s
    while True:
        run = api(f"{stack['prefect_api_url']}/flow_runs/{flow_run_id}")
        if run["state"]["type"] in TERMINAL or time.monotonic() > deadline:
            return run
        time.sleep(3)


def flow_run_messages(stack: dict[str, Any], flow_run_id: str) -> list[str]:
    """Every log line of a flow run (its tasks' included), oldest first, read through the Prefect API."""
    messages: list[str] = []
    while True:
        page = api(f"{stack['prefect_api_url']}/logs/filter", {
            "logs": {"flow_run_id": {"any_": [flow_run_id]}}, "sort": "TIMESTAMP_ASC", "limit": 200, "offset": len(messages),
        })
        messages += [entry["message"] for entry in page]
        if len(page) < 200:
            return messages


def tail(stack: dict[str, Any], name: str, lines: int = 40) -> str:
    """The last lines of one stack process's log (``worker-cpu``, ``worker-gpu``, ``mlflow`` …)."""
    path = stack["state"] / "logs" / f"{name}.log"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else "(no log)"
