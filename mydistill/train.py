"""The training entrypoint for both stages: ``python -m mydistill.train --job job.json``.

setup → train → save, top to bottom. Stage 1 (``distill``) learns from the frozen teacher's
signal through :class:`mydistill.losses.DistillObjective`; stage 2 (``finetune``), the baseline
and the demo teacher's own bootstrap use the same loop with cross-entropy only.

One process, or one process per device under a launcher (``torchrun`` / ``deepspeed``; see
:mod:`mydistill.training.launch`). With a DeepSpeed config the student is sharded by ZeRO-3; the
frozen teacher is loaded before the engine exists, so it is never partitioned by accident. Only
rank 0 logs and writes the final model. Periodic checkpoints hold the engine, optimizer,
scheduler, data position and RNG, and a run started again on the same output resumes from the
latest one. The parts live in :mod:`mydistill.training`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from mydistill import io
from mydistill.config import DistillConfig, LossConfig, TrainConfig, learned_fields
from mydistill.losses import DistillObjective
from mydistill.models import count_parameters, kept_teacher_layers, load_tokenizer
from mydistill.progress import MARKED_ENV, ProgressLog, print_marked, relay_marked, reporting_to
from mydistill.tokenization import PROMPT_PREFIX_KEY, TokenizedExample, collate, prompt_prefix_of
from mydistill.training.batches import batch_indices, load_examples, read_training_records, tokenize_records
from mydistill.training.checkpoints import CheckpointStore, lock_checkpoints, save_checkpoint, unlock_checkpoints
from mydistill.training.cross_tokenizer import ULDObjective
from mydistill.training.engines import (
    DeepSpeedEngine, PlainEngine, deepspeed_config, init_distributed, is_main_process, resolve_device, world, zero3_loading,
)
from mydistill.training.job import MetricsCallback, TrainingError, TrainJob
from mydistill.training.launch import LineCallback, launch_training
from mydistill.training.process import die_with_parent
from mydistill.training.metrics import global_sum, peak_memory_mb, peak_tflops, progress_bar, validation_loss
from mydistill.training.objective import StudentObjective, forward_loss
from mydistill.training.on_policy import OnPolicyMixer, eos_ids_of
from mydistill.training.step_by_step import StepByStepObjective, step_by_step_examples
from mydistill.training.student import freeze_parameters, load_student
from mydistill.training.teachers import Teachers, load_teachers
from mydistill.training.ted import fit_ted_filters

logger = logging.getLogger("mydistill.train")


@dataclass
class Run:
    """What setup made and the loop uses: one object instead of twenty locals."""

    device: torch.device
    tokenizer: Any
    teachers: Teachers
    student: Any
    objective: DistillObjective
    engine: Any
    examples: list[TokenizedExample]
    val_examples: list[TokenizedExample]
    checkpoints: CheckpointStore  # the periodic checkpoints, on the storage the output is on
    tasks: Any = None  # distilling step-by-step: the label and rationale examples
    prompt_prefix: str = ""
    on_policy: OnPolicyMixer | None = None
    order: Iterator[list[int]] | None = None
    start_step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    manifest_extra: dict[str, Any] = field(default_factory=dict)


def run_job(
    job: TrainJob,
    *,
    on_line: LineCallback | None = None,
    on_metrics: MetricsCallback | None = None,
    env: dict[str, str] | None = None,
    progress: bool = False,
    restarts: int = 1,
    labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Train ``job`` where its config says: in this process (``launcher: none``; ``on_metrics``
    receives the metrics), on launched workers (:func:`~mydistill.training.launch.launch_training`;
    rank 0 logs to MLflow itself, ``on_line`` receives their output), or on a cluster (``engine:
    kubeflow``: :func:`~mydistill.training.kubeflow.run_trainjob`; ``labels`` go on its TrainJob).
    Returns the manifest."""
    cfg = job.train_config()
    if cfg.engine == "kubeflow":
        from mydistill.training.kubeflow import run_trainjob

        # rank 0's marked progress lines come back through the pods' logs, as from local workers
        return run_trainjob(job, cfg.kubeflow, nodes=cfg.nodes, num_processes=cfg.num_processes, on_line=relay_marked(on_line),
                            env={**(env or {}), MARKED_ENV: "1"}, labels=labels)
    if cfg.launcher == "none":
        return run_training(job, on_metrics=on_metrics, progress=progress)
    return launch_training(job, on_line=on_line, env=env, restarts=restarts)


