"""The sharded teacher's DeepSpeed config, the config check, and the MFU peak lookup (one process;
the 2-process run is in test_train_distributed.py)."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from mydistill import io
from mydistill.config import REPO_ROOT, DistillConfig, TrainConfig
from mydistill.training.engines import deepspeed_config
from mydistill.training.metrics import peak_tflops
from mydistill.training.sharded_teacher import teacher_zero3_config


@pytest.mark.parametrize("name", ["zero3.json", "zero3_offload.json"])
def test_the_teachers_config_keeps_zero3_parameter_settings_and_drops_optimizer_ones(name):
    student = deepspeed_config(str(REPO_ROOT / "deploy" / "deepspeed" / name), TrainConfig(batch_size=4), torch.device("cpu"))
    teacher = teacher_zero3_config(student)
    zero = teacher["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["stage3_param_persistence_threshold"] == student["zero_optimization"]["stage3_param_persistence_threshold"]
    assert "offload_optimizer" not in zero and "stage3_gather_16bit_weights_on_model_save" not in zero
    assert zero.get("offload_param") == student["zero_optimization"].get("offload_param")
    assert teacher["bf16"] == {"enabled": False}  # follows the student's (resolved) precision
    assert teacher["train_micro_batch_size_per_gpu"] == 4
    assert "optimizer" not in teacher and "gradient_clipping" not in teacher


def test_teacher_sharding_needs_deepspeed():
    with pytest.raises(ValidationError, match="teacher_sharding: zero3 .* needs `deepspeed`"):
        DistillConfig(teacher_sharding="zero3")
    assert DistillConfig(teacher_sharding="zero3", deepspeed="deploy/deepspeed/zero3.json").teacher_sharding == "zero3"


def test_teacher_sharding_does_not_change_the_artifact_hash():
    """How the teacher is held is how the run is carried out, not what it learns."""
    from mydistill.config import RUN_ONLY_FIELDS

    a = DistillConfig(deepspeed="deploy/deepspeed/zero3.json")
    b = DistillConfig(deepspeed="deploy/deepspeed/zero3.json", teacher_sharding="zero3", peak_tflops=100)
    assert io.sha256_of(a.model_dump(exclude=RUN_ONLY_FIELDS)) == io.sha256_of(b.model_dump(exclude=RUN_ONLY_FIELDS))


def test_peak_tflops_is_configured_or_looked_up_by_gpu_name(monkeypatch):
    cpu = torch.device("cpu")
    assert peak_tflops(TrainConfig(), cpu) == 0.0  # no MFU on CPU
    assert peak_tflops(TrainConfig(peak_tflops=123.0), cpu) == 123.0
    cuda = torch.device("cuda", 0)
    for name, expected in [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA A100-SXM4-80GB", 312.0),
                           ("NVIDIA GeForce RTX 3090", 0.0)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, n=name: n)
        assert peak_tflops(TrainConfig(), cuda) == expected, name


def test_the_gathered_head_projects_like_the_models_own():
    from mydistill.training.sharded_teacher import GatheredHead

    linear = torch.nn.Linear(8, 5, bias=False)
    hidden = torch.randn(3, 8)
    torch.testing.assert_close(GatheredHead(linear.weight.detach())(hidden), linear(hidden).detach())


def test_ted_stage_one_is_refused_with_a_sharded_teacher():
    with pytest.raises(ValidationError, match="teacher_filter_steps > 0 .* teacher_sharding: zero3"):
        DistillConfig(
            teacher_sharding="zero3", deepspeed="deploy/deepspeed/zero3.json",
            loss={"hidden": {"projection": "ted", "teacher_filter_steps": 5}},
        )
