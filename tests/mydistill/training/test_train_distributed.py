"""Real ZeRO-3 on 2 CPU processes (gloo), launched as the Prefect task launches it.

Each worker process costs seconds of imports, so these tests are few and marked slow.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import time

import pytest
import torch

from mydistill import io
from mydistill.config import DistillConfig, TrainConfig
from mydistill.training.launch import WorkerFailed, launch_command, launch_training
from mydistill.models import build_model, load_model, load_tokenizer
from mydistill.train import TrainJob

from tests.conftest import TINY_ARCH

pytestmark = pytest.mark.slow
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
ZERO3 = os.path.join(REPO, "deploy", "deepspeed", "zero3.json")
ZERO3_OFFLOAD = os.path.join(REPO, "deploy", "deepspeed", "zero3_offload.json")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from mydistill.demo.task import make_examples

    uri = str(tmp_path_factory.mktemp("data") / "train.jsonl")
    io.write_records(uri, [{"prompt": e["prompt"], "response": e["answer"]} for e in make_examples(96, seed=4)])
    return uri


UNTIED_ARCH = {**TINY_ARCH, "tie_word_embeddings": False}


def make_job(out, data, tokenizer_dir, *, stage="distill", teacher=None, arch=TINY_ARCH, **train):
    cls = DistillConfig if stage == "distill" else TrainConfig
    train = {"log_every": 5, **train}
    cfg = cls(batch_size=8, lr=3e-3, warmup_steps=2, launcher="torchrun", num_processes=2, threads=1, **train)
    return TrainJob(stage=stage, data_uri=data, output_uri=str(out), tokenizer_uri=tokenizer_dir, arch=arch,
                    teacher_uri=teacher, train=cfg.model_dump())


def torchelastic_dirs() -> set[str]:
    return {name for name in os.listdir(tempfile.gettempdir()) if name.startswith("torchelastic_")}


def test_zero3_distillation_on_two_processes(tmp_path, data, tiny_model_dir):
    lines: list[str] = []
    before = torchelastic_dirs()
    # an untied output projection: used by the fused loss outside its module, gathered by ZeRO-3
    job = make_job(tmp_path / "student", data, tiny_model_dir, teacher=tiny_model_dir, steps=12, deepspeed=ZERO3, arch=UNTIED_ARCH)
    manifest = launch_training(job, on_line=lines.append)
    assert manifest["world_size"] == 2 and manifest["deepspeed"] is True
    history = manifest["history"]
    assert history[-1]["loss"] < history[0]["loss"]
    assert {"kd", "ce", "tokens_per_s", "peak_memory_mb"} <= set(history[-1])
    assert any("[mydistill] done" in line for line in lines)  # worker output reached the caller
    # no library warning from our calls reaches the Prefect log (DeepSpeed's own deprecated torch calls
    # are filtered, narrowly: see mydistill.training.process.import_deepspeed)
    assert [line for line in lines if "warn" in line.lower()] == []
    assert torchelastic_dirs() == before  # torchrun's log folder went with the job's temporary folder
    # the consolidated model is whole (not a shard) and trained away from its initialisation
    from mydistill.models import build_model, load_tokenizer

    trained = load_model(str(tmp_path / "student"))
    init = build_model(UNTIED_ARCH, load_tokenizer(tiny_model_dir), seed=0)
    for name, p in init.state_dict().items():
        assert trained.state_dict()[name].shape == p.shape
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert not torch.allclose(trained.state_dict()[name], init.state_dict()[name]), name
    assert not os.path.exists(str(tmp_path / "student") + ".checkpoints")


def test_a_zero3_sharded_teacher_trains_the_student_as_a_whole_teacher_does(tmp_path, data, tiny_model_dir):
    """distill.teacher_sharding: zero3 keeps half the teacher on each of 2 processes, and the
    student's losses (and the validation loss, computed through ZeRO-3) match a whole teacher's."""
    from mydistill.demo.task import make_examples

    config = io.read_json(ZERO3)
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition even tiny tensors
    ds_path = str(tmp_path / "zero3.json")
    io.write_json(ds_path, config)
    val = str(tmp_path / "val.jsonl")
    io.write_records(val, [{"prompt": e["prompt"], "response": e["answer"]} for e in make_examples(16, seed=9)])
    runs = {}
    for sharding in ("none", "zero3"):
        job = make_job(tmp_path / sharding, data, tiny_model_dir, teacher=tiny_model_dir, steps=4, log_every=2,
                       eval_every=2, deepspeed=ds_path, arch=UNTIED_ARCH, teacher_sharding=sharding)
        job.val_uri = val
        runs[sharding] = launch_training(job)
    stats = runs["zero3"]["teacher_sharding"]
    assert "teacher_sharding" not in runs["none"]
    assert stats["teacher_parameters"] == sum(p.numel() for p in load_model(tiny_model_dir).parameters())
    assert 0.45 < stats["teacher_shard_fraction"] < 0.55  # this rank holds half of every tensor
    for whole, sharded in zip(runs["none"]["history"], runs["zero3"]["history"], strict=True):
        for key in ("loss", "kd", "ce", "val_loss"):
            assert sharded[key] == pytest.approx(whole[key], rel=1e-4), (key, whole["step"])


def test_zero3_with_cpu_offload_finetunes_what_is_not_frozen(tmp_path, data, tiny_model_dir):
    # the tied embedding frozen (partitioned and offloaded, but left out of the optimizer)
    job = make_job(tmp_path / "ft", data, tiny_model_dir, stage="finetune", steps=6, deepspeed=ZERO3_OFFLOAD,
                   freeze=["model.embed_tokens.*"])
    manifest = launch_training(job)
    assert manifest["deepspeed"] and manifest["history"][-1]["ce"] > 0
    trained = load_model(str(tmp_path / "ft")).state_dict()
    init = build_model(TINY_ARCH, load_tokenizer(tiny_model_dir), seed=0).state_dict()
    assert manifest["frozen_parameters"] == init["model.embed_tokens.weight"].numel()
    assert torch.equal(trained["model.embed_tokens.weight"], init["model.embed_tokens.weight"])
    assert not torch.allclose(trained["model.layers.0.mlp.up_proj.weight"], init["model.layers.0.mlp.up_proj.weight"])


def test_a_worker_error_fails_the_launch_with_the_workers_message(tmp_path, data, tiny_model_dir):
    # max_length given: else the launcher reads the data to choose it, and fails before any worker starts
    job = make_job(tmp_path / "bad", data, tiny_model_dir, steps=4, deepspeed=ZERO3, max_length=48)
    job.data_uri = str(tmp_path / "missing.jsonl")
    with pytest.raises(WorkerFailed, match="missing.jsonl: dataset not found"):
        launch_training(job)
    assert not (tmp_path / "bad").exists()


def kill_tree(pid: int) -> None:
    """SIGKILL the launcher and every worker at once, as a lost node would (workers run in
    sessions of their own, so killing the launcher's process group is not enough)."""
    import psutil

    parent = psutil.Process(pid)
    for p in [parent, *parent.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)


def test_sigkill_mid_training_resumes_from_the_last_checkpoint(tmp_path, data, tiny_model_dir):
    steps, every = 40, 10
    job = make_job(tmp_path / "killed", data, tiny_model_dir, steps=steps, save_every=every, deepspeed=ZERO3, teacher=tiny_model_dir)
    checkpoints = job.checkpoints()
    with tempfile.TemporaryDirectory() as tmp:
        job_path = os.path.join(tmp, "job.json")
        io.write_text(job_path, job.to_json())
        cmd = launch_command(job_path, launcher="torchrun", num_processes=2)
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, cwd=REPO)
        deadline = time.time() + 240
        latest = os.path.join(checkpoints, "latest")
        while time.time() < deadline and proc.poll() is None:
            if os.path.exists(latest) and open(latest).read().strip() == f"step{every}":
                break
            time.sleep(0.05)
        assert proc.poll() is None, "training finished before it could be killed"
        kill_tree(proc.pid)
        proc.wait()
    assert not (tmp_path / "killed" / "manifest.json").exists()

    lines: list[str] = []
    manifest = launch_training(job, on_line=lines.append)  # what a re-run of the flow does
    resumed = [line for line in lines if "resumed from step" in line]
    assert resumed and int(resumed[0].split("resumed from step ")[1].split()[0]) >= every
    steps_logged = [h["step"] for h in manifest["history"]]
    assert steps_logged == sorted(set(steps_logged)) and steps_logged[-1] == steps

    # same data position, optimizer and schedule: the result matches an uninterrupted run
    reference = make_job(tmp_path / "reference", data, tiny_model_dir, steps=steps, save_every=every, deepspeed=ZERO3, teacher=tiny_model_dir)
    launch_training(reference)
    a = load_model(str(tmp_path / "killed")).state_dict()
    b = load_model(str(tmp_path / "reference")).state_dict()
    for name in b:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)


