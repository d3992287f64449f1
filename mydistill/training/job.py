"""A training job: everything one run needs, JSON-serialisable so a launcher can hand it to workers."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from mydistill import io
from mydistill.config import DistillConfig, TrainConfig


Stage = Literal["distill", "finetune", "baseline", "teacher"]


MetricsCallback = Callable[[dict[str, float], int], None]


CHECKPOINTS_SUFFIX = ".checkpoints"
JOB_SUFFIX = ".job.json"


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
    # the DeepSpeed config's content, read where the job was written (launch.write_job), so that no
    # node resolves train['deepspeed'] against a working directory of its own
    deepspeed_config: dict[str, Any] | None = None

    def train_config(self) -> TrainConfig:
        cfg = (DistillConfig if self.stage == "distill" else TrainConfig).model_validate(self.train)
        if cfg.max_length is None:  # chosen from the data (stage_functions.train_job does this for the pipeline)
            cfg = cfg.model_copy(update={"max_length": job_lengths(self, cfg)["max_length"]})
        return cfg

    def checkpoints(self) -> str:
        """Where periodic checkpoints go: beside the output, local or ``s3://``, so that every node
        (and a run restarted on other nodes) finds them (see :class:`~mydistill.training.checkpoints.CheckpointStore`)."""
        if self.checkpoint_dir:
            return self.checkpoint_dir
        return self.output_uri.rstrip("/") + CHECKPOINTS_SUFFIX

    def job_uri(self) -> str:
        """Where :func:`~mydistill.training.launch.write_job` puts this job: beside its output, so that
        every node reads it there and a retry of the same job writes the same file."""
        return self.output_uri.rstrip("/") + JOB_SUFFIX

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def job_lengths(job: TrainJob, train_cfg: Any = None) -> dict[str, Any]:
    """:func:`~mydistill.tokenization.length_report` for a training job's data and tokenizer: the
    ``max_length`` it needs (when the job leaves it empty) capped by the student's positions, and
    how many examples do not fit."""
    from mydistill.models import load_tokenizer
    from mydistill.tokenization import length_report, prompt_prefix_of

    train_cfg = train_cfg or TrainConfig.model_validate({k: v for k, v in job.train.items() if k in TrainConfig.model_fields})
    cap = train_cfg.max_length_cap
    positions = (job.arch or {}).get("max_position_embeddings")
    if positions is None and job.init_uri and io.exists(io.join(job.init_uri, "config.json")):
        positions = io.read_json(io.join(job.init_uri, "config.json")).get("max_position_embeddings")
    if isinstance(positions, int):
        cap = min(cap, positions)
    records = [r for r in io.read_records(job.data_uri) if "prompt" in r and "response" in r]
    kwargs = {"max_length": train_cfg.max_length, "percentile": train_cfg.max_length_percentile, "cap": cap,
              "prompt_prefix": prompt_prefix_of(job.init_uri)}
    report = length_report(records, load_tokenizer(job.tokenizer_uri), **kwargs)
    method = ((job.train.get("cross_tokenizer") or {}).get("method") or "none") if job.stage == "distill" else "none"
    if method != "none" and job.teacher_uri and train_cfg.max_length is None:
        # the teacher reads the same records through its own tokenizer, under the same max_length
        teacher_side = length_report(records, load_tokenizer(job.teacher_uri), **kwargs)
        if teacher_side["max_length"] > report["max_length"]:
            report = length_report(records, load_tokenizer(job.tokenizer_uri), **{**kwargs, "max_length": teacher_side["max_length"]})
            report["chosen_from_data"] = True
    return report