def run_training(job: TrainJob, on_metrics: MetricsCallback | None = None, progress: bool = False) -> dict[str, Any]:
    """Train as ``job`` says and save a Hugging Face folder (safetensors + tokenizer) at ``job.output_uri``.

    Returns the output's manifest. A finished output made from the same inputs is reused; an
    unfinished one with checkpoints resumes from the latest.
    """
    cfg = job.train_config()
    inputs = {**job.inputs, "stage": job.stage, "train": learned_fields(cfg),
              "init_uri": job.init_uri, "arch": job.arch, "teacher_uri": job.teacher_uri,
              **({"teacher_dtype": job.teacher_dtype} if job.teacher_uri and job.teacher_dtype != "auto" else {}),
              **({"signal_uris": job.signal_uris} if job.signal_uris else {}),
              **({"nodes": cfg.nodes} if cfg.nodes != 1 else {})}  # more nodes, a larger global batch
    done = io.manifest_matches(job.output_uri, inputs)
    if done:
        return done
    run = setup(job, cfg, inputs, on_metrics)
    # one writer per local checkpoint folder (released however the run ends; the kernel releases it if
    # killed); an object store has no such lock
    lock = lock_checkpoints(job.checkpoints()) if is_main_process() and not run.checkpoints.remote else None
    try:
        resume(run, job, cfg, inputs)
        train(run, job, cfg, inputs, on_metrics, progress)
        return save(run, job, cfg, inputs)
    finally:
        run.checkpoints.close()
        if lock is not None:
            unlock_checkpoints(job.checkpoints(), lock)


# ----------------------------------------------------------------------------------------------
# setup


