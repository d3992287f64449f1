"""Launch a training job on worker processes and follow it.

The Prefect task calls :func:`launch_training`: it writes the job as JSON beside its output
(:func:`write_job`; shared storage, local or ``s3://``), starts ``python -m mydistill.train --job …``
under ``torchrun`` or the DeepSpeed launcher (one process per GPU, or per CPU worker with gloo; one
node or several, :func:`node_command`), streams every output line to a callback (the Prefect log),
fails with the worker's own error when a worker exits non-zero, and returns the checkpoint's
manifest. ``launcher="none"`` runs the job in this process instead. ``python -m
mydistill.training.launch --job URI`` starts one node of a multi-node run by hand.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from typing import Any

from mydistill import io
from mydistill.progress import MARKED_ENV, relay_marked
from mydistill.training.job import TrainJob
from mydistill.training.process import die_with_parent


LineCallback = Callable[[str], None]


class WorkerFailed(RuntimeError):
    """A training worker exited with an error; the message carries the worker's last output.

    ``signal`` names the signal that killed the worker (``"SIGABRT"``…) when it died outside Python.
    """

    def __init__(self, message: str, *, signal: str | None = None) -> None:
        super().__init__(message)
        self.signal = signal


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_job(job: TrainJob) -> str:
    """Write ``job`` to shared storage, beside its output (:meth:`TrainJob.job_uri`), and return its URI.

    Every node reads the job from there (a shared path or ``s3://``), and a retry of the same job
    writes the same file. The DeepSpeed config's content goes into the job, read here where a
    relative path means something, so that no node resolves one against a directory of its own.
    """
    deepspeed = job.train.get("deepspeed")
    if deepspeed and job.deepspeed_config is None:
        from mydistill.training.engines import read_deepspeed_file

        job = dataclasses.replace(job, deepspeed_config=read_deepspeed_file(deepspeed))
    uri = job.job_uri()
    if not io.is_remote(uri):  # another node, or a worker in another directory, reads the same file
        uri = os.path.abspath(uri.removeprefix("file://"))
    io.write_text(uri, job.to_json())
    return uri


def _from_env(value: Any, *names: str) -> str | None:
    """``value`` if given, else the first of the environment variables ``names`` that is set."""
    if value is not None:
        return str(value)
    return next((os.environ[n] for n in names if os.environ.get(n)), None)


def resolve_hostfile(path: str) -> str:
    """The DeepSpeed hostfile ``path`` made absolute: from the working directory, else the repository."""
    from mydistill.config import REPO_ROOT

    for candidate in (os.path.abspath(path), str(REPO_ROOT / path)):
        if os.path.isfile(candidate):
            return candidate
    raise io.DataError(f"hostfile {path}: not found (looked in {os.getcwd()} and {REPO_ROOT})")


def node_command(
    job_uri: str, *, nodes: int | None = None, nproc_per_node: int | None = None, node_rank: int | None = None,
    master_addr: str | None = None, master_port: int | None = None, launcher: str = "torchrun",
    hostfile: str | None = None, log_dir: str | None = None,
) -> list[str]:
    """The command line that starts one node's workers (``nproc_per_node`` of them) for the job at ``job_uri``.

    What is not given comes from the environment that cluster launchers set: Kubeflow Trainer's
    ``PET_NNODES``, ``PET_NPROC_PER_NODE``, ``PET_NODE_RANK``, ``PET_MASTER_ADDR``, ``PET_MASTER_PORT``,
    else ``NNODES``, ``NODE_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``. One node trains on loopback with a
    free port. Several, under torchrun, meet by c10d rendezvous at ``master_addr:master_port`` (node 0
    hosts it); c10d numbers the nodes itself, so the node rank decides only which node hosts the
    rendezvous. Under the DeepSpeed launcher the hostfile lists the nodes; with a node rank every
    node runs its own launcher (``--no_ssh``), without one this node reaches the others over ssh.
    """
    nodes = int(_from_env(nodes, "PET_NNODES", "NNODES") or 1)
    nproc = int(_from_env(nproc_per_node, "PET_NPROC_PER_NODE") or 1)
    entry = ["-m", "mydistill.train", "--job", job_uri]
    logs = ["--log-dir", log_dir] if log_dir else []
    if nodes == 1 and not (launcher == "deepspeed" and hostfile):
        port = str(master_port or free_port())
        if launcher == "torchrun":
            return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
                    "--master_addr", "127.0.0.1", "--master_port", port, *logs, *entry]
        if launcher == "deepspeed":
            return [sys.executable, "-m", "deepspeed.launcher.runner", "--master_port", port, "--num_gpus", str(nproc),
                    "--module", *entry[1:]]
        raise ValueError(f"unknown launcher {launcher!r}; expected none, torchrun or deepspeed")
    rank = _from_env(node_rank, "PET_NODE_RANK", "NODE_RANK")
    addr = _from_env(master_addr, "PET_MASTER_ADDR", "MASTER_ADDR")
    port = _from_env(master_port, "PET_MASTER_PORT", "MASTER_PORT") or "29500"
    if launcher == "torchrun":
        if addr is None:
            raise ValueError(
                f"{nodes} nodes meet at node 0's address: set MASTER_ADDR (or PET_MASTER_ADDR), and MASTER_PORT, NODE_RANK"
            )
        host = [] if rank is None else ["--rdzv-conf", f"is_host={'true' if int(rank) == 0 else 'false'}"]
        return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes), "--nproc-per-node", str(nproc),
                "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{addr}:{port}", "--rdzv-id", io.sha256_of(job_uri)[:16],
                *host, *logs, *entry]
    if launcher == "deepspeed":
        if not hostfile:
            raise ValueError(f"{nodes} nodes under the DeepSpeed launcher need a hostfile (`host slots=N` lines)")
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", resolve_hostfile(hostfile), "--master_port", port]
        if nodes > 1:  # else every host of the hostfile, as DeepSpeed does
            cmd += ["--num_nodes", str(nodes), "--num_gpus", str(nproc)]
        if addr is not None:
            cmd += ["--master_addr", addr]
        if rank is not None:
            cmd += ["--no_ssh", "--node_rank", rank]
        return [*cmd, "--module", *entry[1:]]
    raise ValueError(f"unknown launcher {launcher!r}; expected none, torchrun or deepspeed")


def launch_command(job_path: str, *, launcher: str, num_processes: int, hostfile: str | None = None, master_port: int | None = None) -> list[str]:
    """The command line that starts ``num_processes`` workers on this machine for the job at ``job_path``
    (:func:`node_command` for one node, torchrun's log folder beside a local job file)."""
    logs = os.path.join(os.path.dirname(os.path.abspath(job_path)), "torchrun-logs") if not io.is_remote(job_path) else None
    return node_command(job_path, nodes=1, nproc_per_node=num_processes, launcher=launcher, hostfile=hostfile,
                        master_port=master_port, log_dir=logs)


def launch_training(
    job: TrainJob,
    *,
    on_line: LineCallback | None = None,
    env: dict[str, str] | None = None,
    restarts: int = 1,
) -> dict[str, Any]:
    """Run ``job`` on launched workers (``torchrun`` or the DeepSpeed launcher, as its config says);
    returns its manifest. (:func:`mydistill.train.run_job` chooses between this and training in
    process.)

    Launched, the job is written beside its output (:func:`write_job`) and this machine is one node
    of ``nodes`` (node rank, master address from the environment: see :func:`node_command`); the
    other nodes run ``python -m mydistill.training.launch --job <URI>`` against the same file.
    Workers log metrics to MLflow themselves (rank 0, into ``job.mlflow_run_id``). When a worker of
    a one-node run dies by a signal nobody sent on purpose (a C++ abort in gloo or NCCL, a segfault,
    a node's kill) the workers are started again, up to ``restarts`` times, and resume from the
    job's last checkpoint (``save_every``; without one the stage starts over). A Python error in the
    job, or a stop (SIGTERM, SIGINT), would only happen again: it fails at once. Several nodes are
    restarted together, by whoever started them.
    """
    cfg = job.train_config()
    if cfg.launcher == "none":
        raise ValueError("launcher: none trains in this process: call mydistill.train.run_job (or run_training)")
    job_uri = write_job(job)
    if cfg.nodes > 1:
        (on_line or (lambda line: None))(
            f"[mydistill] {cfg.nodes} nodes: this is one; start the others with "
            f"`python -m mydistill.training.launch --job {job_uri}` (MASTER_ADDR, MASTER_PORT, NODE_RANK set)"
        )
    # torchrun's own log folder in a temporary one (else a new /tmp/torchelastic_* every launch, never removed)
    with tempfile.TemporaryDirectory(prefix=io.temp_prefix("job")) as tmp:
        run_workers_restarting(
            # a fresh master port each time: the dead run's may linger in TIME_WAIT
            lambda: node_command(job_uri, nodes=cfg.nodes, nproc_per_node=cfg.num_processes, launcher=cfg.launcher,
                                 hostfile=cfg.hostfile, log_dir=os.path.join(tmp, "torchrun-logs")),
            restarts=restarts if cfg.nodes == 1 else 0, on_line=relay_marked(on_line), env={**(env or {}), MARKED_ENV: "1"},
        )
    manifest = io.read_manifest(job.output_uri)
    if manifest is None:
        raise WorkerFailed(f"workers exited cleanly but wrote no model at {job.output_uri}")
    with contextlib.suppress(OSError):  # done (a re-run finds the manifest); a failed clean-up fails nothing
        io.remove(job_uri)
    return manifest


def run_workers_restarting(
    command: Callable[[], list[str]], *, restarts: int, on_line: LineCallback | None = None, env: dict[str, str] | None = None,
) -> None:
    """:func:`run_workers` on ``command()``, started again (up to ``restarts`` times, each said in the
    output) when a worker died by a signal (:func:`restartable`)."""
    say = on_line or (lambda line: print(line, file=sys.stderr, flush=True))
    for attempt in range(restarts + 1):
        try:
            run_workers(command(), on_line=on_line, env=env)
            return
        except WorkerFailed as e:
            if not restartable(e) or attempt == restarts:
                raise
            say(f"[mydistill] {str(e).splitlines()[0]} — restarting the workers ({attempt + 1} of {restarts}), "
                "from the last checkpoint")


def restartable(error: WorkerFailed) -> bool:
    """Whether starting the workers again may succeed: one died by a signal that no one sent to stop it."""
    return error.signal is not None and error.signal not in ("SIGTERM", "SIGINT")


def run_workers(cmd: list[str], *, on_line: LineCallback | None = None, env: dict[str, str] | None = None, tail_lines: int = 400) -> None:
    """Run the launcher, streaming its output; raise :class:`WorkerFailed` on a non-zero exit.

    The launcher runs in its own process group, so stopping this process (a cancelled flow run)
    stops every worker too.
    """
    full_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env, start_new_session=True,
        preexec_fn=die_with_parent,  # a killed task takes its launcher (and so every worker) with it
    )
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.rstrip("\n")
            tail.append(line)
            if on_line is not None:
                on_line(line)
        code = proc.wait()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        raise
    if code != 0:
        lines = list(tail)
        error, trace = worker_error(lines)
        raise WorkerFailed(f"training workers exited with code {code}: {error}\n" + "\n".join(trace), signal=killed_by(lines))


# the launcher's own report that a worker died: torchrun (glog lines) and the DeepSpeed launcher
_LAUNCHER_SAW_FAILURE = re.compile(r"torch/distributed/elastic/multiprocessing/api\.py.*(closing signal|failed \(exitcode)|\[launch\.py:\d+:sigkill_handler\]")
_WORKER_EXIT = (
    re.compile(r"failed \(exitcode: (?P<code>-?\d+)\) local_rank: (?P<rank>\d+)"),  # torchrun
    re.compile(r"--local_rank=(?P<rank>\d+)'\] exits with return code = (?P<code>-?\d+)"),  # DeepSpeed launcher
)
# what a process prints as it dies outside Python: a C++ exception (gloo, NCCL), an assertion, a fatal
# error; failing those, any line that speaks of an error
_DYING_WORDS = (
    re.compile(r"what\(\):|terminate called|Fatal Python error|Assertion|Segmentation fault|out of memory|Killed", re.IGNORECASE),
    re.compile(r"error", re.IGNORECASE),
)
# ``ValueError: …``, ``mydistill.io.DataError: …``, or a bare ``KeyboardInterrupt``; not a word another rank printed
_EXCEPTION_LINE = re.compile(r"[A-Za-z_][\w.]*: |[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)$")


def worker_error(lines: list[str]) -> tuple[str, list[str]]:
    """The failing worker's last error line and its traceback, from the launcher's output.

    torchrun prefixes a worker's traceback with ``[rankN]:``; the launcher prints its own
    traceback after it, which says only that a child failed. A worker killed by a signal (a C++
    abort in gloo or NCCL, the out-of-memory killer) is the root cause even when the others then
    raise ("connection closed by peer"): it is named with its signal and its last words, and the
    workers' last lines stand in for the traceback.
    """
    # the launcher's report that a worker died starts here: what comes before is the workers' own
    end = next((i for i, line in enumerate(lines) if _LAUNCHER_SAW_FAILURE.search(line)), None)
    exit_ = _worker_exit(lines)
    killed = _signal_name(exit_)
    for prefix_pattern in ("[rank", "") if killed is None else ():
        starts = [i for i, line in enumerate(lines) if line.startswith(prefix_pattern) and "Traceback (most recent call last)" in line]
        starts = [i for i in starts if not _launchers_traceback(lines, i)]
        if not starts:
            continue
        start = starts[0]
        prefix = lines[start].split("Traceback")[0]
        block = [line for line in lines[start : end if prefix == "" and end and end > start else None] if line.startswith(prefix)]
        trace = [line[len(prefix) :] for line in block]
        if prefix == "":
            # unprefixed, other ranks' lines may fall between: the error is the exception line
            # (``ValueError: …``, ``mydistill.io.DataError: …``) after the last traceback's frames
            last = max(i for i, t in enumerate(trace) if "Traceback (most recent call last)" in t)
            found = next((i for i in range(last + 1, len(trace)) if _EXCEPTION_LINE.match(trace[i])), None)
            if found is not None:
                return trace[found], trace[: found + 1]
        error = next((t for t in reversed(trace) if t and not t.startswith(" ")), trace[-1])
        return error, trace
    if end is None:
        return (lines[-1] if lines else "no output"), lines[-40:]
    own = [line for line in lines[:end] if line.strip()]  # the workers' output, before the launcher's report
    what = "a worker failed"
    if exit_ is not None:
        rank, code = exit_
        what = f"worker local_rank {rank} exited with code {code}"
        if killed is not None:
            what = f"worker local_rank {rank} was killed by {killed}"
            if killed == "SIGKILL":
                what += " (often the kernel's out-of-memory killer: see dmesg)"
    # a killed worker's own words, if it left any: the others' errors that follow ("connection closed
    # by peer") are consequences, and the workers' lines below show them
    words = _DYING_WORDS[:1] if killed is not None else _DYING_WORDS
    reason = next((line.strip() for pattern in words for line in reversed(own) if pattern.search(line)), None)
    return (f"{what}: {reason}" if reason else what), own[-40:]


def _worker_exit(lines: list[str]) -> tuple[int, int] | None:
    """(local rank, exit code) of the first worker the launcher saw fail, if it said."""
    exit_ = next((m for line in lines for pattern in _WORKER_EXIT if (m := pattern.search(line))), None)
    return None if exit_ is None else (int(exit_["rank"]), int(exit_["code"]))


def killed_by(lines: list[str]) -> str | None:
    """The signal (``"SIGABRT"``…) that killed the first failed worker, from the launcher's output; None
    when it exited on its own (a Python error) or the launcher did not say."""
    return _signal_name(_worker_exit(lines))


def _signal_name(exit_: tuple[int, int] | None) -> str | None:
    if exit_ is None or exit_[1] >= 0:
        return None
    number = -exit_[1]
    return signal.Signals(number).name if number in signal.valid_signals() else f"signal {number}"


def _launchers_traceback(lines: list[str], start: int) -> bool:
    """Whether the traceback starting at ``start`` is the launcher's own (it only says a child failed)."""
    return any("torch/distributed/run.py" in line or "deepspeed/launcher/" in line for line in lines[start + 1 : start + 6])


def main(argv: list[str] | None = None) -> None:
    """``python -m mydistill.training.launch --job URI``: start this node's workers for a job on shared storage."""
    import argparse

    parser = argparse.ArgumentParser(
        description="Start one node of a training run: its workers for the job at --job (on shared storage). Node "
        "rank and master address come from the environment (NODE_RANK, MASTER_ADDR, MASTER_PORT or Kubeflow's PET_*)."
    )
    parser.add_argument("--job", required=True, help="URI of the job file (printed by the node that wrote it).")
    args = parser.parse_args(argv)
    cfg = TrainJob(**io.read_json(args.job)).train_config()
    if cfg.launcher == "none":
        raise SystemExit(f"{args.job}: launcher is none (the job trains in one process, on no node of its own)")
    with tempfile.TemporaryDirectory(prefix=io.temp_prefix("job")) as tmp:
        try:
            run_workers(node_command(args.job, nodes=cfg.nodes, nproc_per_node=cfg.num_processes, launcher=cfg.launcher,
                                     hostfile=cfg.hostfile, log_dir=os.path.join(tmp, "torchrun-logs")),
                        on_line=lambda line: print(line, flush=True))
        except WorkerFailed as e:
            raise SystemExit(str(e).splitlines()[0]) from None


if __name__ == "__main__":
    main()
