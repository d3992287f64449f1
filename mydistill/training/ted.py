"""TED stage 1 in the distill stage: fit the teacher's layer filters before the student trains."""

from __future__ import annotations

import time
from typing import Any

import torch

from mydistill import io
from mydistill.config import DistillConfig
from mydistill.losses import DistillObjective
from mydistill.tokenization import TokenizedExample, collate
from mydistill.training.batches import batch_indices
from mydistill.training.engines import is_main_process
from mydistill.training.job import MetricsCallback, TrainJob


TED_FILTERS_FILE = "ted_teacher_filters.pt"


def fit_ted_filters(
    job: TrainJob, distill: DistillConfig | None, objective: DistillObjective, teacher: Any,
    examples: list[TokenizedExample], tokenizer: Any, device: torch.device, inputs: dict[str, Any],
    on_metrics: MetricsCallback | None,
) -> dict[str, float]:
    """TED stage 1 (``distill.loss.hidden.teacher_filter_steps`` > 0): train the objective's teacher
    filters on this stage's examples with the online teacher frozen (see :mod:`mydistill.losses.ted`).

    Every rank sees the same seeded batches and ends with rank 0's filters. The trained filters are
    kept beside the periodic checkpoints, so a resumed run reloads them instead of training again.
    Returns ``ted_filter_ce_start`` / ``ted_filter_ce_end`` / ``ted_filter_steps`` for the manifest
    ({} when stage 1 is off).
    """
    hidden = distill.loss.hidden if distill is not None else None
    if hidden is None or hidden.projection != "ted" or hidden.teacher_filter_steps == 0:
        return {}
    assert distill is not None and objective.hidden is not None
    if teacher is None:
        raise ValueError(
            "distill.loss.hidden.teacher_filter_steps > 0 trains the TED teacher filters on the online teacher, "
            "but this job has none (teacher_uri, not teacher-signal stores)"
        )
    from mydistill.losses.ted import fit_teacher_filters

    saved_path = io.join(job.checkpoints(), TED_FILTERS_FILE)  # local or s3://, as the checkpoints are
    inputs_sha256 = io.sha256_of(inputs)
    if distill.resume and io.exists(saved_path):
        fs, path = io.filesystem(saved_path)
        with fs.open(path, "rb") as f:
            saved = torch.load(f, map_location=device, weights_only=True)
        if saved["inputs_sha256"] == inputs_sha256:
            objective.hidden.load_teacher_filters(saved["filters"])
            if is_main_process():
                print(f"[mydistill] distill: TED teacher filters reloaded from {saved_path}", flush=True)
            return saved["metrics"]
    order = batch_indices(len(examples), distill.batch_size, distill.seed)
    batches = (
        {k: v.to(device) for k, v in collate([examples[i] for i in next(order)], tokenizer.pad_token_id).items()}
        for _ in range(hidden.teacher_filter_steps)
    )
    started = time.perf_counter()
    fit = fit_teacher_filters(
        objective.hidden, teacher, batches, steps=hidden.teacher_filter_steps, lr=hidden.teacher_filter_lr,
        ignore_index=distill.loss.ignore_index, chunk_size=distill.loss.chunk_size,
    )
    metrics = {"ted_filter_ce_start": fit.ce_start, "ted_filter_ce_end": fit.ce_end,
               "ted_filter_steps": float(hidden.teacher_filter_steps)}
    if is_main_process():
        print(
            f"[mydistill] distill: TED teacher filters trained for {hidden.teacher_filter_steps} steps, "
            f"CE {fit.ce_start:.4f} -> {fit.ce_end:.4f} ({time.perf_counter() - started:.1f}s)",
            flush=True,
        )
        if on_metrics is not None:
            on_metrics(metrics, 0)
        if distill.save_every:  # checkpoints will be written: keep the filters for a resumed run
            state = {"inputs_sha256": inputs_sha256, "metrics": metrics,
                     "filters": {k: v.cpu() for k, v in objective.hidden.teacher_filters.state_dict().items()}}
            with io.atomic_open(saved_path, "wb") as f:
                torch.save(state, f)
    return metrics
