#!/usr/bin/env python
"""Bring the mydistill operations stack up on this machine, or down again.

    python scripts/stack.py up [options]    # make stack-up ARGS="…"
    python scripts/stack.py down            # make stack-down
    python scripts/stack.py status
    python scripts/stack.py restart prefect [--down-for S]   # the Prefect server, same port and database
    eval "$(python scripts/stack.py env)"   # talk to the stack from this shell

``up`` starts, each listening on loopback only and each skipped when you point it at one you
already have:

1. an S3 endpoint: a moto server standing in for S3 (``--s3-endpoint URL`` or ``aws`` instead);
2. an MLflow tracking server: sqlite store, artifacts proxied to ``s3://BUCKET/mlflow``
   (``--mlflow-uri`` instead);
3. a Prefect server with its UI (``--prefect-api-url`` instead);

then creates the work pools, registers the deployments of ``deploy/prefect.yaml`` (rendered with
the chosen time zone, preset and pools into ``STATE/prefect.yaml``) and starts a worker for the
CPU pool (``--gpu-worker``: one for the GPU pool too). ``down`` stops what ``up`` started, workers
first (with the flow runs they started), the servers last.

State lives in ``--state-dir`` (default ``.stack/``): ``stack.json`` (pids, ports, addresses),
``logs/`` (one log per process, appended to across restarts), ``prefect/`` (PREFECT_HOME and the
server's database), ``mlflow/`` (the tracking store). Credentials are never written there: they
come from the environment (or, with ``--credentials-block``, go into a Prefect Secret block).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mydistill.io import pid_alive

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
DEPLOY_FILE = REPO / "deploy" / "prefect.yaml"
PIPELINE_DEPLOYMENT = "nightly"
# the deployments' default parameters: the demo shrunk to a run of minutes (5.5 on a busy 2-core machine,
# 3 of them training the demo's teacher, cached afterwards), so that a first look at the stack shows a
# finished run soon; --preset demo for the full demo (about 20 minutes there)
DEFAULT_PRESET = "demo-tiny"
CREDENTIALS_BLOCK = "mydistill-credentials"
# What moto accepts as credentials: anything. Fixed names keep logs readable; the secret is new
# for every stack so the end-to-end test can look for it in places it must never appear.
MOTO_KEY_ID = "mydistill-local"


class StackError(RuntimeError):
    pass


# ----------------------------------------------------------------------------------------------
# small helpers


def log(msg: str) -> None:
    print(f"stack: {msg}", flush=True)


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_in_use(host: str, port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex((host, port)) == 0


def choose_port(host: str, port: int, what: str, flag: str) -> int:
    if port == 0:
        return free_port(host)
    if port_in_use(host, port):
        raise StackError(f"port {port} on {host} is taken; pass {flag} PORT (or 0 for any free port) for {what}")
    return port


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None, what: str, log_file: Path | None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise StackError(f"{what} exited with code {proc.returncode} while starting{tail(log_file)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status < 500:
                    return
        except urllib.error.HTTPError as e:
            if e.code < 500:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise StackError(f"{what} did not answer at {url} within {timeout:.0f}s{tail(log_file)}")


def tail(path: Path | None, lines: int = 25) -> str:
    if path is None or not path.exists():
        return ""
    text = path.read_text(errors="replace").splitlines()[-lines:]
    return f"; last lines of {path}:\n  " + "\n  ".join(text)


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


# ----------------------------------------------------------------------------------------------
# state


class Stack:
    def __init__(self, state_dir: Path):
        self.dir = state_dir
        self.file = state_dir / "stack.json"
        self.logs = state_dir / "logs"
        self.data: dict[str, Any] = json.loads(self.file.read_text()) if self.file.exists() else {"processes": {}}

    def save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        ignore = self.dir / ".gitignore"
        if not ignore.exists():
            ignore.write_text("# state of scripts/stack.py: nothing here belongs in git\n*\n")
        tmp = self.file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2) + "\n")
        tmp.replace(self.file)

    @property
    def processes(self) -> dict[str, dict[str, Any]]:
        return self.data.setdefault("processes", {})

    def running(self) -> dict[str, dict[str, Any]]:
        return {name: p for name, p in self.processes.items() if self.is_ours(p)}

    @staticmethod
    def is_ours(p: dict[str, Any]) -> bool:
        # a recorded pid may have been reused by another program since: check its command line
        return pid_alive(p["pid"]) and p["marker"] in cmdline(p["pid"])

    def start(self, name: str, argv: list[str], env: dict[str, str], marker: str) -> subprocess.Popen:
        self.logs.mkdir(parents=True, exist_ok=True)
        log_file = self.logs / f"{name}.log"
        with open(log_file, "a") as f:
            f.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n")
            f.flush()
            proc = subprocess.Popen(
                argv, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: signals to this shell do not reach it
            )
        self.processes[name] = {"pid": proc.pid, "marker": marker, "log": str(log_file), "argv": argv}
        self.save()
        return proc


def stop_process(name: str, p: dict[str, Any], grace: float = 20.0) -> None:
    """SIGTERM the process, its process group and its descendants (flow runs start their own sessions)."""
    pid = p["pid"]
    if not Stack.is_ours(p):
        return
    family = []
    try:
        import psutil

        family = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except ImportError:  # psutil comes with the project's setup; without it, the process group only
        pass
    except psutil.Error:  # the process just ended
        pass
    pids = {pid} | {q.pid for q in family}
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for target in sorted(pids):
            try:
                os.killpg(target, sig) if target == pid else os.kill(target, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + (grace if sig == signal.SIGTERM else 5)
        while time.monotonic() < deadline and any(pid_alive(q) and not _zombie(q) for q in pids):
            time.sleep(0.2)
        if not any(pid_alive(q) and not _zombie(q) for q in pids):
            log(f"stopped {name} (pid {pid})")
            return
        log(f"{name} (pid {pid}) still running after SIGTERM; sending SIGKILL")
    log(f"could not stop {name} (pid {pid})")


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")
    except (OSError, IndexError):
        return False


# ----------------------------------------------------------------------------------------------
# up


def base_env(stack: Stack) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(
        PYTHONUNBUFFERED="1",
        PREFECT_HOME=str(stack.dir / "prefect"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
        MYDISTILL_HOME=str(REPO),
    )
    return env


def start_moto(stack: Stack, args: argparse.Namespace, env: dict[str, str]) -> str:
    port = choose_port(args.host, args.s3_port, "the moto S3 server", "--s3-port")
    endpoint = f"http://{args.host}:{port}"
    marker = "moto.server"
    proc = stack.start("moto", [sys.executable, "-m", "moto.server", "-H", args.host, "-p", str(port)], env, marker)
    wait_http(f"{endpoint}/moto-api/", 60, proc, "moto server", stack.logs / "moto.log")
    log(f"S3 (moto) at {endpoint}")
    return endpoint


def ensure_bucket(bucket: str, endpoint: str | None, env: dict[str, str], create: bool) -> None:
    import s3fs

    options = {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else {}
    fs = s3fs.S3FileSystem(
        key=env.get("AWS_ACCESS_KEY_ID"), secret=env.get("AWS_SECRET_ACCESS_KEY"),
        token=env.get("AWS_SESSION_TOKEN"), skip_instance_cache=True, **options,
    )
    if create and not fs.exists(bucket):
        fs.mkdir(bucket)
    elif not fs.exists(bucket):
        raise StackError(f"bucket s3://{bucket} is not there (or these credentials cannot see it)")


def start_mlflow(stack: Stack, args: argparse.Namespace, env: dict[str, str], artifacts: str) -> str:
    port = choose_port(args.host, args.mlflow_port, "the MLflow server", "--mlflow-port")
    (stack.dir / "mlflow").mkdir(parents=True, exist_ok=True)
    store = f"sqlite:///{(stack.dir / 'mlflow' / 'mlflow.db').resolve()}"
    argv = [
        str(VENV_BIN / "mlflow"), "server", "--host", args.host, "--port", str(port), "--workers", "1",
        "--backend-store-uri", store, "--artifacts-destination", artifacts,
    ]
    proc = stack.start("mlflow", argv, env, "mlflow")
    uri = f"http://{args.host}:{port}"
    wait_http(f"{uri}/health", 180, proc, "MLflow server", stack.logs / "mlflow.log")
    log(f"MLflow at {uri} (artifacts in {artifacts})")
    return uri


def start_prefect(stack: Stack, args: argparse.Namespace, env: dict[str, str]) -> str:
    port = choose_port(args.host, args.prefect_port, "the Prefect server", "--prefect-port")
    api = f"http://{args.host}:{port}/api"
    server_env = {**env, "PREFECT_API_URL": api, "PREFECT_SERVER_API_HOST": args.host, "PREFECT_SERVER_API_PORT": str(port)}
    argv = [str(VENV_BIN / "prefect"), "server", "start", "--host", args.host, "--port", str(port)]
    proc = stack.start("prefect-server", argv, server_env, "prefect")
    # a fresh database is migrated on the first start: slow on a small machine
    wait_http(f"{api}/health", 240, proc, "Prefect server", stack.logs / "prefect-server.log")
    log(f"Prefect UI at http://{args.host}:{port}")
    return api


def render_deployments(stack: Stack, args: argparse.Namespace) -> Path:
    """deploy/prefect.yaml with this stack's time zone, pools and default parameters."""
    import yaml

    sys.path.insert(0, str(REPO))
    from mydistill.config import load_config
    from mydistill.config.section import dump_without_unset

    spec = yaml.safe_load(DEPLOY_FILE.read_text())
    spec.pop("definitions", None)  # anchors are resolved by now
    overrides = list(args.set or [])
    if not any(o.startswith("work_dir=") for o in overrides) and args.work_dir:
        name = load_config(args.preset, overrides).name
        overrides.append(f"work_dir={args.work_dir.rstrip('/')}/{name}")
    # unset optional fields left out: Prefect checks a deployment's parameters against the form's schema
    params = {"config": dump_without_unset(load_config(args.preset, overrides))}
    for dep in spec["deployments"]:
        dep["parameters"] = params
        pool = dep["work_pool"]["name"]
        dep["work_pool"] = {**dep["work_pool"], "name": {"mydistill-cpu": args.cpu_pool, "mydistill-gpu": args.gpu_pool}.get(pool, pool)}
        if dep["name"] == PIPELINE_DEPLOYMENT:
            if args.pipeline_pool:
                dep["work_pool"]["name"] = args.pipeline_pool
            for schedule in dep.get("schedules") or []:
                if args.timezone:
                    schedule["timezone"] = args.timezone
                if args.cron:
                    schedule["cron"] = args.cron
                if args.no_schedule:
                    schedule["active"] = False
    for dep in spec["deployments"]:
        if dep["work_pool"]["name"] == args.gpu_pool:
            dep["description"] = (dep.get("description") or "").rstrip() + " " + gpu_pool_note(args.gpu_pool)
    out = stack.dir / "prefect.yaml"
    out.write_text(
        f"# Rendered by scripts/stack.py from {DEPLOY_FILE.relative_to(REPO)}; edit that file, not this one.\n"
        + yaml.safe_dump(spec, sort_keys=False, allow_unicode=True)
    )
    return out


