"""Two nodes on one machine against one node with two processes, and the time to resume after a node is lost.

Method. The same distill job (a small Llama student from scratch, a frozen teacher of the same
shape, ZeRO-3 on gloo CPU workers, the same global batch) runs three ways:

1. one node, two worker processes (``torchrun --nnodes 1``, as the Prefect task launches it);
2. two nodes, one worker each: two ``python -m mydistill.training.launch --job URI`` processes, each
   with its own working directory, TMPDIR and HOME, meeting by c10d rendezvous on loopback, the job,
   data, models and checkpoints on shared storage (a local folder, or S3 on a moto server with ``--s3``);
3. run 2 again with ``save_every``: node 1 is killed once the first checkpoint is complete, node 0
   gives up, both are started again with fresh folders and resume.

Reported: tokens/s of each (the mean of the workers' own ``tokens_per_s`` metric over the logged
windows after the first, which holds the start-up) and their ratio; the loss curves' largest
relative difference; for the restart, the seconds from starting the nodes again to the
"resumed from step" line (process start, rendezvous, model load, checkpoint download and load) and
to the finished model, beside the first attempt's time from its start to the complete checkpoint.

Both "nodes" share one machine's cores and loopback: the ratio shows the cost of the two-node code
path (rendezvous, per-node processes, shared storage), not of a network between machines.

    python benchmarks/two_nodes.py               # shared folder
    python benchmarks/two_nodes.py --s3          # moto S3 on loopback
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mydistill import io  # noqa: E402
from mydistill.config import DistillConfig  # noqa: E402
from mydistill.training.checkpoints import COMPLETE_FILE  # noqa: E402
from mydistill.training.job import TrainJob  # noqa: E402
from mydistill.training.launch import free_port, launch_training, write_job  # noqa: E402
from tests.mydistill.training.test_two_nodes import start_node  # noqa: E402 (one way to start a node, shared with the test)


def start_moto() -> subprocess.Popen:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
                       "MYDISTILL_S3_ENDPOINT_URL": endpoint})
    for _ in range(100):
        with contextlib.suppress(Exception):
            urllib.request.urlopen(endpoint, timeout=1)
            break
        time.sleep(0.1)
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
    return proc


def start_nodes(job_uri: str, root: Path) -> list[tuple[subprocess.Popen, Path]]:
    """Nodes 0 and 1 on this machine, each in a folder of its own, as the two-node test starts them."""
    port = free_port()
    return [start_node(job_uri, rank, port, root) for rank in (0, 1)]


def kill_node(proc: subprocess.Popen) -> None:
    """SIGKILL a node's launcher and every process under it, as a lost machine would go."""
    import psutil

    parent = psutil.Process(proc.pid)
    for p in [parent, *parent.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)
    proc.wait()


def wait_for_line(logs: list[Path], text: str, timeout: float) -> float:
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if any(text in log.read_text() for log in logs):
            return time.perf_counter()
        time.sleep(0.05)
    raise TimeoutError(f"no {text!r} in {logs} after {timeout:.0f}s")


def finish(nodes: list[tuple[subprocess.Popen, Path]]) -> None:
    for proc, log in nodes:
        if proc.wait(timeout=1800) != 0:
            raise RuntimeError(f"node failed: {log.read_text()[-3000:]}")


