"""A full disk while a shard, a periodic checkpoint or the final model is written: the error names
the path and says the disk is full, the earlier checkpoint stays intact, the re-run resumes from it.

The disk is a real size-limited file system (a 16 MiB tmpfs) filled with a ballast file at the
chosen moment; mounting it needs root, and without it these tests are skipped (nothing simulated).
"""

from __future__ import annotations

import os
import subprocess

import pytest
import torch

from mydistill import io
from mydistill.config import TrainConfig
from mydistill.train import TrainJob, run_training
from tests.conftest import TINY_ARCH


@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs here ({mounted.stderr.strip()[:80]}); needs root")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk) -> str:
    """Fill ``disk`` to the last byte with a ballast file; returns its path (remove it to free the disk)."""
    ballast = os.path.join(disk, "ballast")
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for size in (1 << 20, 4096, 1):  # then the last partial blocks
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                pass
    finally:
        os.close(fd)
    return ballast


def test_a_shard_written_on_a_full_disk_names_the_path_and_leaves_nothing(small_disk):
    earlier = str(small_disk / "responses" / "shard-00000.jsonl")
    io.write_records(earlier, [{"prompt": "p", "response": "r"}])
    before = open(earlier, "rb").read()
    ballast = fill(small_disk)
    shard = str(small_disk / "responses" / "shard-00001.jsonl")
    with pytest.raises(io.DiskFull) as raised:
        io.write_records(shard, [{"prompt": "p" * 100, "response": "r" * 10_000}] * 10)
    message = str(raised.value)
    assert message.startswith(f"{shard}: the disk is full") and "\n" not in message, message
    assert sorted(os.listdir(small_disk / "responses")) == ["shard-00000.jsonl"], "no half-written temporary file"
    assert open(earlier, "rb").read() == before
    os.remove(ballast)
    io.write_records(shard, [{"prompt": "p", "response": "r"}])
    assert io.read_records(shard) == [{"prompt": "p", "response": "r"}]


def test_a_full_disk_at_a_checkpoint_and_at_the_final_save_keeps_the_last_checkpoint_and_the_rerun_resumes(
    small_disk, tmp_path, tiny_model_dir, capsys,
):
    from mydistill.demo.task import make_examples

    data = str(tmp_path / "train.jsonl")
    io.write_records(data, [{"prompt": e["prompt"], "response": e["answer"]} for e in make_examples(32, seed=5)])
    train = TrainConfig(steps=6, batch_size=8, lr=3e-3, warmup_steps=1, log_every=1, eval_every=100, save_every=2)
    job = TrainJob(stage="finetune", data_uri=data, val_uri=data, output_uri=str(small_disk / "out"),
                   tokenizer_uri=tiny_model_dir, train=train.model_dump(), arch=TINY_ARCH)
    checkpoints = small_disk / "out.checkpoints"
    ballast: list[str] = []

    def fill_at(at_step: int):
        def on_metrics(metrics, step):
            if step == at_step and not ballast:
                ballast.append(fill(small_disk))
        return on_metrics

    # 1. the disk fills after step 3: the step-4 checkpoint cannot be written
    with pytest.raises(io.DiskFull) as raised:
        run_training(job, on_metrics=fill_at(3))
    assert str(raised.value).startswith(f"{checkpoints}/step4/state.pt: the disk is full"), raised.value
    assert (checkpoints / "latest").read_text() == "step2"
    torch.load(checkpoints / "step2" / "state.pt", weights_only=False)  # intact
    os.remove(ballast.pop())

    # 2. the re-run resumes from step 2; the disk fills before the final model is saved
    with pytest.raises(io.DiskFull) as raised:
        run_training(job, on_metrics=fill_at(6))
    assert "resumed from step 2" in capsys.readouterr().out
    assert str(raised.value).startswith(f"{job.output_uri}: the disk is full") and "\n" not in str(raised.value), raised.value
    assert not (small_disk / "out").exists() and not [f for f in os.listdir(small_disk) if ".tmp-" in f]
    assert (checkpoints / "latest").read_text() == "step4"
    os.remove(ballast.pop())

    # 3. with room again, the re-run resumes from step 4 and finishes
    manifest = run_training(job)
    assert "resumed from step 4" in capsys.readouterr().out
    assert manifest["history"][-1]["step"] == 6
    assert io.read_manifest(job.output_uri) is not None and not checkpoints.exists()
