"""Two nodes on one machine: two torchrun node processes (one gloo worker each, ZeRO-3), each with
its own working directory, TMPDIR and HOME, started as a person starts a node by hand
(``python -m mydistill.training.launch --job URI`` with ``MASTER_ADDR``/``MASTER_PORT``/``NODE_RANK``),
meeting by c10d rendezvous. Everything they share is on S3 (moto): the job, the data, the
tokenizer and teacher, the checkpoints, the output.

What this leaves out: the nodes share one kernel, loopback and the CPU (no real network, no
node-local GPUs); a real cluster differs in the addresses and in speed, not in this code path.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mydistill import io
from mydistill.config import DistillConfig
from mydistill.training.checkpoints import COMPLETE_FILE
from mydistill.training.launch import free_port, launch_training, write_job
from mydistill.train import TrainJob

from tests.conftest import TINY_ARCH
from tests.mydistill.training.test_train_distributed import ZERO3, kill_tree

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[3]
STEPS, EVERY = 30, 10


def start_node(job_uri: str, rank: int, port: int, root: Path) -> tuple[subprocess.Popen, Path]:
    """Node ``rank`` in a folder of its own (cwd, TMPDIR, HOME); its output goes to ``root/node<rank>.log``."""
    home = root / f"node{rank}"
    for sub in ("cwd", "tmp", "home"):
        (home / sub).mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HOME": str(home / "home"), "TMPDIR": str(home / "tmp"),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "NODE_RANK": str(rank)}
    log = root / f"node{rank}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mydistill.training.launch", "--job", job_uri], cwd=home / "cwd",
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, log


def start_nodes(job_uri: str, root: Path) -> list[tuple[subprocess.Popen, Path]]:
    port = free_port()  # a fresh rendezvous port each time: the last one may linger in TIME_WAIT
    return [start_node(job_uri, rank, port, root) for rank in (0, 1)]


def wait_all(nodes, timeout: float) -> list[int]:
    deadline = time.time() + timeout
    for proc, log in nodes:
        try:
            proc.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            for p, _ in nodes:
                kill_tree(p.pid)
            pytest.fail(f"a node did not finish in {timeout:.0f}s; its output: {log.read_text()[-3000:]}")
    return [proc.returncode for proc, _ in nodes]


def make_job(data: str, tokenizer: str, output: str, **train) -> TrainJob:
    cfg = DistillConfig(steps=STEPS, batch_size=4, lr=3e-3, warmup_steps=2, log_every=1, save_every=EVERY, max_length=48,
                        launcher="torchrun", threads=1, deepspeed=ZERO3, **train)
    return TrainJob(stage="distill", data_uri=data, output_uri=output, tokenizer_uri=tokenizer, teacher_uri=tokenizer,
                    arch=TINY_ARCH, train=cfg.model_dump())


def test_two_nodes_on_s3_match_one_node_and_resume_after_losing_one(tmp_path, s3_endpoint, tiny_model_dir, monkeypatch):
    """The two-node run's loss curve equals one node with two processes (same global batch, same
    ranks' data) to 1e-5; node 1 killed after the step-10 checkpoint, both restarted with fresh
    folders, the run resumes from S3 and logs every step exactly once. On the restart node 0 is
    what the training stage runs (``launch_training``, its place from ``MASTER_ADDR``/``NODE_RANK``)."""
    from mydistill.demo.task import make_examples

    base = f"s3://mydistill-test/{tmp_path.name}"
    records = [{"prompt": e["prompt"], "response": e["answer"]} for e in make_examples(64, seed=4)]
    io.write_records(f"{base}/train.jsonl", records)
    io.copy_dir(tiny_model_dir, f"{base}/tiny")

    # the reference: one node, two processes, local files
    local_data = str(tmp_path / "train.jsonl")
    io.write_records(local_data, records)
    t0 = time.perf_counter()
    reference = launch_training(make_job(local_data, tiny_model_dir, str(tmp_path / "reference"), num_processes=2))

    job = make_job(f"{base}/train.jsonl", f"{base}/tiny", f"{base}/student", nodes=2, num_processes=1)
    job_uri = write_job(job)
    assert io.is_remote(job_uri)
    t1 = time.perf_counter()
    first = start_nodes(job_uri, tmp_path / "first")
    marker = io.join(job.checkpoints(), f"step{EVERY}", COMPLETE_FILE)
    deadline = time.time() + 300
    while time.time() < deadline and all(p.poll() is None for p, _ in first) and not io.exists(marker):
        time.sleep(0.1)
    assert all(p.poll() is None for p, _ in first), "a node ended before the first checkpoint: " + first[0][1].read_text()[-3000:]
    t2 = time.perf_counter()
    kill_tree(first[1][0].pid)  # node 1 is lost
    first[1][0].wait()
    codes = wait_all(first[:1], timeout=120)  # node 0's worker loses its peer and its launcher gives up
    assert codes != [0] and io.read_manifest(job.output_uri) is None, "the run finished before node 1 was lost"

    started = time.perf_counter()
    port = free_port()
    node1, node1_log = start_node(job_uri, 1, port, tmp_path / "second")  # another folder, as on another machine
    for name, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "NODE_RANK": "0"}.items():
        monkeypatch.setenv(name, value)
    lines: list[str] = []
    try:
        manifest = launch_training(job, on_line=lines.append)  # the stage's own launch, as node 0: the same job file
    finally:
        if node1.poll() is None:
            wait_all([(node1, node1_log)], timeout=60)
    assert node1.returncode == 0, node1_log.read_text()[-3000:]
    assert any(f"start the others with `python -m mydistill.training.launch --job {job_uri}`" in line for line in lines)
    output = "\n".join(lines) + node1_log.read_text()
    resumed = [line for line in output.splitlines() if "resumed from step" in line]
    assert len(resumed) == 1 and f"({job.checkpoints()})" in resumed[0], output[-3000:]
    step = int(resumed[0].split("resumed from step ")[1].split()[0])
    assert EVERY <= step < STEPS
    print(f"reference {t1 - t0:.1f}s, to checkpoint {t2 - t1:.1f}s, node 0 gone {started - t2:.1f}s; "
          f"resumed from step {step} on S3; restart to finish {time.perf_counter() - started:.1f}s")

    assert manifest["world_size"] == 2 and not io.exists(job_uri)  # the job file goes once the model is saved
    assert [h["step"] for h in manifest["history"]] == list(range(1, STEPS + 1))  # none lost, none repeated
    for one, two in zip(reference["history"], manifest["history"], strict=True):
        for key in ("loss", "kd", "ce"):
            assert two[key] == pytest.approx(one[key], rel=1e-5), (key, one["step"])
    assert not io.exists(job.checkpoints())  # dropped once the model was saved
