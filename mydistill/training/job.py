"""A training job: everything one run needs, JSON-serialisable so a launcher can hand it to workers."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from mydistill import io
from mydistill.config import DistillConfig, TrainConfig


Stage = Literal["distill", "finetune", "baseline", "teacher"]


MetricsCallback = Callable[[dict[str, float], int], None]


CHECKPOINTS_SUFFIX = ".checkpoints"


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, no usable data); the message says why."""


@dataclass
class TrainJob:
    """Everything one training run needs; JSON-serialisable so a launcher can hand it to workers."""

    stage: Stage
    data_uri: str
    output_uri: str
    tokenizer_uri: str
    train: dict[str, Any]
    val_uri: str | None = None
    init_uri: str | None = None
    arch: dict[str, Any] | None = None
    teacher_uri: str | None = None
    teacher_dtype: str = "auto"  # the frozen teacher's precision (teacher.dtype; 'auto': bf16 where supported)
    signal_uris: list[str] = field(default_factory=list)  # teacher-signal stores read instead of the teacher
    mlflow_run_id: str | None = None
    checkpoint_dir: str | None = None
    inputs: dict[str, Any] = field(default_factory=dict)

    def train_config(self) -> TrainConfig:
        cfg = (DistillConfig if self.stage == "distill" else TrainConfig).model_validate(self.train)
        if cfg.max_length is None:  # chosen from the data (stage_functions.train_job does this for the pipeline)
            from mydistill.stage_functions import job_lengths
            cfg = cfg.model_copy(update={"max_length": job_lengths(self, cfg)["max_length"]})
        return cfg

    def checkpoints(self) -> str:
        """Where periodic checkpoints go: beside a local output, or a local cache for a remote one."""
        if self.checkpoint_dir:
            return self.checkpoint_dir
        if io.is_remote(self.output_uri):
            key = io.sha256_of(self.output_uri)[:16]
            return os.path.join(os.path.expanduser("~"), ".cache", "mydistill", "checkpoints", key)
        return self.output_uri.rstrip("/") + CHECKPOINTS_SUFFIX

    def to_json(self) -> str:
        return json.dumps(asdict(self))
