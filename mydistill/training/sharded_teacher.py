"""A frozen teacher partitioned across the worker processes by ZeRO-3 (inference only).

A 70B teacher does not fit one 80 GB device beside a student. With ``distill.teacher_sharding:
zero3`` each of the N processes keeps 1/N of the teacher's weights; every forward pass gathers a
layer's weights just before the layer runs and frees them right after (DeepSpeed's ZeRO-3 hooks),
so the teacher's resident size per device is its size / N plus one layer in flight. No optimizer
state and no gradients exist for it.

The teacher's output projection is gathered once and kept whole on every process: the student's
chunked loss multiplies the teacher's hidden states with it chunk by chunk, outside the teacher's
own forward pass, where ZeRO-3 would not gather it (vocab x width x 2 bytes: 2.1 GB for a 70B
teacher at V = 128,256 in bf16, against 140 GB for the whole model).

Every process must run the teacher on every step (each forward pass is a collective), which the
training loop does: all ranks take one batch per step.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from mydistill.models import count_parameters, load_model


def teacher_zero3_config(student_ds_config: dict[str, Any]) -> dict[str, Any]:
    """The teacher's DeepSpeed config: the student's precision and ZeRO-3 parameter settings
    (including parameter offload), without optimizer, gradients or their offload."""
    zero = student_ds_config.get("zero_optimization", {})
    keep = {
        k: v
        for k, v in zero.items()
        if (k.startswith("stage3_") and k != "stage3_gather_16bit_weights_on_model_save") or k == "offload_param"
    }
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": student_ds_config.get("train_micro_batch_size_per_gpu", 1),
        "zero_optimization": {"stage": 3, **copy.deepcopy(keep)},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    for precision in ("bf16", "fp16"):
        if precision in student_ds_config:
            config[precision] = {"enabled": bool(student_ds_config[precision].get("enabled"))}
    return config


class GatheredHead:
    """The teacher's output projection, whole, outside ZeRO-3 (``weight`` and ``head(hidden)``)."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(hidden.to(self.weight.dtype), self.weight)


class ShardedTeacher:
    """The frozen teacher as ZeRO-3 shards, with the interface the trainer uses of a teacher:
    ``.model(...)`` (the body, returning hidden states), ``.lm_head.weight`` (gathered, whole),
    ``.config``, and ``teacher(...)`` for a full forward pass."""

    def __init__(self, uri: str, student_ds_config: dict[str, Any], device: torch.device) -> None:
        from mydistill.training.process import import_deepspeed

        deepspeed = import_deepspeed()
        from transformers.integrations import HfDeepSpeedConfig

        self.ds_config = teacher_zero3_config(student_ds_config)
        loading = HfDeepSpeedConfig(self.ds_config)  # while alive, from_pretrained loads straight into shards
        try:
            model = load_model(uri, device=device)
        finally:
            del loading  # the student's own loading must not see the teacher's config
        model.eval().requires_grad_(False)
        engine, *_ = deepspeed.initialize(model=model, config=self.ds_config)
        engine.module.eval()
        self.engine = engine
        self.module = engine.module
        self.config = self.module.config
        head = self.module.get_output_embeddings().weight
        with deepspeed.zero.GatheredParameters([head]):
            self.lm_head = GatheredHead(head.detach().clone())

    @property
    def model(self) -> Any:
        return self.module.model

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def parameters(self) -> Any:
        return self.module.parameters()

    def partition_stats(self) -> dict[str, float]:
        """Parameters held by this process vs the whole teacher (ZeRO-3 keeps ``ds_tensor``, this
        rank's partition, on each partitioned parameter; ``count_parameters`` counts full sizes)."""
        total = count_parameters(self)
        local = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in self.parameters())
        return {
            "teacher_parameters": float(total),
            "teacher_parameters_local": float(local),
            "teacher_shard_fraction": local / max(total, 1),
        }
