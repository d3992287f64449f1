"""The student of a training job: loaded from a checkpoint or built from an architecture."""

from __future__ import annotations

from typing import Any

import torch

from mydistill import io
from mydistill.config import TrainConfig
from mydistill.models import build_model, load_model
from mydistill.training.job import TrainJob


def student_vocab_size(job: TrainJob, tokenizer: Any) -> int:
    """The student's output vocabulary, read before the student is loaded (a store is checked first)."""
    if job.init_uri:
        config = io.read_json(io.join(job.init_uri, "config.json"))
        return int(config.get("vocab_size") or config.get("text_config", {}).get("vocab_size") or len(tokenizer))
    return len(tokenizer)  # build_model sizes the vocabulary from the tokenizer


def load_student(job: TrainJob, cfg: TrainConfig, tokenizer: Any, device: torch.device) -> Any:
    if job.init_uri:
        return load_model(job.init_uri, device=device)
    if job.arch:
        # Built whole on each process from the same seed; deepspeed.initialize then partitions it.
        return build_model(job.arch, tokenizer, seed=cfg.seed).to(device)
    raise ValueError("a training job needs init_uri (a checkpoint) or arch (build from config)")