def setup(job: TrainJob, cfg: TrainConfig, inputs: dict[str, Any], on_metrics: MetricsCallback | None) -> Run:
    """Process group, teachers, student, objective, data and engine."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    init_distributed(device, cfg.deepspeed is not None)
    torch.manual_seed(cfg.seed)
    distill = cfg if isinstance(cfg, DistillConfig) else None
    ds_config = deepspeed_config(job.deepspeed_config or cfg.deepspeed, cfg, device) if cfg.deepspeed else None
    tokenizer = load_tokenizer(job.tokenizer_uri)
    records = read_training_records(job.data_uri)  # read once: stores, ULD and the examples all use them
    # the frozen teachers first, before any ZeRO-3 config exists for the student
    teachers = load_teachers(job, distill, tokenizer, records, ds_config, device)
    with zero3_loading(ds_config) if ds_config and job.init_uri else contextlib.nullcontext():
        student = load_student(job, cfg, tokenizer, device)
    student.train()
    same_tokenizer = not distill or distill.cross_tokenizer.method == "none"
    teachers.fit_heads(student.config.vocab_size, same_tokenizer=same_tokenizer)
    objective = DistillObjective(
        cfg.loss if distill else LossConfig(alpha=0.0),
        student_hidden_size=student.config.hidden_size,
        student_num_layers=student.config.num_hidden_layers,
        teacher_hidden_size=teachers.model.config.hidden_size if teachers.model is not None and same_tokenizer else None,
        teacher_num_layers=teachers.model.config.num_hidden_layers if teachers.model is not None and same_tokenizer else None,
        teacher_layers=kept_teacher_layers(job.init_uri),  # a cut student's blocks, for layer_map: kept
    ).to(device)
    run = Run(device=device, tokenizer=tokenizer, teachers=teachers, student=student, objective=objective, engine=None,
              examples=[], val_examples=[], checkpoints=CheckpointStore(job.checkpoints()))
    prepare_examples(run, job, cfg, distill, records)
    # TED stage 1 before the engine exists, so that ZeRO-3 partitions the trained teacher filters
    run.manifest_extra.update(
        fit_ted_filters(job, distill, objective, teachers.model, run.examples, tokenizer, device, inputs, on_metrics)
    )
    run.manifest_extra["parameters"] = count_parameters(student)
    if cfg.freeze:  # before the engine: its optimizer takes only what is still trained
        run.manifest_extra["frozen_parameters"] = freeze_parameters(student, cfg.freeze, "distill" if job.stage == "baseline" else job.stage)
    module = StudentObjective(student, trained_objective(objective, distill))
    run.engine = DeepSpeedEngine(module, cfg, ds_config) if ds_config else PlainEngine(module, cfg)
    return run


def trained_objective(objective: DistillObjective, distill: DistillConfig | None) -> Any:
    """The objective as trained: ULD adds the cross-tokenizer term; step-by-step splits each batch
    into its two tasks."""
    trained: Any = objective
    if distill and distill.cross_tokenizer.method == "uld":
        trained = ULDObjective(trained, distill.cross_tokenizer)
    if distill and distill.loss.step_by_step is not None:
        trained = StepByStepObjective(trained)
    return trained


def prepare_examples(run: Run, job: TrainJob, cfg: TrainConfig, distill: DistillConfig | None, records: list[dict[str, Any]]) -> None:
    """Tokenize the training and validation data. Under step-by-step the student answers behind
    the label prefix, which its checkpoint records (a stage trained from it inherits the prefix)."""
    step_by_step = distill.loss.step_by_step if distill else None
    run.prompt_prefix = step_by_step.label_prefix if step_by_step else (prompt_prefix_of(job.init_uri) or "")
    if step_by_step is not None:
        run.tasks = step_by_step_examples(records, run.tokenizer, cfg.max_length, step_by_step, job.data_uri)
    run.examples = run.tasks.label if run.tasks else tokenize_records(records, run.tokenizer, cfg.max_length, run.prompt_prefix)
    if job.val_uri:
        run.val_examples = load_examples(job.val_uri, run.tokenizer, cfg.max_length, run.prompt_prefix)


def resume(run: Run, job: TrainJob, cfg: TrainConfig, inputs: dict[str, Any]) -> None:
    """Load the latest checkpoint of an unfinished run with the same inputs, then place the data
    order (and the on-policy draws) where that run stopped."""
    rank, world_size = world()
    distill = cfg if isinstance(cfg, DistillConfig) else None
    checkpoint_dir = job.checkpoints()
    client_state = run.checkpoints.load(run.engine) if cfg.resume else None
    if client_state and client_state.get("inputs_sha256") != io.sha256_of(inputs):
        raise TrainingError(f"{checkpoint_dir} holds checkpoints of a run with other inputs; delete it or set a new output")
    if client_state:
        run.start_step, run.history = client_state["step"], client_state["history"]
        torch.set_rng_state(client_state["rng"])
        if is_main_process():
            print(f"[mydistill] {job.stage}: resumed from step {run.start_step} ({checkpoint_dir})", flush=True)
    run.order = batch_indices(len(run.examples), cfg.batch_size, cfg.seed, start_step=run.start_step, rank=rank, world_size=world_size)
    if run.tasks is not None:  # the rationale examples in their own seeded order, resumed like the label order
        run.tasks.rationale_order = batch_indices(
            len(run.tasks.rationale), cfg.batch_size, cfg.seed + 1, start_step=run.start_step, rank=rank, world_size=world_size
        )
    if distill is not None and distill.on_policy.fraction > 0:
        if run.teachers.model is None:
            raise ValueError("distill.on_policy.fraction > 0 needs the online teacher to score the student's samples (teacher_uri)")
        run.on_policy = OnPolicyMixer(distill.on_policy, tokenizer=run.tokenizer, eos_token_ids=eos_ids_of(run.student, run.tokenizer))
        run.on_policy.skip(run.start_step)  # a resumed run makes the same on-policy choices as an uninterrupted one


# ----------------------------------------------------------------------------------------------
# train


def train(
    run: Run, job: TrainJob, cfg: TrainConfig, inputs: dict[str, Any], on_metrics: MetricsCallback | None, progress: bool,
) -> None:
    """The loop: a batch, the teacher's signal, loss, backward, step; metrics every ``log_every``,
    a checkpoint every ``save_every``; a non-finite loss stops the run and keeps the last checkpoint."""
    rank, world_size = world()
    use_deepspeed = cfg.deepspeed is not None
    checkpoint_dir = job.checkpoints()
    # MFU: model FLOPs (6 per parameter per token for the trained student, 2 for a teacher forward)
    # against the devices' peak; logged where the peak is known (GPUs)
    peak_flops = peak_tflops(cfg, run.device) * 1e12
    student_flops = 6 * run.manifest_extra["parameters"]
    teacher_flops = 2 * run.teachers.forward_parameters(from_stores=bool(job.signal_uris))
    pad = run.tokenizer.pad_token_id
    window_tokens, window_start = 0.0, time.perf_counter()
    bar = progress_bar(progress and is_main_process(), job.stage, cfg.steps, run.start_step)
    # periodic reports for logs without a terminal (the Prefect UI): rank 0 only
    report = ProgressLog(job.stage, cfg.steps, logger, unit="steps", start=run.start_step) if is_main_process() else None
    for step in range(run.start_step + 1, cfg.steps + 1):
        step_start = time.perf_counter()
        indices = next(run.order)
        rows = [run.examples[i] for i in indices]
        batch = run.tasks.collate(rows, pad) if run.tasks else collate(rows, pad)
        batch = {k: v.to(run.device) for k, v in batch.items()}
        if run.on_policy is not None and run.on_policy.draw():
            # GKD: the student answers these prompts itself; the online teacher scores its tokens
            batch = run.on_policy.replace(batch, run.student, step, synced_gpus=use_deepspeed and world_size > 1)
            with run.on_policy.active(run.objective):
                out = forward_loss(run.engine, batch, run.teachers.online)
        else:
            out = forward_loss(run.engine, batch, run.teachers.source, indices)
        if not torch.isfinite(out.loss):
            last = next(reversed(run.checkpoints.complete_tags()), None)  # not latest(): a collective
            raise TrainingError(
                f"{job.stage}: loss is {out.loss.item()} at step {step}; stopping. "
                + (f"The last good checkpoint ({last}) is kept in {checkpoint_dir}. " if last else "")
                + f"Lower the learning rate (now {cfg.lr}) or check the data at {job.data_uri}"
            )
        run.engine.backward(out.loss)
        grad_norm = run.engine.step()
        window_tokens += float(batch["attention_mask"].sum())
        if bar is not None:
            bar[0].update(bar[1], advance=1, description=f"{job.stage} loss={out.loss.item():.3f}")
        if report is not None:
            report(1, loss=out.loss.item)
        if step % cfg.log_every == 0 or step == cfg.steps:
            elapsed = time.perf_counter() - window_start
            window_all_ranks = global_sum(window_tokens, run.device)
            run.manifest_extra["tokens_seen"] = run.manifest_extra.get("tokens_seen", 0) + window_all_ranks  # for the cost report
            metrics = {
                "loss": out.loss.item(),
                **{k: float(v) for k, v in out.metrics.items()},
                "lr": run.engine.lr(),
                "grad_norm": grad_norm,
                "tokens_per_s": window_all_ranks / elapsed,
                "step_time_s": time.perf_counter() - step_start,
                "peak_memory_mb": peak_memory_mb(run.device),
                **({"on_policy_batches": float(run.on_policy.sampled_batches)} if run.on_policy is not None else {}),
            }
            if peak_flops:
                per_device = metrics["tokens_per_s"] / (peak_flops * world_size)
                metrics["mfu"] = (student_flops + teacher_flops) * per_device
                metrics["mfu_student"] = student_flops * per_device  # the share the trained model alone accounts for
            if run.val_examples and (step % cfg.eval_every == 0 or step == cfg.steps):
                # under ZeRO-3 every rank runs the same forward passes (each gathers the student's shards)
                metrics["val_loss"] = validation_loss(run.student, run.val_examples, pad, run.device)
            run.history.append({"step": step, **metrics})
            if on_metrics is not None and is_main_process():
                on_metrics(metrics, step)
            window_tokens, window_start = 0.0, time.perf_counter()
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
            state = {"step": step, "history": run.history, "rng": torch.get_rng_state(), "inputs_sha256": io.sha256_of(inputs)}
            with io.full_disk_named(run.checkpoints.uri):  # the step before stays the newest complete one: resume from it
                run.checkpoints.save(run.engine, f"step{step}", state)  # on every rank; the last two are kept
            if is_main_process():  # the log says what a re-run of a stopped run resumes from
                print(f"[mydistill] {job.stage}: checkpoint at step {step} saved", flush=True)
    if bar is not None:
        bar[0].stop()


# ----------------------------------------------------------------------------------------------
# save


def save(run: Run, job: TrainJob, cfg: TrainConfig, inputs: dict[str, Any]) -> dict[str, Any]:
    """Write the student (rank 0) with its manifest, then drop the periodic checkpoints."""
    _, world_size = world()
    state_dict = run.engine.student_state_dict()  # a collective under ZeRO-3: every rank takes part
    manifest: dict[str, Any] = {}
    if is_main_process():
        teacher = run.teachers.model
        manifest = save_checkpoint(
            run.student, run.tokenizer, job.output_uri, stage=job.stage, inputs=inputs, state_dict=state_dict,
            final_metrics=run.history[-1], history=run.history, world_size=world_size,
            deepspeed=cfg.deepspeed is not None,
            **({"teacher_dtype": str(next(teacher.parameters()).dtype).removeprefix("torch.")} if teacher is not None and hasattr(teacher, "parameters") else {}),
            **({"teacher_sharding": teacher.partition_stats()} if hasattr(teacher, "partition_stats") else {}),
            **({PROMPT_PREFIX_KEY: run.prompt_prefix} if run.prompt_prefix else {}),
            **run.manifest_extra,
        )
        run.checkpoints.remove()
    if world_size > 1:
        dist.barrier()
    return manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run one mydistill training job (either stage).")
    parser.add_argument("--job", required=True, help="Path or URI of a TrainJob JSON file.")
    parser.add_argument("--progress", action="store_true", help="Show a progress bar.")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    args = parser.parse_args(argv)
    die_with_parent()  # a killed launcher takes its workers with it (see mydistill.training.launch)
    job = TrainJob(**io.read_json(args.job))
    on_metrics = None
    if job.mlflow_run_id and is_main_process_env():
        from mydistill.tracking import metrics_logger

        on_metrics = metrics_logger(job.mlflow_run_id)
    # launched: progress goes out as marked lines, which the launcher turns back into reports
    marked = os.environ.get(MARKED_ENV) and is_main_process_env()
    with reporting_to(print_marked) if marked else contextlib.nullcontext():
        manifest = run_training(job, on_metrics=on_metrics, progress=args.progress)
    if is_main_process():
        print(f"[mydistill] done: {json.dumps({'output_uri': job.output_uri, 'final': manifest.get('final_metrics', {})})}", flush=True)
    with contextlib.suppress(Exception):
        if dist.is_initialized():
            dist.destroy_process_group()


def is_main_process_env() -> bool:
    """Rank 0 as the launcher announced it, before the process group exists."""
    return int(os.environ.get("RANK", "0")) == 0


if __name__ == "__main__":
    main()


__all__ = ["TrainJob", "TrainingError", "run_job", "run_training", "save_checkpoint", "batch_indices"]
