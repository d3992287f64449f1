"""A fault campaign: each fault the pipeline handles, injected at several points, counting the trials
in which what must hold held. Runs `mydistill run demo-tiny` through the CLI, as a user would.

    PYTHONPATH=$PWD .venv/bin/python scripts/fault_campaign.py [--only overlap,s3,disk,mlflow,cancel,restart] [--match TEXT] [--out DIR]

What must hold, per fault:

* **overlap**: two runs of one config and work dir, the second started 0 / 8 / 20 s after the first:
  both exit 0, one model version, each training stage trained by one run (the other reused it).
* **s3**: an S3 outage (503 to everything, behind tests/faulty_proxy.py) from the first write of the
  generate / mix / distill stage on: the run exits 2 with one ``error:`` line naming the
  bucket; the re-run, on a store failing one request in five (500, 503, reset, timeout), exits 0
  and its records match their manifests.
* **disk**: a 16 MiB tmpfs filled while a shard, a periodic checkpoint, the final model is written:
  ``DiskFull`` naming the path; the last checkpoint intact; the re-run resumes and finishes. Needs root.
* **mlflow**: the MLflow server (behind the proxy) answers 503 to model-version creation, or loses
  the answer to it (the client sends it again), or answers 503 to distill's metrics from step 6 on
  (after its step-4 checkpoint; the re-run must resume from it):
  the run exits 2 with one line naming MLflow, or completes; the re-run exits 0 with exactly one
  model version.
* **cancel** (on a stack, ``scripts/stack.py up``, as tests/e2e/test_stack_faults.py brings up): a
  ``nightly`` run cancelled as the Prefect UI does, during generation, training (after a checkpoint,
  two torchrun workers) or evaluation: CANCELLED and no process of the run left within 45 s, its
  MLflow pipeline run and that stage's run KILLED, none RUNNING; a new run completes (and, cancelled
  in training, resumes from the checkpoint).
* **restart**: the stack's Prefect server stopped and started again 20 s later (``stack.py restart
  prefect --down-for 20``) during generation, training or evaluation, and 90 s later (longer than
  the Prefect client's retries) during training: the run completes, or ends in
  a state from which a new run completes; no process of it outlives it; the worker lives on; no
  MLflow run left RUNNING. The trial's line says which.

Prints one line per trial and a table of held / tried per fault. A trial that did not hold says why.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.faulty_proxy import FaultyProxy  # noqa: E402
from tests.stack_runs import FAULT_SETTINGS, StackRuns, alive, stack_command, up  # noqa: E402


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Campaign:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.cache = root / "demo-cache"  # the demo teacher, trained once for every trial
        self.results: dict[str, list[tuple[str, bool, str]]] = {}
        self.match: str | None = None  # --match: only the trials whose "fault point" holds this text

    def env(self, trial: Path, **extra: str) -> dict[str, str]:
        return {
            **os.environ, "PYTHONPATH": str(REPO), "PREFECT_HOME": str(trial / "prefect"),
            "MLFLOW_TRACKING_URI": f"sqlite:///{trial}/mlflow.db", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
            **extra,
        }

    def args(self, work_dir: str, *more: str) -> list[str]:
        return [sys.executable, "-m", "flows.cli", "run", "demo-tiny", f"work_dir={work_dir}", f"demo.cache_dir={self.cache}",
                "registry.model_name=campaign-student", "tracking.experiment=campaign", *more]

    def run(self, args: list[str], env: dict[str, str], log: Path) -> tuple[int, str]:
        out = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
        text = out.stdout + out.stderr
        log.write_text(text)
        return out.returncode, text

    def trial(self, fault: str, point: str, check: Callable[[Path], str | None]) -> None:
        if self.match and self.match not in f"{fault} {point}":
            return
        trial = self.root / f"{fault}-{point}-{uuid.uuid4().hex[:6]}"
        trial.mkdir(parents=True)
        started = time.perf_counter()
        try:
            held, why = True, check(trial) or ""
        except AssertionError as e:
            held, why = False, str(e)[:300]
        except Exception as e:  # noqa: BLE001 - a campaign records every outcome
            held, why = False, f"{type(e).__name__}: {e}"[:300] + "\n" + traceback.format_exc()[-800:]
        self.results.setdefault(fault, []).append((point, held, why))
        print(f"{fault:8s} {point:22s} {'held' if held else 'DID NOT HOLD'} ({time.perf_counter() - started:.0f} s) {why}", flush=True)

    # ------------------------------------------------------------------------------------------

    def versions(self, tracking_uri: str) -> list[str]:
        import mlflow

        return [v.version for v in mlflow.MlflowClient(tracking_uri=tracking_uri).search_model_versions("name = 'campaign-student'")]

    def overlap(self, delay_s: float) -> Callable[[Path], None]:
        def check(trial: Path) -> None:
            env = self.env(trial)
            args = self.args(str(trial / "runs"))
            first = subprocess.Popen(args, cwd=REPO, env=env, stdout=open(trial / "run1.log", "w"), stderr=subprocess.STDOUT)
            time.sleep(delay_s)
            second = subprocess.Popen(args, cwd=REPO, env=env, stdout=open(trial / "run2.log", "w"), stderr=subprocess.STDOUT)
            codes = [first.wait(timeout=1200), second.wait(timeout=1200)]
            assert codes == [0, 0], f"exit codes {codes}"
            assert len(self.versions(env["MLFLOW_TRACKING_URI"])) == 1, "versions: " + str(self.versions(env["MLFLOW_TRACKING_URI"]))
            import mlflow

            c = mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
            runs = c.search_runs([c.get_experiment_by_name("campaign").experiment_id], "tags.mlflow.parentRunId != ''", max_results=200)
            for stage in ("distill", "finetune", "baseline"):
                trained = [r for r in runs if r.data.tags.get("mydistill.stage") == stage and r.data.tags.get("mydistill.reused") != "true"]
                assert len(trained) == 1, f"{stage} trained by {len(trained)} runs"
        return check

    def s3(self, endpoint: str, stage: str) -> Callable[[Path], None]:
        def check(trial: Path) -> None:
            work_dir = f"s3://campaign/{trial.name}"
            with FaultyProxy(endpoint, stall_s=1.5) as proxy:
                env = self.env(trial, MYDISTILL_S3_ENDPOINT_URL=proxy.endpoint, MYDISTILL_S3_READ_TIMEOUT="1", MYDISTILL_S3_MAX_ATTEMPTS="4")
                down = {"on": False}

                def outage(i: int, line: str) -> str | None:
                    down["on"] = down["on"] or (line.startswith("PUT") and f"/{stage}-" in line)
                    return "503" if down["on"] else None

                proxy.schedule = outage
                code, text = self.run(self.args(work_dir), env, trial / "run1.log")
                errors = [line for line in text.splitlines() if line.startswith("error:")]
                assert code == 2 and len(errors) == 1 and "S3 bucket 'campaign'" in errors[0], f"first run: exit {code}, {errors}"
                assert "Traceback" not in text, "a traceback in the output"
                proxy.every(5)
                code, text = self.run(self.args(work_dir), env, trial / "run2.log")
                assert code == 0, f"re-run exit {code}: {text[-300:]}"
            from s3fs import S3FileSystem

            from mydistill import io

            os.environ.update(MYDISTILL_S3_ENDPOINT_URL=endpoint)
            S3FileSystem.clear_instance_cache()
            fs, root = io.filesystem(work_dir)
            keys = fs.find(root)
            assert not [k for k in keys if ".tmp-" in k or k.endswith(".lock")], "temporary or lock objects left"
            for d in {k.removeprefix(root + "/").split("/", 1)[0] for k in keys if k.endswith("/manifest.json")}:
                manifest = io.read_manifest(io.join(work_dir, d))
                if d.startswith("generate"):
                    assert io.records_sha256(io.read_records(io.join(work_dir, d))) == manifest["records_sha256"], d
                if d.startswith("mix"):
                    for name, entry in manifest["files"].items():
                        assert io.records_sha256(io.read_records(io.join(work_dir, d, name))) == entry["sha256"], f"{d}/{name}"
            assert len(self.versions(env["MLFLOW_TRACKING_URI"])) == 1
        return check

    def mlflow(self, server: str, point: str) -> Callable[[Path], None]:
        def check(trial: Path) -> None:
            with FaultyProxy(server) as proxy:
                env = self.env(trial, MLFLOW_TRACKING_URI=proxy.endpoint, MLFLOW_HTTP_REQUEST_MAX_RETRIES="2",
                               MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="0")
                model = f"campaign-{trial.name}"
                args = [*self.args(str(trial / "runs"), "distill.save_every=4", "distill.log_every=2"),
                        f"registry.model_name={model}", "tracking.experiment=" + model]
                seen = {"n": 0}

                def schedule(i: int, line: str) -> str | None:
                    if point == "register-503" and "/model-versions/create" in line:
                        return "503"
                    if point == "register-lost" and "/model-versions/create" in line:
                        seen["n"] += 1
                        return "lost" if seen["n"] == 1 else None
                    if point == "training-503" and "/runs/log-batch" in line and (seen["n"] >= 3 or b"tokens_per_s" in proxy.body):
                        seen["n"] += 1  # training's metrics at steps 2, 4 (then a checkpoint), 6: down from step 6 on
                        return "503" if seen["n"] >= 3 else None
                    return None

                proxy.schedule = schedule
                code, text = self.run(args, env, trial / "run1.log")
                errors = [line for line in text.splitlines() if line.startswith("error:")]
                if point == "register-lost":
                    assert code == 0, f"exit {code}: {errors or text[-300:]}"
                else:
                    assert code == 2 and len(errors) == 1 and f"MLflow at {proxy.endpoint}" in errors[0], f"first run: exit {code}, {errors}"
                    assert "Traceback" not in text, "a traceback in the output"
                    proxy.heal()
                    code, text = self.run(args, env, trial / "run2.log")
                    assert code == 0, f"re-run exit {code}: {text[-300:]}"
                    if point == "training-503":
                        assert "distill: resumed from step 4" in text, "distill did not resume from its step-4 checkpoint"
            import mlflow

            versions = mlflow.MlflowClient(tracking_uri=server).search_model_versions(f"name = '{model}'")
            assert len(versions) == 1, f"{len(versions)} versions"
        return check

    def disk(self, point: str) -> Callable[[Path], None]:
        def check(trial: Path) -> None:
            code = subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
                 "tests/mydistill/training/test_disk_full.py", "-k", point],
                cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=600,
            )
            (trial / "pytest.log").write_text(code.stdout + code.stderr)
            assert code.returncode == 0 and " passed" in code.stdout and "skipped" not in code.stdout, code.stdout[-300:]
        return check


# what keeps each stage of a stack run going long enough to be stopped in its middle (the trial's own config):
# the task to wait for, and the overrides (2000 prompts: ~40 s of generation; 600 questions two at a time)
STACK_POINTS = {
    "generation": ("generate", {"demo__num_prompts": 2000}),
    "training": ("distill", {}),
    "evaluation": ("evaluate", {"demo__num_eval": 600, "evaluate__batch_size": 2}),
}
STOPPED_WITHIN_S = 45  # Prefect's worker sends SIGKILL 30 s after its SIGTERM


def stack_cancel(runs: StackRuns, point: str) -> Callable[[Path], str]:
    def check(trial: Path) -> str:
        task, overrides = STACK_POINTS[point]
        name = f"cancel-{point}-{trial.name[-6:]}"
        flow_run = runs.trigger(name, **overrides)
        step = runs.in_stage(flow_run, task)
        processes = runs.processes(flow_run)
        runs.cancel(flow_run)
        cancelled_at = time.monotonic()
        state = runs.wait_final(flow_run, STOPPED_WITHIN_S)
        left = runs.gone(flow_run, processes, STOPPED_WITHIN_S - (time.monotonic() - cancelled_at))
        took = time.monotonic() - cancelled_at
        assert state["type"] == "CANCELLED", f"ended {state['type']} {state.get('message')}"
        assert left == [], f"alive {STOPPED_WITHIN_S} s after the cancel: {left}"
        statuses = runs.mlflow_runs(flow_run)
        assert statuses["pipeline"] == "KILLED" and statuses.get(task) == "KILLED", f"MLflow runs {statuses}"
        assert "RUNNING" not in statuses.values(), f"MLflow runs {statuses}"
        rerun = runs.trigger(name, **overrides)
        resumed = ""
        if step is not None:
            at = int(runs.wait_for_log(rerun, r"distill: resumed from step (\d+)", 600)[1])
            assert at >= step, f"resumed from step {at}, the checkpoint seen before the cancel was {step}"
            resumed = f", re-run resumed from step {at}"
        state = runs.wait_final(rerun, 600)
        assert state["type"] == "COMPLETED", f"re-run ended {state['type']}"
        (trial / "logs.txt").write_text("\n".join(runs.logs(flow_run) + ["---- re-run"] + runs.logs(rerun)))
        return f"CANCELLED, nothing left after {took:.1f} s, MLflow {statuses['pipeline']}{resumed}, re-run COMPLETED"
    return check


def stack_restart(runs: StackRuns, point: str, down_for: int = 20) -> Callable[[Path], str]:
    def check(trial: Path) -> str:
        task, overrides = STACK_POINTS[point]
        name = f"restart-{point}-{trial.name[-6:]}"
        flow_run = runs.trigger(name, **overrides)
        runs.in_stage(flow_run, task)
        processes, worker = runs.processes(flow_run), runs.worker_pid()
        restarted = stack_command(runs.dir, "restart", "prefect", "--down-for", str(down_for), timeout=400)
        assert restarted.returncode == 0, f"stack.py restart: {restarted.stdout[-300:]} {restarted.stderr[-300:]}"
        state = runs.wait_final(flow_run, 900)
        outcome = f"run {state['type']}"
        if state["type"] != "COMPLETED":
            rerun = runs.trigger(name, **overrides)
            again = runs.wait_final(rerun, 900)
            assert again["type"] == "COMPLETED", f"{outcome}; re-run ended {again['type']}"
            outcome += ", re-run COMPLETED"
        left = runs.gone(flow_run, processes, STOPPED_WITHIN_S)
        assert left == [], f"{outcome}; processes of the run outlived it: {left}"
        assert runs.worker_polls_after(flow_run), f"{outcome}; no worker polls the pool after the run"
        if not alive(worker):
            outcome += " (the worker had stopped itself; the stack started it again)"
        statuses = runs.mlflow_runs(flow_run)
        assert "RUNNING" not in statuses.values(), f"{outcome}; MLflow runs {statuses}"
        (trial / "logs.txt").write_text("\n".join(runs.logs(flow_run)))
        return outcome
    return check


def moto(port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}", timeout=1)
            return proc
        except Exception:  # noqa: BLE001
            time.sleep(0.2)
    raise RuntimeError("moto did not start")


def mlflow_server(port: int, root: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root}/server.db", "--artifacts-destination", str(root / "artifacts")],
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    for _ in range(900):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            return proc
        except Exception:  # noqa: BLE001
            time.sleep(0.2)
    raise RuntimeError("the MLflow server did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="overlap,s3,disk,mlflow,cancel,restart", help="comma-separated faults to try")
    parser.add_argument("--out", default=None, help="folder for the trials' logs (default: a temporary one, kept)")
    parser.add_argument("--match", default=None, help="only the trials whose 'fault point' contains this (e.g. 'restart training')")
    opts = parser.parse_args()
    root = Path(opts.out or tempfile.mkdtemp(prefix="mydistill-campaign-"))
    root.mkdir(parents=True, exist_ok=True)
    print(f"logs under {root}", flush=True)
    c = Campaign(root)
    c.match = opts.match
    only = set(opts.only.split(","))
    servers: list[subprocess.Popen] = []
    try:
        if "overlap" in only:
            for delay in (0, 8, 20):
                c.trial("overlap", f"second-after-{delay}s", c.overlap(delay))
        if "disk" in only:
            for point in ("shard", "checkpoint_and_at_the_final", "shard", "checkpoint_and_at_the_final"):
                c.trial("disk", point, c.disk(point))  # the second test fills the disk at a checkpoint, then at the final save
        if "s3" in only:
            port = free_port()
            servers.append(moto(port))
            os.environ.update(AWS_ACCESS_KEY_ID="campaign", AWS_SECRET_ACCESS_KEY="campaign-secret", AWS_DEFAULT_REGION="us-east-1")
            import boto3

            boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}").create_bucket(Bucket="campaign")
            for stage in ("generate", "mix", "distill"):
                c.trial("s3", f"outage-from-{stage}", c.s3(f"http://127.0.0.1:{port}", stage))
        if "mlflow" in only:
            port = free_port()
            servers.append(mlflow_server(port, root / "mlflow-server"))
            for point in ("register-503", "register-lost", "training-503"):
                c.trial("mlflow", point, c.mlflow(f"http://127.0.0.1:{port}", point))
        if only & {"cancel", "restart"}:
            stack_dir = root / "stack"  # one stack for these trials, a run (name, work dir) of its own per trial
            started = up(stack_dir, *FAULT_SETTINGS)
            if started.returncode != 0:
                raise RuntimeError(f"stack up failed: {started.stdout[-1000:]} {started.stderr[-1000:]}")
            runs = StackRuns(stack_dir)
            if "cancel" in only:
                for point in STACK_POINTS:
                    c.trial("cancel", f"during-{point}", stack_cancel(runs, point))
            if "restart" in only:
                # down 20 s (the client's retries ride it out), and 90 s: longer than its 5 retries with backoff
                for point, down_for in (*((point, 20) for point in STACK_POINTS), ("training", 90)):
                    c.trial("restart", f"{point}-down-{down_for}s", stack_restart(runs, point, down_for))
    finally:
        if (root / "stack" / "stack.json").exists():
            print(stack_command(root / "stack", "down", timeout=300).stdout, flush=True)
        for proc in servers:
            proc.terminate()
            proc.wait(timeout=30)
    print("\nfault     held / tried")
    for fault, trials in c.results.items():
        print(f"{fault:9s} {sum(h for _, h, _ in trials)} / {len(trials)}")
    (root / "results.json").write_text(json.dumps(c.results, indent=2))
    shutil.rmtree(c.cache, ignore_errors=True)


if __name__ == "__main__":
    main()
