"""The training entrypoint for both stages: ``python -m mydistill.train --job job.json``.

setup → train → save, top to bottom. Stage 1 (``distill``) learns from the frozen teacher's
signal through :class:`mydistill.losses.DistillObjective`; stage 2 (``finetune``), the baseline
and the demo teacher's own bootstrap use the same loop with cross-entropy only.

The student is prepared in one place (:func:`prepare_student`) and only rank 0 logs and saves, so
the loop is ready for a distributed launcher.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from mydistill import io
from mydistill.config import DistillConfig, TrainConfig
from mydistill.losses import DistillObjective, LossConfig
from mydistill.models import build_model, check_same_vocabulary, count_parameters, load_model, load_tokenizer
from mydistill.tokenization import IGNORE_INDEX, TokenizedExample, collate, shift_labels, tokenize_example

Stage = Literal["distill", "finetune", "baseline", "teacher"]
MetricsCallback = Callable[[dict[str, float], int], None]


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
    mlflow_run_id: str | None = None
    inputs: dict[str, Any] = field(default_factory=dict)

    def train_config(self) -> TrainConfig:
        return (DistillConfig if self.stage == "distill" else TrainConfig).model_validate(self.train)


# ----------------------------------------------------------------------------------------------
# setup


def is_main_process() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or torch.distributed.get_rank() == 0


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_examples(uri: str, tokenizer: Any, max_length: int) -> list[TokenizedExample]:
    records = io.read_records(uri)
    examples = []
    for i, r in enumerate(records):
        if "prompt" not in r or "response" not in r:
            raise io.DataError(f"{uri}: record {i + 1} needs 'prompt' and 'response' fields (has {sorted(r)})")
        examples.append(tokenize_example(tokenizer, r["prompt"], r["response"], max_length))
    if not examples:
        raise io.DataError(f"{uri}: no training records")
    return examples


def batches(examples: list[TokenizedExample], batch_size: int, pad_token_id: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """Endless shuffled batches, reshuffled each epoch from ``seed`` (so a run is reproducible)."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(examples), generator=generator).tolist()
        for start in range(0, len(order) - batch_size + 1 if len(order) >= batch_size else 1, batch_size):
            yield collate([examples[i] for i in order[start : start + batch_size]], pad_token_id)


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    def schedule(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return schedule


def prepare_student(student: torch.nn.Module, objective: torch.nn.Module, cfg: TrainConfig):
    """The one place the student is wrapped for training: optimizer and schedule (DeepSpeed later)."""
    params = [p for p in list(student.parameters()) + list(objective.parameters()) if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    return optimizer, scheduler


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # CPU: the process's peak resident set (ru_maxrss is in KiB on Linux)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------------------------
# one step


def forward_loss(
    student: Any, objective: DistillObjective, batch: dict[str, torch.Tensor], teacher: Any | None
) -> Any:
    """Loss for one batch. Neither model materialises full-vocabulary logits here: the objective
    projects hidden states chunk by chunk (full (B, T, V) logits dominate peak memory at real
    vocabulary sizes)."""
    labels = shift_labels(batch["labels"])
    hidden = student.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    kwargs: dict[str, Any] = {}
    if teacher is not None:
        with torch.no_grad():
            kwargs["teacher_hidden"] = teacher.model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).last_hidden_state
        kwargs["teacher_head_weight"] = teacher.lm_head.weight
    return objective(
        student_hidden=hidden,
        student_head_weight=student.lm_head.weight,
        labels=labels,
        attention_mask=batch["attention_mask"],
        **kwargs,
    )


@torch.no_grad()
def validation_loss(student: Any, examples: list[TokenizedExample], pad_token_id: int, device: torch.device) -> float:
    """Mean next-token cross-entropy over response tokens of ``examples``."""
    student.eval()
    total, count = 0.0, 0
    for start in range(0, len(examples), 64):
        batch = {k: v.to(device) for k, v in collate(examples[start : start + 64], pad_token_id).items()}
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = shift_labels(batch["labels"])
        mask = labels != IGNORE_INDEX
        total += torch.nn.functional.cross_entropy(logits[mask].float(), labels[mask], reduction="sum").item()
        count += int(mask.sum())
    student.train()
    return total / max(count, 1)


# ----------------------------------------------------------------------------------------------
# the run


def run_training(job: TrainJob, on_metrics: MetricsCallback | None = None, progress: bool = False) -> dict[str, Any]:
    """Train as ``job`` says and save a Hugging Face folder (safetensors + tokenizer) at ``job.output_uri``.

    Returns the output's manifest. A finished output made from the same inputs is reused.
    """
    cfg = job.train_config()
    inputs = {**job.inputs, "stage": job.stage, "train": cfg.model_dump(), "init_uri": job.init_uri,
              "arch": job.arch, "teacher_uri": job.teacher_uri}
    done = io.manifest_matches(job.output_uri, inputs)
    if done:
        return done

    # ---- setup
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    # The frozen teacher is loaded first, before anything that could partition parameters.
    teacher = None
    tokenizer = load_tokenizer(job.tokenizer_uri)
    if job.teacher_uri:
        teacher = load_model(job.teacher_uri, device=device).eval().requires_grad_(False)
        check_same_vocabulary(load_tokenizer(job.teacher_uri), tokenizer)
    if job.init_uri:
        student = load_model(job.init_uri, device=device)
    elif job.arch:
        student = build_model(job.arch, tokenizer, seed=cfg.seed).to(device)
    else:
        raise ValueError("a training job needs init_uri (a checkpoint) or arch (build from config)")
    student.train()
    loss_cfg = cfg.loss if isinstance(cfg, DistillConfig) else LossConfig(alpha=0.0)
    objective = DistillObjective(
        loss_cfg,
        student_hidden_size=student.config.hidden_size,
        student_num_layers=student.config.num_hidden_layers,
        teacher_hidden_size=teacher.config.hidden_size if teacher is not None else None,
        teacher_num_layers=teacher.config.num_hidden_layers if teacher is not None else None,
    ).to(device)
    examples = load_examples(job.data_uri, tokenizer, cfg.max_length)
    val_examples = load_examples(job.val_uri, tokenizer, cfg.max_length) if job.val_uri else []
    optimizer, scheduler = prepare_student(student, objective, cfg)
    data = batches(examples, cfg.batch_size, tokenizer.pad_token_id, cfg.seed)
    n_params = count_parameters(student)

    # ---- train
    history: list[dict[str, float]] = []
    window_tokens, window_start = 0, time.perf_counter()
    bar = _progress_bar(progress, f"{job.stage}", cfg.steps)
    for step in range(1, cfg.steps + 1):
        step_start = time.perf_counter()
        batch = {k: v.to(device) for k, v in next(data).items()}
        out = forward_loss(student, objective, batch, teacher)
        if not torch.isfinite(out.loss):
            raise TrainingError(
                f"{job.stage}: loss is {out.loss.item()} at step {step}; stopping. Lower the learning "
                f"rate (now {cfg.lr}) or check the data at {job.data_uri}"
            )
        out.loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        window_tokens += int(batch["attention_mask"].sum())
        if bar is not None:
            bar[0].update(bar[1], advance=1, description=f"{job.stage} loss={out.loss.item():.3f}")
        if step % cfg.log_every == 0 or step == cfg.steps:
            elapsed = time.perf_counter() - window_start
            metrics = {
                "loss": out.loss.item(),
                **{k: float(v) for k, v in out.metrics.items()},
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": float(grad_norm),
                "tokens_per_s": window_tokens / elapsed,
                "step_time_s": time.perf_counter() - step_start,
                "peak_memory_mb": peak_memory_mb(device),
            }
            if val_examples and (step % cfg.eval_every == 0 or step == cfg.steps):
                metrics["val_loss"] = validation_loss(student, val_examples, tokenizer.pad_token_id, device)
            history.append({"step": step, **metrics})
            if on_metrics is not None and is_main_process():
                on_metrics(metrics, step)
            window_tokens, window_start = 0, time.perf_counter()
    if bar is not None:
        bar[0].stop()

    # ---- save
    final = history[-1]
    manifest: dict[str, Any] = {}
    if is_main_process():
        manifest = save_checkpoint(
            student, tokenizer, job.output_uri, stage=job.stage, inputs=inputs,
            final_metrics=final, parameters=n_params, history=history,
        )
    return manifest


def save_checkpoint(student: Any, tokenizer: Any, output_uri: str, *, stage: str, inputs: dict[str, Any], **content: Any) -> dict[str, Any]:
    """Write the student as a Hugging Face folder (safetensors + tokenizer), then its manifest.

    The folder is assembled locally and moved (or uploaded) into place before the manifest is
    written, so a reader never takes a half-written checkpoint for a finished one.
    """
    with tempfile.TemporaryDirectory(prefix="mydistill-ckpt-") as tmp:
        student.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        files = sorted(os.listdir(tmp))
        if io.is_remote(output_uri):
            io.remove(output_uri)
            io.copy_dir(tmp, output_uri)
        else:
            target = output_uri.removeprefix("file://")
            staging = f"{target.rstrip('/')}.tmp-{os.getpid()}"
            shutil.copytree(tmp, staging)
            if os.path.exists(target):
                shutil.rmtree(target)
            os.replace(staging, target)
    return io.write_manifest(output_uri, stage=stage, inputs=inputs, files=files, **content)


def _progress_bar(enabled: bool, label: str, total: int):
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    progress.start()
    return progress, progress.add_task(label, total=total)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run one mydistill training job (either stage).")
    parser.add_argument("--job", required=True, help="Path or URI of a TrainJob JSON file.")
    parser.add_argument("--progress", action="store_true", help="Show a progress bar.")
    args = parser.parse_args(argv)
    job = TrainJob(**io.read_json(args.job))
    on_metrics = None
    if job.mlflow_run_id:
        from mydistill.tracking import metrics_logger

        on_metrics = metrics_logger(job.mlflow_run_id)
    manifest = run_training(job, on_metrics=on_metrics, progress=args.progress)
    print(json.dumps({"output_uri": job.output_uri, "final": manifest.get("final_metrics", {})}))


if __name__ == "__main__":
    main()


__all__ = ["TrainJob", "TrainingError", "run_training", "save_checkpoint"]
