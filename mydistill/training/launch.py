"""Launch a training job on worker processes and follow it.

The Prefect task calls :func:`launch_training`: it writes the job as JSON, starts
``python -m mydistill.train --job …`` under ``torchrun`` or the DeepSpeed launcher (one process
per GPU, or per CPU worker with gloo), streams every output line to a callback (the Prefect log),
fails with the worker's own error when a worker exits non-zero, and returns the checkpoint's
manifest. ``launcher="none"`` runs the job in this process instead.
"""

from __future__ import annotations

import collections
import contextlib
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
from mydistill.training.job import MetricsCallback, TrainJob


LineCallback = Callable[[str], None]


class WorkerFailed(RuntimeError):
    """A training worker exited with an error; the message carries the worker's last output.

    ``signal`` names the signal that killed the worker (``"SIGABRT"``…) when it died outside Python.
    """

    def __init__(self, message: str, *, signal: str | None = None) -> None:
        super().__init__(message)
        self.signal = signal


def die_with_parent() -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux ``PR_SET_PDEATHSIG``).

    Called first thing in every training worker, and in the launcher's child before it execs:
    torchrun and DeepSpeed start workers in sessions of their own, so a kill of the task's or the
    launcher's process group would otherwise leave workers training on, holding a GPU and writing
    into the checkpoint folder a re-run resumes from. A parent already gone (the race before the
    call) ends this process at once. Elsewhere than Linux it does nothing.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(job_path: str, *, launcher: str, num_processes: int, hostfile: str | None = None, master_port: int | None = None) -> list[str]:
    """The command line that starts ``num_processes`` workers for the job at ``job_path``."""
    port = str(master_port or free_port())
    entry = ["-m", "mydistill.train", "--job", job_path]
    if launcher == "torchrun":
        # torchrun's own log folder beside the job file (else a new /tmp/torchelastic_* every launch, never removed)
        logs = os.path.join(os.path.dirname(os.path.abspath(job_path)), "torchrun-logs")
        return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(num_processes),
                "--master_addr", "127.0.0.1", "--master_port", port, "--log-dir", logs, *entry]
    if launcher == "deepspeed":
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--master_port", port]
        if hostfile:
            # multi-node: the hostfile lists `host slots=N` lines; DeepSpeed reaches the hosts over ssh
            cmd += ["--hostfile", hostfile]
        else:
            cmd += ["--num_gpus", str(num_processes)]
        return [*cmd, "--module", "mydistill.train", "--job", job_path]
    raise ValueError(f"unknown launcher {launcher!r}; expected none, torchrun or deepspeed")


def launch_training(
    job: TrainJob,
    *,
    on_line: LineCallback | None = None,
    on_metrics: MetricsCallback | None = None,
    env: dict[str, str] | None = None,
    progress: bool = False,
    restarts: int = 1,
) -> dict[str, Any]:
    """Run ``job`` as its config says (in process, or on launched workers); returns its manifest.

    Workers log metrics to MLflow themselves (rank 0, into ``job.mlflow_run_id``); in process,
    ``on_metrics`` receives them. When a worker dies by a signal nobody sent on purpose (a C++
    abort in gloo or NCCL, a segfault, a node's kill) the workers are started again, up to
    ``restarts`` times, and resume from the job's last checkpoint (``save_every``; without one the
    stage starts over). A Python error in the job, or a stop (SIGTERM, SIGINT), would only happen
    again: it fails at once.
    """
    cfg = job.train_config()
    if cfg.launcher == "none":
        from mydistill.train import run_training

        return run_training(job, on_metrics=on_metrics, progress=progress)
    with tempfile.TemporaryDirectory(prefix=io.temp_prefix("job")) as tmp:
        job_path = os.path.join(tmp, "job.json")
        io.write_text(job_path, job.to_json())
        run_workers_restarting(
            # a fresh master port each time: the dead run's may linger in TIME_WAIT
            lambda: launch_command(job_path, launcher=cfg.launcher, num_processes=cfg.num_processes, hostfile=cfg.hostfile),
            restarts=restarts, on_line=relay_marked(on_line), env={**(env or {}), MARKED_ENV: "1"},
        )
    manifest = io.read_manifest(job.output_uri)
    if manifest is None:
        raise WorkerFailed(f"workers exited cleanly but wrote no model at {job.output_uri}")
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
