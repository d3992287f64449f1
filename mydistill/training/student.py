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


def freeze_parameters(student: torch.nn.Module, patterns: list[str], stage: str = "train") -> int:
    """Leave the student's parameters named by ``patterns`` (shell-style, :mod:`fnmatch`) as they
    start; returns how many values are frozen. A tied parameter (the input embedding that is also
    the output head) is matched by any of its names and frozen under all of them. A pattern that
    names no parameter, or patterns that leave nothing to train, are refused with the names there are."""
    import fnmatch

    from mydistill.training.job import TrainingError

    if not patterns:
        return 0
    named = list(student.named_parameters(remove_duplicate=False))
    matched: dict[int, torch.nn.Parameter] = {}
    for pattern in patterns:
        hits = [p for name, p in named if fnmatch.fnmatchcase(name, pattern)]
        if not hits:
            examples = ", ".join(dict.fromkeys(name for name, _ in named[:4]))
            raise TrainingError(
                f"{stage}.freeze: '{pattern}' names no parameter of the student (its names look like {examples}, ...)"
            )
        matched.update((id(p), p) for p in hits)
    unique = {id(p): p for _, p in named}
    if len(matched) == len(unique):
        raise TrainingError(f"{stage}.freeze: {patterns} freezes every parameter of the student; nothing would be trained")
    for p in matched.values():
        p.requires_grad_(False)
    # a ZeRO-3 partitioned parameter holds only this process's share; ds_numel is its full size
    return sum(getattr(p, "ds_numel", p.numel()) for p in matched.values())
