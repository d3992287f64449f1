"""A worker that dies outside Python (a C++ abort in gloo or NCCL, a signal) fails the launch with
its own last words, under both launchers; the workers here are tiny scripts, not training jobs."""

from __future__ import annotations

import os
import sys
import textwrap

import pytest

from mydistill.training.launch import WorkerFailed, free_port, run_workers, run_workers_restarting, worker_error

GLOO_ABORT = "[gloo/transport/tcp/pair.cc:598] Connection closed by peer"


def aborting_script(tmp_path, how: str) -> str:
    """Rank 1 dies as ``how`` says while rank 0 is still at work.

    Each line goes out in one ``os.write``: the launcher runs its workers unbuffered, and ``print``
    then writes a line and its newline apart, so two ranks' lines can splice into one."""
    path = tmp_path / "worker.py"
    path.write_text(textwrap.dedent(f"""
        import os, signal, sys, time
        rank = int(os.environ["RANK"])
        os.write(1, f"rank {{rank}} at step 3\\n".encode())
        if rank == 1:
            if {how!r} == "abort":
                os.write(2, b"terminate called after throwing an instance of 'gloo::IoException'\\n  what():  {GLOO_ABORT}\\n")
                os.abort()
            if {how!r} == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if {how!r} == "raise":
                raise ValueError("bad batch at step 3")
        time.sleep(30)
    """))
    return str(path)


def torchrun(script: str) -> list[str]:
    logs = os.path.join(os.path.dirname(script), "torchrun-logs")
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "--log-dir", logs, script]


def test_a_worker_aborted_in_cxx_fails_with_its_signal_and_its_last_words(tmp_path):
    lines: list[str] = []
    with pytest.raises(WorkerFailed) as failed:
        run_workers(torchrun(aborting_script(tmp_path, "abort")), on_line=lines.append)
    first_line, *trace = str(failed.value).splitlines()
    assert first_line == f"training workers exited with code 1: worker local_rank 1 was killed by SIGABRT: what():  {GLOO_ABORT}"
    assert "rank 1 at step 3" in trace  # the workers' own output, not the launcher's traceback
    assert not any("torch/distributed/run.py" in line for line in trace)
    assert any("ChildFailedError" in line for line in lines)  # which the launcher did print
    assert failed.value.signal == "SIGABRT"  # what the train task's retry condition reads


def test_a_killed_worker_is_named_with_its_signal(tmp_path):
    with pytest.raises(WorkerFailed, match=r"worker local_rank 1 was killed by SIGKILL \(often the kernel's out-of-memory killer"):
        run_workers(torchrun(aborting_script(tmp_path, "kill")))


def test_a_python_error_still_fails_with_the_workers_traceback(tmp_path):
    with pytest.raises(WorkerFailed) as failed:
        run_workers(torchrun(aborting_script(tmp_path, "raise")))
    first_line, *trace = str(failed.value).splitlines()
    assert first_line.endswith("ValueError: bad batch at step 3")
    assert trace[0] == "Traceback (most recent call last):"
    assert failed.value.signal is None


@pytest.mark.slow
def test_the_deepspeed_launcher_reports_an_aborted_worker_the_same_way(tmp_path):
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--master_port", str(free_port()), "--num_gpus", "2",
           aborting_script(tmp_path, "abort")]
    with pytest.raises(WorkerFailed, match=r"worker local_rank 1 was killed by SIGABRT: what\(\):  \[gloo"):
        run_workers(cmd)


def test_output_without_a_launcher_report_falls_back_to_its_last_lines():
    assert worker_error(["starting", "libgomp: Thread creation failed"]) == (
        "libgomp: Thread creation failed", ["starting", "libgomp: Thread creation failed"])
    assert worker_error([]) == ("no output", [])