def gpu_pool_note(pool: str) -> str:
    """What a GPU deployment's page says about its "Not Ready" badge."""
    return (f"Runs on the GPU pool {pool}: Prefect shows it Not Ready until a worker polls that pool "
            "(stack.py up --gpu-worker here, or a worker on a GPU machine).")


def registration_summary(spec: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """What ``up`` registered, in words: the preset, the schedule with its time zone, the pools and
    which deployments wait for a GPU worker (and so show "Not Ready" without one)."""
    config = next(iter(spec["deployments"]))["parameters"]["config"]
    lines = [
        f"deployments run preset {args.preset!r} by default (config {config['name']!r}, work_dir {config['work_dir']}); "
        f"students register as {config['registry']['model_name']!r}",
    ]
    workers = {} if args.no_worker else {args.cpu_pool: "worker started here"}
    if args.gpu_worker and not args.no_worker:
        workers[args.gpu_pool] = "worker started here"
    for dep in spec["deployments"]:
        for schedule in dep.get("schedules") or []:
            state = "active" if schedule.get("active", True) else "paused"
            lines.append(f"schedule: {dep['name']} at cron {schedule['cron']!r} in time zone {schedule.get('timezone', 'UTC')} ({state})")
    by_pool: dict[str, list[str]] = {}
    for dep in spec["deployments"]:
        by_pool.setdefault(dep["work_pool"]["name"], []).append(dep["name"])
    for pool, names in by_pool.items():
        lines.append(f"pool {pool}: {', '.join(names)} ({workers.get(pool, 'no worker here')})")
    waiting = [n for pool, names in by_pool.items() if pool == args.gpu_pool and pool not in workers for n in names]
    if waiting:
        lines.append(
            f"{', '.join(waiting)} need a GPU worker: the Prefect UI shows them Not Ready until a worker polls {args.gpu_pool} "
            f"(make stack-up ARGS=--gpu-worker here, or `prefect worker start --pool {args.gpu_pool}` on a GPU machine); "
            "the pipeline deployment runs every stage itself and is not affected"
        )
    return lines


def prefect_setup(args: argparse.Namespace, env: dict[str, str], credentials: dict[str, str] | None) -> None:
    """Work pools and (optionally) the credentials block, through the Prefect client of this process."""
    for key in ("PREFECT_API_URL", "PREFECT_HOME"):
        os.environ[key] = env[key]
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        for pool in dict.fromkeys([args.cpu_pool, args.gpu_pool, args.pipeline_pool or args.cpu_pool]):
            try:
                client.read_work_pool(pool)
            except ObjectNotFound:
                client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
                log(f"created work pool {pool} (process)")
    if credentials:
        from prefect.blocks.system import Secret

        Secret(value=credentials).save(CREDENTIALS_BLOCK, overwrite=True)
        log(f"credentials ({', '.join(sorted(credentials))}) stored in Secret block {CREDENTIALS_BLOCK!r}")


def register_deployments(stack: Stack, args: argparse.Namespace, env: dict[str, str]) -> None:
    rendered = render_deployments(stack, args)
    log_file = stack.logs / "deploy.log"
    with open(log_file, "a") as f:
        f.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} prefect deploy --all\n")
        f.flush()
        done = subprocess.run(
            [str(VENV_BIN / "prefect"), "--no-prompt", "deploy", "--prefect-file", str(rendered), "--all"],
            cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT, timeout=600, check=False,
        )
    if done.returncode:
        raise StackError(f"registering the deployments failed{tail(log_file)}")
    log(f"deployments registered from {DEPLOY_FILE.relative_to(REPO)} (rendered: {rendered})")
    import yaml

    for line in registration_summary(yaml.safe_load(rendered.read_text()), args):
        log(line)