def throughput(history: list[dict]) -> float:
    windows = [h["tokens_per_s"] for h in history[1:]] or [history[0]["tokens_per_s"]]
    return sum(windows) / len(windows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--save-every", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8, help="per worker")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--s3", action="store_true", help="shared storage on S3 (a moto server on loopback)")
    args = parser.parse_args()

    from mydistill.demo.task import make_examples
    from mydistill.demo.tokenizer import build_tokenizer
    from mydistill.models import build_model

    moto = start_moto() if args.s3 else None
    scratch = Path(tempfile.mkdtemp(prefix="two-nodes-"))
    shared = "s3://bench/run" if args.s3 else str(scratch / "shared")
    try:
        arch = dict(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=4,
                    intermediate_size=4 * args.hidden, max_position_embeddings=128, tie_word_embeddings=True)
        tokenizer = build_tokenizer()
        local_model = str(scratch / "teacher")
        build_model(arch, tokenizer, seed=1).save_pretrained(local_model)
        tokenizer.save_pretrained(local_model)
        records = [{"prompt": e["prompt"], "response": e["answer"]} for e in make_examples(512, seed=3)]
        io.write_records(io.join(shared, "train.jsonl"), records)
        io.copy_dir(local_model, io.join(shared, "teacher"))

        def job(name: str, **train) -> TrainJob:
            cfg = DistillConfig(steps=args.steps, batch_size=args.batch_size, warmup_steps=5, log_every=10, max_length=64,
                                launcher="torchrun", threads=1, deepspeed="deploy/deepspeed/zero3.json", **train)
            return TrainJob(stage="distill", data_uri=io.join(shared, "train.jsonl"), output_uri=io.join(shared, name),
                            tokenizer_uri=io.join(shared, "teacher"), teacher_uri=io.join(shared, "teacher"), arch=arch,
                            train=cfg.model_dump())

        started = time.perf_counter()
        one = launch_training(job("one-node", num_processes=2))
        one_wall = time.perf_counter() - started

        started = time.perf_counter()
        nodes = start_nodes(write_job(job("two-nodes", nodes=2, num_processes=1)), scratch / "two")
        finish(nodes)
        two_wall = time.perf_counter() - started
        two = io.read_manifest(io.join(shared, "two-nodes"))

        # run 2 with checkpoints; node 1 lost after the first complete one
        lost = job("lost-node", nodes=2, num_processes=1, save_every=args.save_every)
        job_uri = write_job(lost)
        started = time.perf_counter()
        nodes = start_nodes(job_uri, scratch / "lost")
        marker = io.join(lost.checkpoints(), f"step{args.save_every}", COMPLETE_FILE)
        while not io.exists(marker):
            if any(p.poll() is not None for p, _ in nodes):
                raise RuntimeError("a node ended before the first checkpoint: " + nodes[0][1].read_text()[-3000:])
            time.sleep(0.05)
        first_step = time.perf_counter() - started
        kill_node(nodes[1][0])
        nodes[0][0].wait(timeout=300)
        restarted = time.perf_counter()
        nodes = start_nodes(job_uri, scratch / "restarted")
        resumed_at = wait_for_line([log for _, log in nodes], "resumed from step", timeout=600)
        finish(nodes)
        done = time.perf_counter()
        resumed = io.read_manifest(lost.output_uri)
        steps = [h["step"] for h in resumed["history"]]

        worst = max(abs(b["loss"] - a["loss"]) / abs(a["loss"]) for a, b in zip(one["history"], two["history"], strict=True))
        print(f"storage: {'S3 (moto, loopback)' if args.s3 else 'shared local folder'}; {args.steps} steps, "
              f"global batch {2 * args.batch_size}, student {one['parameters']:,} parameters, ZeRO-3, gloo, "
              f"{os.cpu_count()} CPU cores")
        print(f"1 node x 2 processes: {throughput(one['history']):,.0f} tokens/s (wall {one_wall:.1f}s)")
        print(f"2 nodes x 1 process:  {throughput(two['history']):,.0f} tokens/s (wall {two_wall:.1f}s)")
        print(f"loss curves: largest relative difference {worst:.1e}")
        print(f"lost node: start to step-{args.save_every} checkpoint complete {first_step:.1f}s; restart to 'resumed' "
              f"{resumed_at - restarted:.1f}s, to the finished model {done - restarted:.1f}s; steps logged once each: "
              f"{steps == list(range(10, args.steps + 1, 10))}")
        print(f"tokens_per_s_ratio(2x1/1x2)={throughput(two['history']) / throughput(one['history']):.2f} "
              f"resume_s={resumed_at - restarted:.1f}")
    finally:
        if moto is not None:
            moto.terminate()
            moto.wait(timeout=10)
        import shutil

        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