def test_killing_the_launchers_process_group_leaves_no_worker_behind(tmp_path, data, tiny_model_dir):
    """kill -9 of the launcher's group (what stopping a task does) takes the workers with it, although
    torchrun starts them in sessions of their own; the re-run's checkpoint history is its own."""
    import psutil

    steps, every = 150, 5  # far more steps than the seconds the check waits: survivors would still be training
    job = make_job(tmp_path / "killed", data, tiny_model_dir, steps=steps, save_every=every, deepspeed=ZERO3)
    with tempfile.TemporaryDirectory() as tmp:
        job_path = os.path.join(tmp, "job.json")
        io.write_text(job_path, job.to_json())
        cmd = launch_command(job_path, launcher="torchrun", num_processes=2)
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, cwd=REPO)
        latest = os.path.join(job.checkpoints(), "latest")
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and not os.path.exists(latest):
            time.sleep(0.05)
        assert proc.poll() is None, "training finished before it could be killed"
        workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if job_path in " ".join(p.cmdline())]
        assert len(workers) == 2
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        gone, alive = psutil.wait_procs(workers, timeout=5)
        for survivor in alive:  # leave no orphan behind, whatever the verdict
            survivor.kill()
        assert alive == [], f"workers outlived their launcher: {[p.pid for p in alive]}"
    frozen = sorted(os.listdir(job.checkpoints()))
    time.sleep(2)  # nothing writes there any more
    assert sorted(os.listdir(job.checkpoints())) == frozen
    manifest = launch_training(job)
    steps_logged = [h["step"] for h in manifest["history"]]
    assert steps_logged == sorted(set(steps_logged)) and steps_logged[-1] == steps