def start_worker(stack: Stack, args: argparse.Namespace, env: dict[str, str], pool: str, name: str) -> None:
    argv = [
        str(VENV_BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process",
        "--name", f"{pool}-{socket.gethostname()}", "--limit", str(args.worker_limit),
    ]
    # under `supervise`: a Prefect worker stops itself once its API has failed for a while (a server
    # restarted, down a minute or more), and would leave the pool without a worker once it is back
    proc = stack.start(name, [sys.executable, str(Path(__file__).resolve()), "supervise", "--", *argv], env, "worker")
    time.sleep(1)
    if proc.poll() is not None:
        raise StackError(f"worker for {pool} exited at once{tail(stack.logs / f'{name}.log')}")
    log(f"worker for pool {pool} started (pid {proc.pid})")


def up(args: argparse.Namespace) -> None:
    stack = Stack(Path(args.state_dir).resolve())
    if stack.running():
        raise StackError(f"a stack is already running from {stack.dir} ({', '.join(stack.running())}); `make stack-down` first")
    stack.data = {"processes": {}, "state_dir": str(stack.dir), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    stack.save()
    env = base_env(stack)
    try:
        # 1. S3
        # S3 credentials go only to the processes that use S3: the MLflow server and the workers
        s3_env: dict[str, str] = {}
        if args.s3_endpoint in (None, ""):
            endpoint: str | None = start_moto(stack, args, env)
            s3_env = {"AWS_ACCESS_KEY_ID": MOTO_KEY_ID, "AWS_SECRET_ACCESS_KEY": secrets.token_urlsafe(18)}
            s3_env["AWS_DEFAULT_REGION"] = env.get("AWS_DEFAULT_REGION", "us-east-1")
            ensure_bucket(args.bucket, endpoint, {**env, **s3_env}, create=True)
        else:
            endpoint = None if args.s3_endpoint == "aws" else args.s3_endpoint
            ensure_bucket(args.bucket, endpoint, env, create=False)
        if endpoint:
            env.update(MYDISTILL_S3_ENDPOINT_URL=endpoint, MLFLOW_S3_ENDPOINT_URL=endpoint)
        # 2. MLflow (the server writes the artifacts to S3; clients upload through it)
        artifacts = args.artifacts or f"s3://{args.bucket}/mlflow"
        tracking = args.mlflow_uri or start_mlflow(stack, args, {**env, **s3_env}, artifacts)
        env["MLFLOW_TRACKING_URI"] = tracking
        # 3. Prefect
        api = args.prefect_api_url or start_prefect(stack, args, env)
        env["PREFECT_API_URL"] = api
        stack.data.update(
            prefect_api_url=api, prefect_ui_url=api.removesuffix("/api"), mlflow_tracking_uri=tracking,
            s3_endpoint=endpoint, bucket=args.bucket, moto=args.s3_endpoint in (None, ""),
            credentials_block=CREDENTIALS_BLOCK if args.credentials_block else None,
        )
        stack.save()
        # 4. pools, credentials, deployments, workers
        worker_env = {**env, **s3_env}
        block = None
        if args.credentials_block:
            block = {k: worker_env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN") if worker_env.get(k)}
            if not block:
                raise StackError("--credentials-block: no AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY in the environment to store")
            for k in block:
                worker_env.pop(k)  # the flow runs read them from the block, nowhere else
        prefect_setup(args, env, block)
        if not args.no_deploy:
            register_deployments(stack, args, env)
        if not args.no_worker:
            start_worker(stack, args, worker_env, args.cpu_pool, "worker-cpu")
            if args.gpu_worker:
                start_worker(stack, args, worker_env, args.gpu_pool, "worker-gpu")
    except BaseException:
        log("start failed; stopping what was started")
        down_stack(stack)
        raise
    print_status(stack)


# ----------------------------------------------------------------------------------------------
# down, status, env

STOP_ORDER = ("worker-gpu", "worker-cpu", "mlflow", "prefect-server", "moto")


def down_stack(stack: Stack) -> None:
    names = [n for n in STOP_ORDER if n in stack.processes] + [n for n in stack.processes if n not in STOP_ORDER]
    for name in names:
        stop_process(name, stack.processes[name])
    stack.data["processes"] = {}
    stack.data["stopped"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    if stack.dir.exists():
        stack.save()


def down(args: argparse.Namespace) -> None:
    stack = Stack(Path(args.state_dir).resolve())
    if not stack.processes:
        log(f"nothing recorded as running in {stack.dir}")
        return
    down_stack(stack)
    log(f"down; logs kept in {stack.logs}")


def restart(args: argparse.Namespace) -> None:
    """Stop the stack's Prefect server and start it again on the same address, port and database (what an
    upgrade or a crash of the server does to the runs in flight; ``--down-for`` keeps it down that long)."""
    stack = Stack(Path(args.state_dir).resolve())
    p = stack.processes.get("prefect-server")
    if p is None or not stack.data.get("prefect_api_url"):
        raise StackError(f"the stack in {stack.dir} started no Prefect server (it used --prefect-api-url, or is down)")
    url = urlsplit(stack.data["prefect_api_url"])
    stop_process("prefect-server", p)
    if args.down_for:
        log(f"Prefect server down for {args.down_for:g} s")
        time.sleep(args.down_for)
    start_prefect(stack, argparse.Namespace(host=url.hostname, prefect_port=url.port), base_env(stack))
    log(f"Prefect server restarted (pid {stack.processes['prefect-server']['pid']}); runs and workers carry on against it")


def supervise(args: argparse.Namespace) -> int:
    """Run the command after ``--`` and start it again whenever it exits on its own, but for a first run
    that ends within FIRST_RUN_S (a broken command, not an outage: its code is returned). SIGTERM or
    SIGINT is passed on to it and ends the loop."""
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    child: subprocess.Popen | None = None
    stopping = False

    def stop(signum: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for attempt in itertools.count():
        started = time.monotonic()
        child = subprocess.Popen(argv)
        code = child.wait()
        if stopping or (attempt == 0 and time.monotonic() - started < FIRST_RUN_S):
            return code
        log(f"{' '.join(argv[:3])} exited with code {code}; starting it again in {RESTART_AFTER_S} s")
        time.sleep(RESTART_AFTER_S)
        if stopping:
            return code
    return 0


FIRST_RUN_S, RESTART_AFTER_S = 10, 5


def print_status(stack: Stack) -> None:
    d = stack.data
    running = stack.running()
    rows = [
        ("Prefect UI", d.get("prefect_ui_url")),
        ("Prefect API", d.get("prefect_api_url")),
        ("MLflow", d.get("mlflow_tracking_uri")),
        ("S3", f"s3://{d.get('bucket')} via {d.get('s3_endpoint') or 'AWS'}" + (" (moto)" if d.get("moto") else "")),
        ("state", str(stack.dir)),
    ]
    for label, value in rows:
        print(f"  {label:12} {value}")
    for name, p in stack.processes.items():
        print(f"  {name:12} pid {p['pid']} {'running' if name in running else 'NOT RUNNING'}  log: {p['log']}")


def status(args: argparse.Namespace) -> None:
    stack = Stack(Path(args.state_dir).resolve())
    if not stack.file.exists():
        log(f"no stack in {stack.dir}")
        return
    print_status(stack)


def env_cmd(args: argparse.Namespace) -> None:
    d = Stack(Path(args.state_dir).resolve()).data
    exports = {
        "PREFECT_API_URL": d.get("prefect_api_url"),
        "MLFLOW_TRACKING_URI": d.get("mlflow_tracking_uri"),
        "MYDISTILL_S3_ENDPOINT_URL": d.get("s3_endpoint"),
    }
    if d.get("moto"):
        # moto takes any credentials; real ones stay wherever you keep them
        exports.update(AWS_ACCESS_KEY_ID=MOTO_KEY_ID, AWS_SECRET_ACCESS_KEY="moto-takes-any", AWS_DEFAULT_REGION="us-east-1")
    for key, value in exports.items():
        if value:
            print(f"export {key}={value}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--state-dir", default=os.environ.get("STACK_DIR", str(REPO / ".stack")), help="where pids, logs and data live")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("up", help="start the stack and register the deployments")
    p.add_argument("--host", default="127.0.0.1", help="address the servers listen on (loopback by default)")
    p.add_argument("--prefect-port", type=int, default=4200, help="0: any free port")
    p.add_argument("--mlflow-port", type=int, default=5000, help="0: any free port")
    p.add_argument("--s3-port", type=int, default=9000, help="moto's port; 0: any free port")
    p.add_argument("--prefect-api-url", help="use this Prefect server (…/api) instead of starting one")
    p.add_argument("--mlflow-uri", help="use this MLflow tracking server instead of starting one")
    p.add_argument("--s3-endpoint", help="use this S3 endpoint (URL, or 'aws' for Amazon S3) instead of starting moto")
    p.add_argument("--bucket", default="mydistill", help="bucket for MLflow artifacts and pipeline runs")
    p.add_argument("--artifacts", help="MLflow artifact destination (default s3://BUCKET/mlflow)")
    p.add_argument("--work-dir", default=None, help="work_dir root for the deployments' runs (default s3://BUCKET/runs)")
    p.add_argument("--preset", default=DEFAULT_PRESET, help="preset whose config becomes the deployments' default parameters (demo: the full demo)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override in that config (repeatable)")
    p.add_argument("--timezone", default=os.environ.get("MYDISTILL_SCHEDULE_TIMEZONE"), help="IANA time zone of the nightly schedule (default: deploy/prefect.yaml's)")
    p.add_argument("--cron", help="cron of the pipeline's schedule (default: deploy/prefect.yaml's)")
    p.add_argument("--no-schedule", action="store_true", help="register the schedule paused")
    p.add_argument("--cpu-pool", default="mydistill-cpu")
    p.add_argument("--gpu-pool", default="mydistill-gpu")
    p.add_argument("--pipeline-pool", help="pool for the pipeline deployment (default: the CPU pool)")
    p.add_argument("--gpu-worker", action="store_true", help="also start a worker for the GPU pool here")
    p.add_argument("--worker-limit", type=int, default=1, help="flow runs a worker runs at once")
    p.add_argument("--credentials-block", action="store_true", help=f"store the S3 credentials in the Secret block {CREDENTIALS_BLOCK!r} and keep them out of the worker's environment")
    p.add_argument("--no-deploy", action="store_true", help="do not register the deployments")
    p.add_argument("--no-worker", action="store_true", help="do not start a worker")
    sub.add_parser("down", help="stop everything `up` started")
    sub.add_parser("status", help="what runs, and where")
    sub.add_parser("env", help="shell exports for this stack")
    p = sub.add_parser("restart", help="stop a server of the stack and start it again (same port, same data)")
    p.add_argument("service", choices=["prefect"], help="which server")
    p.add_argument("--down-for", type=float, default=0, metavar="S", help="seconds to keep it stopped before starting it again")
    p = sub.add_parser("supervise", help="(for `up`) run a command, and again whenever it exits on its own")
    p.add_argument("argv", nargs=argparse.REMAINDER, help="-- COMMAND …")
    args = parser.parse_args(argv)
    if args.command == "up" and args.work_dir is None:
        args.work_dir = f"s3://{args.bucket}/runs"
    try:
        if args.command == "supervise":
            return supervise(args)
        {"up": up, "down": down, "status": status, "env": env_cmd, "restart": restart}[args.command](args)
    except StackError as e:
        print(f"stack: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
