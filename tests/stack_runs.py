"""Drive a local stack (``scripts/stack.py``) from outside, as a person at the Prefect UI would: bring it
up in a folder of its own, start runs of the ``nightly`` deployment, read their states and logs,
cancel them, find the processes each run started, and read their MLflow runs' statuses.

Shared by ``tests/e2e/test_stack_faults.py`` and ``scripts/fault_campaign.py`` (``--only cancel,restart``).
Only the HTTP APIs and ``/proc`` are used: no Prefect or MLflow client state in the calling process.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil

from tests.e2e.stack_support import alive, api, clean_env

REPO = Path(__file__).resolve().parent.parent
FINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
CHECKPOINT = r"distill: checkpoint at step (\d+) saved"  # what training logs at each checkpoint (rank 0)
# a run long enough in training to be stopped in the middle, short enough for CI: distill trains 1500 steps
# (about 40 s on two busy cores) on two torchrun workers, with a checkpoint every 50 to resume from; no baseline
FAULT_SETTINGS = (
    "distill.launcher=torchrun", "distill.num_processes=2", "distill.steps=1500", "distill.save_every=50",
    "distill.log_every=50", "distill.eval_every=300", "evaluate.baseline=false",
)


def stack_env(state: Path) -> dict[str, str]:
    """The stack tests' environment for ``stack.py`` (:func:`tests.e2e.stack_support.clean_env`), one
    torch thread per process: a campaign runs several stages at once on two cores."""
    return {**clean_env(state), "OMP_NUM_THREADS": "1"}


def stack_command(state: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "stack.py"), "--state-dir", str(state), *args],
        env=stack_env(state), cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False,
    )


def up(state: Path, *settings: str) -> subprocess.CompletedProcess:
    """``stack.py up`` on free ports, preset demo-tiny with ``settings`` (``key=value``), schedule paused."""
    sets = [f"--set={s}" for s in (f"demo.cache_dir={state / 'demo-cache'}", *settings)]
    return stack_command(state, "up", "--prefect-port", "0", "--mlflow-port", "0", "--s3-port", "0", "--bucket", "faults",
                         "--preset", "demo-tiny", "--no-schedule", *sets)


class StackRuns:
    """Runs of the ``nightly`` deployment on the stack whose state is in ``state``."""

    def __init__(self, state: Path) -> None:
        self.dir = state
        self.info = json.loads((state / "stack.json").read_text())
        self.api_url, self.mlflow_url = self.info["prefect_api_url"], self.info["mlflow_tracking_uri"]

    def api(self, path: str, body: dict | None = None) -> Any:
        """The Prefect REST API, with :func:`tests.e2e.stack_support.api`'s retries (a loaded server answers 503)."""
        return api(self.api_url + path, body)

    def trigger(self, name: str, **overrides: Any) -> str:
        """Start a run of ``nightly`` named ``name`` (its own work dir and MLflow run name), with the
        deployment's config changed by ``overrides`` (``demo__num_prompts=2000``: ``__`` for a dot); its id."""
        (deployment,) = [d for d in self.api("/deployments/filter", {}) if d["name"] == "nightly"]
        config = copy.deepcopy(deployment["parameters"]["config"])
        config["name"], config["work_dir"] = name, config["work_dir"].rsplit("/", 1)[0] + "/" + name
        for key, value in overrides.items():
            *path, last = key.split("__")
            section = config
            for part in path:
                section = section.setdefault(part, {})
            section[last] = value
        return self.api(f"/deployments/{deployment['id']}/create_flow_run", {"parameters": {"config": config}})["id"]

    def state(self, flow_run_id: str) -> dict[str, Any]:
        return self.api(f"/flow_runs/{flow_run_id}")["state"]

    def logs(self, flow_run_id: str) -> list[str]:
        """The run's last 200 log lines, oldest first."""
        found = self.api("/logs/filter", {"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "sort": "TIMESTAMP_DESC", "limit": 200})
        return [entry["message"] for entry in reversed(found)]

    def wait_for_log(self, flow_run_id: str, pattern: str, timeout: float) -> re.Match:
        """The first log line of the run matching ``pattern``; fails if the run ends first or time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.logs(flow_run_id):
                if found := re.search(pattern, line):
                    return found
            state = self.state(flow_run_id)["type"]
            if state in FINAL:
                raise AssertionError(f"the run ended {state} before a log line matching {pattern!r}{self.tail()}")
            time.sleep(1)
        raise AssertionError(f"no log line matching {pattern!r} within {timeout:.0f} s{self.tail()}")

    def wait_for_task(self, flow_run_id: str, task: str, timeout: float) -> None:
        """Until the run's task named ``task`` (``generate``, ``distill``, ``evaluate``…) is RUNNING."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.api("/task_runs/filter", {
                "flow_runs": {"id": {"any_": [flow_run_id]}},
                "task_runs": {"name": {"any_": [task]}, "state": {"type": {"any_": ["RUNNING"]}}},
            })
            if found:
                return
            state = self.state(flow_run_id)["type"]
            if state in FINAL:
                raise AssertionError(f"the run ended {state} before its {task} task ran{self.tail()}")
            time.sleep(0.5)
        raise AssertionError(f"the run's {task} task did not start within {timeout:.0f} s{self.tail()}")

    def in_stage(self, flow_run_id: str, task: str, timeout: float = 480) -> int | None:
        """Wait until the run is in the middle of ``task``: for ``distill``, until its first checkpoint
        is saved with both torchrun workers running (returns the checkpoint's step); else until the
        task runs, and a second more."""
        if task != "distill":
            self.wait_for_task(flow_run_id, task, timeout)
            time.sleep(1)
            return None
        step = int(self.wait_for_log(flow_run_id, CHECKPOINT, timeout)[1])
        commands = self.processes(flow_run_id).values()
        workers = [cmd for cmd in commands if "-m mydistill.train" in cmd and "torch.distributed.run" not in cmd]
        assert len(workers) == 2 and any("torch.distributed.run" in cmd for cmd in commands), list(commands)
        return step

    def gone(self, flow_run_id: str, processes: dict[int, str], within: float) -> list[str]:
        """Wait up to ``within`` seconds for ``processes`` (recorded before) and every other process of
        the run to end; the command lines of those still alive."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline and (any(alive(pid) for pid in processes) or self.processes(flow_run_id)):
            time.sleep(0.5)
        return [cmd for pid, cmd in processes.items() if alive(pid)] + list(self.processes(flow_run_id).values())

    def cancel(self, flow_run_id: str) -> dict[str, Any]:
        """What the UI's Cancel button does: propose CANCELLING; the worker then stops the run's process."""
        return self.api(f"/flow_runs/{flow_run_id}/set_state", {"state": {"type": "CANCELLING", "name": "Cancelling"}})

    def wait_final(self, flow_run_id: str, timeout: float) -> dict[str, Any]:
        """The run's state once final (COMPLETED, FAILED, CRASHED, CANCELLED), or its state at the deadline.
        A server down for a moment is waited for."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                state = self.state(flow_run_id)
            except OSError:
                state = {"type": "UNREACHABLE", "name": "server unreachable", "message": ""}
            if state["type"] in FINAL or time.monotonic() > deadline:
                return state
            time.sleep(1)

    def processes(self, flow_run_id: str) -> dict[int, str]:
        """pid → command line of every process of this user started for the flow run: the worker gives
        the run's process PREFECT__FLOW_RUN_ID, which its launcher and training workers inherit. Found
        by environment, not by parentage: a process orphaned (reparented) is still found."""
        found = {}
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                if p.environ().get("PREFECT__FLOW_RUN_ID") == flow_run_id and p.status() != psutil.STATUS_ZOMBIE:
                    found[p.pid] = " ".join(p.info["cmdline"] or [])
            except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
                continue
        return found

    def mlflow_runs(self, flow_run_id: str, experiment: str = "mydistill-demo-tiny") -> dict[str, str]:
        """Status of the flow run's MLflow runs, read from the server: ``pipeline`` for the parent, the
        stage's name for each child."""
        exp = self._mlflow("experiments/get-by-name?" + urllib.parse.urlencode({"experiment_name": experiment}))["experiment"]
        search = {"experiment_ids": [exp["experiment_id"]], "max_results": 100}
        parents = self._mlflow("runs/search", {**search, "filter": f"tags.`prefect.flow_run_id` = '{flow_run_id}'"}).get("runs", [])
        assert len(parents) == 1, f"{len(parents)} MLflow pipeline runs tagged with flow run {flow_run_id}"
        parent = parents[0]
        children = self._mlflow("runs/search", {**search, "filter": f"tags.`mlflow.parentRunId` = '{parent['info']['run_id']}'"})
        statuses = {"pipeline": parent["info"]["status"]}
        for child in children.get("runs", []):
            tags = {t["key"]: t["value"] for t in child["data"].get("tags", [])}
            statuses[tags.get("mydistill.stage", child["info"]["run_id"])] = child["info"]["status"]
        return statuses

    def _mlflow(self, path: str, body: dict | None = None) -> Any:
        request = urllib.request.Request(
            f"{self.mlflow_url}/api/2.0/mlflow/{path}", data=json.dumps(body).encode() if body is not None else None,
            headers={"content-type": "application/json"}, method="POST" if body is not None else "GET",
        )
        with urllib.request.urlopen(request, timeout=30) as r:
            return json.loads(r.read())

    def worker_polls_after(self, flow_run_id: str, within: float = 120, pool: str = "mydistill-cpu") -> bool:
        """Whether a worker of ``pool`` sends a heartbeat to the server after the run ended, within
        ``within`` seconds: the pool still has a worker for the next run (a Prefect worker stops itself
        after a long enough outage; the stack starts it again)."""
        ended = datetime.fromisoformat(self.api(f"/flow_runs/{flow_run_id}")["end_time"])
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            workers = self.api(f"/work_pools/{pool}/workers/filter", {})
            if any(w.get("last_heartbeat_time") and datetime.fromisoformat(w["last_heartbeat_time"]) > ended for w in workers):
                return True
            time.sleep(2)
        return False

    def worker_pid(self) -> int:
        return json.loads((self.dir / "stack.json").read_text())["processes"]["worker-cpu"]["pid"]

    def tail(self, name: str = "worker-cpu", lines: int = 30) -> str:
        path = self.dir / "logs" / f"{name}.log"
        text = path.read_text(errors="replace").splitlines()[-lines:] if path.exists() else ["(no log)"]
        return f"; last lines of {path.name}:\n  " + "\n  ".join(text)
