"""Several nodes, in the small: the node's command line from the cluster's environment, the job on
shared storage, the node count in the config, and checkpoints on S3 that any node resumes from.

The real two-node run (two torchrun nodes, ZeRO-3, S3) is in ``test_two_nodes.py`` (slow).
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from mydistill import io
from mydistill.config import RUN_ONLY_FIELDS, TrainConfig
from mydistill.train import TrainingError, TrainJob, run_training
from mydistill.training.checkpoints import COMPLETE_FILE, CheckpointStore
from mydistill.training.launch import node_command, write_job

from tests.conftest import TINY_ARCH

CLUSTER_ENV = ("PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT",
               "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def clean_env(monkeypatch):
    for name in CLUSTER_ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def test_a_node_takes_its_place_from_kubeflows_pet_environment(clean_env):
    clean_env.setenv("PET_NNODES", "4")
    clean_env.setenv("PET_NPROC_PER_NODE", "8")
    clean_env.setenv("PET_NODE_RANK", "2")
    clean_env.setenv("PET_MASTER_ADDR", "train-node-0-0.train")
    clean_env.setenv("PET_MASTER_PORT", "29400")
    cmd = node_command("s3://bucket/run/distill-abc.job.json")
    assert flag(cmd, "--nnodes") == "4" and flag(cmd, "--nproc-per-node") == "8"
    assert flag(cmd, "--rdzv-backend") == "c10d" and flag(cmd, "--rdzv-endpoint") == "train-node-0-0.train:29400"
    assert flag(cmd, "--rdzv-conf") == "is_host=false"  # node 0 hosts the rendezvous, not node 2
    assert cmd[-4:] == ["-m", "mydistill.train", "--job", "s3://bucket/run/distill-abc.job.json"]
    # the same job on every node meets in the same rendezvous
    assert flag(node_command("s3://bucket/run/distill-abc.job.json", node_rank=0), "--rdzv-id") == flag(cmd, "--rdzv-id")


def test_plain_master_variables_and_arguments_also_place_a_node(clean_env):
    clean_env.setenv("MASTER_ADDR", "10.0.0.1")
    clean_env.setenv("MASTER_PORT", "23456")
    clean_env.setenv("NODE_RANK", "0")
    cmd = node_command("/shared/job.json", nodes=2, nproc_per_node=1)
    assert flag(cmd, "--rdzv-endpoint") == "10.0.0.1:23456" and flag(cmd, "--rdzv-conf") == "is_host=true"
    given = node_command("/shared/job.json", nodes=2, nproc_per_node=1, node_rank=1, master_addr="10.0.0.9", master_port=1)
    assert flag(given, "--rdzv-endpoint") == "10.0.0.9:1" and flag(given, "--rdzv-conf") == "is_host=false"


def test_several_nodes_without_a_master_address_say_which_variable_to_set(clean_env):
    with pytest.raises(ValueError, match=r"2 nodes meet at node 0's address: set MASTER_ADDR \(or PET_MASTER_ADDR\)"):
        node_command("/shared/job.json", nodes=2)


def test_one_node_keeps_its_loopback_launch(clean_env):
    clean_env.setenv("MASTER_ADDR", "10.0.0.1")  # a single node never leaves the machine
    cmd = node_command("/tmp/job.json", nodes=1, nproc_per_node=2)
    assert flag(cmd, "--nnodes") == "1" and flag(cmd, "--master_addr") == "127.0.0.1" and "--rdzv-backend" not in cmd


def test_the_deepspeed_launchers_hostfile_is_made_absolute(clean_env, tmp_path):
    (tmp_path / "hosts").write_text("node-a slots=8\nnode-b slots=8\n")
    clean_env.chdir(tmp_path)
    ssh = node_command("/shared/job.json", nodes=2, nproc_per_node=8, launcher="deepspeed", hostfile="hosts", master_addr="node-a")
    assert flag(ssh, "--hostfile") == str(tmp_path / "hosts") and "--no_ssh" not in ssh  # node 0 reaches node-b by ssh
    clean_env.setenv("PET_NODE_RANK", "1")
    each = node_command("/shared/job.json", nodes=2, nproc_per_node=8, launcher="deepspeed", hostfile="hosts", master_addr="node-a")
    assert "--no_ssh" in each and flag(each, "--node_rank") == "1"  # every node starts its own launcher
    with pytest.raises(io.DataError, match=r"hostfile missing-hosts: not found \(looked in"):
        node_command("/shared/job.json", nodes=2, launcher="deepspeed", hostfile="missing-hosts", master_addr="node-a")


def test_nodes_in_the_config_are_checked_and_leave_old_hashes_alone():
    with pytest.raises(ValueError, match="nodes: 2 starts a worker process on every node, so it needs launcher torchrun"):
        TrainConfig(nodes=2)
    with pytest.raises(ValueError, match="nodes: 2 with launcher deepspeed needs a hostfile"):
        TrainConfig(nodes=2, launcher="deepspeed")
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        TrainConfig(nodes=0, launcher="torchrun")
    assert TrainConfig(nodes=3, launcher="torchrun").nodes == 3
    # artifact names and cache keys made before the field existed stay as they were
    assert "nodes" not in TrainConfig().model_dump(exclude=RUN_ONLY_FIELDS)


def test_the_job_is_written_beside_its_output_with_its_deepspeed_config(tmp_path, monkeypatch):
    cfg = TrainConfig(launcher="torchrun", deepspeed="deploy/deepspeed/zero3.json", max_length=32)
    job = TrainJob(stage="finetune", data_uri="d.jsonl", output_uri=str(tmp_path / "distill-abc"), tokenizer_uri="t",
                   train=cfg.model_dump())
    monkeypatch.chdir(tmp_path)  # not the repository: the preset path is found all the same
    uri = write_job(job)
    assert uri == str(tmp_path / "distill-abc.job.json") and write_job(job) == uri  # a retry finds the same file
    written = TrainJob(**io.read_json(uri))
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    with open(os.path.join(repo, "deploy", "deepspeed", "zero3.json")) as f:
        assert written.deepspeed_config == json.load(f)  # no node resolves the path against its own cwd
    assert job.deepspeed_config is None  # the caller's job is left as it was
    relative = TrainJob(stage="finetune", data_uri="d.jsonl", output_uri="runs/out", tokenizer_uri="t", train=cfg.model_dump())
    assert write_job(relative) == str(tmp_path / "runs" / "out.job.json")  # a path any working directory can read


class FakeEngine:
    """Writes what a ZeRO-3 rank writes (its shard and the shared files) and reads its client state back."""

    def __init__(self, rank: int = 0):
        self.rank = rank
        self.loaded_from: str | None = None

    def save_checkpoint(self, directory, tag, client_state):
        os.makedirs(os.path.join(directory, tag), exist_ok=True)
        with open(os.path.join(directory, tag, f"zero_pp_rank_{self.rank}_mp_rank_00_model_states.pt"), "w") as f:
            json.dump(client_state, f)

    def load_checkpoint(self, directory, tag):
        self.loaded_from = os.path.join(directory, tag)
        with open(os.path.join(directory, tag, f"zero_pp_rank_{self.rank}_mp_rank_00_model_states.pt")) as f:
            return json.load(f)


def test_checkpoints_on_s3_resume_from_the_newest_complete_one(s3_endpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the staging folder lives under the node's own TMPDIR
    uri = f"s3://mydistill-test/{tmp_path.name}/distill-abc.checkpoints"
    store = CheckpointStore(uri)
    for step in (2, 4, 6):
        store.save(FakeEngine(), f"step{step}", {"step": step})
    assert store.complete_tags() == ["step4", "step6"]  # the last two are kept
    assert io.read_text(io.join(uri, "latest")) == "step6"
    # a node lost in the middle of saving step 8: its files are there, the marker is not
    io.write_text(io.join(uri, "step8", "zero_pp_rank_0_mp_rank_00_model_states.pt"), json.dumps({"step": 8}))
    # another rank's shard of step 6, which this rank must not download
    io.write_text(io.join(uri, "step6", "zero_pp_rank_1_mp_rank_00_model_states.pt"), json.dumps({"step": 6}))
    store.close()

    other_node = CheckpointStore(uri)  # another machine: another staging folder, nothing local
    engine = FakeEngine()
    assert other_node.load(engine) == {"step": 6}
    assert sorted(os.listdir(engine.loaded_from)) == [COMPLETE_FILE, "zero_pp_rank_0_mp_rank_00_model_states.pt"]
    other_node.save(FakeEngine(), "step8", {"step": 8})  # the incomplete step 8 is written again, whole
    assert other_node.complete_tags() == ["step6", "step8"]
    other_node.remove()
    other_node.close()
    assert not io.exists(uri) and not os.path.exists(engine.loaded_from)


def test_a_run_on_s3_keeps_its_checkpoints_there_and_resumes_from_them(s3_endpoint, tmp_path, tiny_model_dir, monkeypatch):
    """In process (the plain engine): a run stopped at step 5 resumes from step 4 on S3, not from ~/.cache."""
    import mydistill.train as train_module
    from mydistill.demo.task import make_examples

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    base = f"s3://mydistill-test/{tmp_path.name}"
    io.write_records(f"{base}/train.jsonl", [{"prompt": e["prompt"], "response": e["answer"]} for e in make_examples(32, seed=5)])
    cfg = TrainConfig(steps=8, batch_size=8, warmup_steps=2, log_every=1, save_every=2, max_length=48)
    the_job = TrainJob(stage="finetune", data_uri=f"{base}/train.jsonl", output_uri=f"{base}/out", tokenizer_uri=tiny_model_dir,
                       arch=TINY_ARCH, train=cfg.model_dump())
    assert the_job.checkpoints() == f"{base}/out.checkpoints"
    real = train_module.forward_loss
    calls = {"n": 0}

    def stop_at_step_5(*args, **kwargs):
        calls["n"] += 1
        out = real(*args, **kwargs)
        return out._replace(loss=out.loss * torch.tensor(float("nan"))) if calls["n"] == 5 else out

    monkeypatch.setattr(train_module, "forward_loss", stop_at_step_5)
    with pytest.raises(TrainingError, match=rf"The last good checkpoint \(step4\) is kept in {base}/out.checkpoints"):
        run_training(the_job)
    assert CheckpointStore(the_job.checkpoints()).complete_tags() == ["step2", "step4"]
    assert not os.path.exists(tmp_path / "home" / ".cache" / "mydistill" / "checkpoints")

    monkeypatch.setattr(train_module, "forward_loss", real)
    manifest = run_training(the_job)
    assert [h["step"] for h in manifest["history"]] == list(range(1, 9))  # steps 1-4 from the checkpoint, none twice
    assert not io.exists(the_job.checkpoints())