def test_a_worker_killed_by_a_signal_is_the_root_cause_not_the_peer_that_lost_it():
    """As torchrun printed it when rank 1 of a ZeRO-3 run got SIGABRT mid-step: rank 0 raised first
    in its output ("connection closed by peer"), the launcher named rank 1."""
    lines = [
        "[mydistill] step 31 loss 2.41",
        "Traceback (most recent call last):",
        '  File "/work/main/mydistill/train.py", line 225, in train',
        "    run.engine.backward(out.loss)",
        "RuntimeError: [gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:50395. "
        "This is typically caused by a remote worker crashing.",
        "E1203 11:15:40.487000 6972 torch/distributed/elastic/multiprocessing/api.py:1002] failed (exitcode: -6) "
        "local_rank: 1 (pid: 6984) of binary: /usr/bin/python",
        "Traceback (most recent call last):",
        '  File "<frozen runpy>", line 198, in _run_module_as_main',
        '  File "/venv/lib/python3.11/site-packages/torch/distributed/run.py", line 1032, in <module>',
        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: ",
    ]
    error, trace = worker_error(lines)
    assert error == "worker local_rank 1 was killed by SIGABRT"
    assert trace == lines[:5]  # the workers' lines, the peer's error among them


def flaky_script(tmp_path, how: str) -> str:
    """Rank 1 fails as ``how`` says on the first start only (``always``: on every start); each start
    of rank 1 is counted in ``starts``."""
    path = tmp_path / "flaky.py"
    path.write_text(textwrap.dedent(f"""
        import os, sys, time
        if int(os.environ["RANK"]) == 1:
            starts = {str(tmp_path / "starts")!r}
            with open(starts, "a") as f:
                f.write("x")
            first = os.path.getsize(starts) == 1
            if {how!r} == "abort" and first or {how!r} == "always":
                os.abort()
            if {how!r} == "raise" and first:
                raise ValueError("bad config")
        os.write(1, b"done\\n")  # one write: two ranks' unbuffered prints can splice into "donedone"
    """))
    return str(path)


def test_workers_killed_by_a_signal_are_started_again_once(tmp_path):
    lines: list[str] = []
    script = flaky_script(tmp_path, "abort")
    run_workers_restarting(lambda: torchrun(script), restarts=1, on_line=lines.append)
    assert (tmp_path / "starts").read_text() == "xx"
    said = [line for line in lines if "restarting the workers" in line]
    assert said == ["[mydistill] training workers exited with code 1: worker local_rank 1 was killed by SIGABRT "
                    "— restarting the workers (1 of 1), from the last checkpoint"]
    restarted = lines.index(said[0])
    assert lines[restarted:].count("done") == 2  # both ranks of the second start finished


def test_a_python_error_is_not_restarted_and_a_second_abort_fails(tmp_path):
    script = flaky_script(tmp_path, "raise")
    with pytest.raises(WorkerFailed, match="ValueError: bad config"):
        run_workers_restarting(lambda: torchrun(script), restarts=1)
    assert (tmp_path / "starts").read_text() == "x"

    (tmp_path / "starts").unlink()
    script = flaky_script(tmp_path, "always")
    with pytest.raises(WorkerFailed, match="killed by SIGABRT") as failed:
        run_workers_restarting(lambda: torchrun(script), restarts=1)
    assert (tmp_path / "starts").read_text() == "xx" and failed.value.signal == "SIGABRT"


def test_an_unprefixed_traceback_keeps_its_exception_line_when_another_rank_prints_after_it():
    lines = [
        "Traceback (most recent call last):",
        '  File "/tmp/worker.py", line 12, in <module>',
        "rank 0 at step 3",  # rank 0, between rank 1's frames and its exception line
        "done",
        '    raise ValueError("bad batch at step 3")',
        "ValueError: bad batch at step 3",
        "rank 0 at step 4",
        "E1203 11:07:39.700000 2793 torch/distributed/elastic/multiprocessing/api.py:1002] failed (exitcode: 1) "
        "local_rank: 1 (pid: 2812) of binary: /usr/bin/python",
    ]
    error, trace = worker_error(lines)
    assert error == "ValueError: bad batch at step 3" and trace == lines[:6]
