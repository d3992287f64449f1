"""The stages that make data: the demo's inputs, the teacher's responses, the mix, the teacher signal."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from mydistill import io, tracking
from mydistill.pipeline import costs
from mydistill.config import PipelineConfig
from mydistill.mix import TASK_TRAIN_FILE, TRAIN_FILE, VAL_FILE, run_mix
from mydistill.pipeline.plan import StagePlan, signal_mode, signal_temperature
from mydistill.stage_functions.common import numeric, on_gpu, one_writer, require_done, sweep_debris, teacher_lineage
from mydistill.stage_functions.training import train_job, with_lengths


@one_writer(lambda cfg, plan, **_: plan.demo_data_uri, "prepare-demo")
def prepare_demo(
    cfg: PipelineConfig, plan: StagePlan, *, progress: bool = False,
    on_metrics: Callable[[dict[str, float], int], None] | None = None,
) -> dict[str, str]:
    """Write the demo datasets and make sure the demo teacher exists (trained once, then cached;
    ``on_metrics`` follows that training)."""
    from mydistill.demo.bootstrap import ensure_teacher, write_demo_data

    if cfg.demo is None:
        raise ValueError("prepare_demo needs a config with a `demo` section")
    uris = write_demo_data(cfg.demo, plan.demo_data_uri) if plan.demo_data_uri else {}
    if not cfg.teacher.uri:
        uris["teacher"] = ensure_teacher(cfg.demo, progress=progress, on_metrics=on_metrics)
    return uris


@one_writer(lambda cfg, plan, *_, **__: plan.generate_uri, "generate")
def generate(cfg: PipelineConfig, plan: StagePlan, parent_run_id: str | None = None, *, progress: bool = False) -> dict[str, Any]:
    from mydistill.generation import generate_responses

    sweep_debris(plan.generate_uri)
    started = time.perf_counter()
    with tracking.stage_run(parent_run_id, "generate", cfg.tracking.experiment) as run_id:
        manifest = generate_responses(
            plan.prompts_uri, plan.generate_uri, teacher=plan.teacher_uri, teacher_id=plan.teacher_id,
            cfg=cfg.generate, progress=progress, cache_uri=plan.response_cache_uri,
            teacher_fingerprint=plan.fingerprints["teacher"]["sha256"], lineage=teacher_lineage(plan),
        )
        if run_id:
            tracking.log_metrics(run_id, costs.stage_cost(
                wall_s=time.perf_counter() - started, gpu=cfg.generate.backend != "openai" and on_gpu(cfg.generate.device),
                teacher_api=cfg.generate.backend == "openai", **_teacher_tokens(manifest),
            ))
            tracking.log_params(run_id, {"generate": cfg.generate.public_dict(), "teacher": plan.teacher_uri})
            tracking.log_dataset(run_id, io.read_records(plan.prompts_uri), name="prompts", source=plan.prompts_uri, context="input")
            responses = io.read_records(plan.generate_uri)
            tracking.log_dataset(run_id, responses, name="teacher_responses", source=plan.generate_uri, context="output")
            tracking.log_table(run_id, responses[:50], "samples/teacher_responses.json")
            tracking.log_metrics(run_id, numeric(manifest.get("counts", {}), prefix="count_"))
    return manifest


def _teacher_tokens(manifest: dict[str, Any]) -> dict[str, float]:
    """Teacher tokens this run paid for: those of the responses generated now, not of reused ones."""
    counts = manifest.get("counts", {})
    made, reused = counts.get("generated"), counts.get("reused")
    share = made / (made + reused) if made is not None and reused is not None and made + reused else 1.0
    return {
        "teacher_prompt_tokens": counts.get("prompt_tokens", 0) * share,
        "teacher_completion_tokens": counts.get("completion_tokens", 0) * share,
    }


@one_writer(lambda cfg, plan, *_, **__: plan.mix_uri, "mix")
def mix(cfg: PipelineConfig, plan: StagePlan, parent_run_id: str | None = None) -> dict[str, Any]:
    require_done(plan.generate_uri, "generate")
    sweep_debris(plan.mix_uri)
    started = time.perf_counter()
    with tracking.stage_run(parent_run_id, "mix", cfg.tracking.experiment) as run_id:
        manifest = run_mix(
            plan.generate_uri, plan.real_uri, plan.mix_uri, cfg.mix, prompt_field=cfg.data.prompt_field, answer_field=cfg.data.answer_field,
        )
        if run_id:
            tracking.log_metrics(run_id, costs.stage_cost(wall_s=time.perf_counter() - started))
            tracking.log_params(run_id, {"mix": cfg.mix.model_dump()})
            tracking.log_metrics(run_id, numeric(manifest["stats"]))
            for name, context in ((TRAIN_FILE, "training"), (VAL_FILE, "validation"), (TASK_TRAIN_FILE, "training")):
                uri = io.join(plan.mix_uri, name)
                tracking.log_dataset(run_id, io.read_records(uri), name=name.removesuffix(".jsonl"), source=uri, context=context)
    return manifest


@one_writer(lambda cfg, plan, *_, **__: plan.signal_uri, "signal")
def teacher_signal(cfg: PipelineConfig, plan: StagePlan, parent_run_id: str | None = None) -> dict[str, Any]:
    """The optional signal stage: the teacher's top-k (or sampled) signal over the mix's training
    records, stored once for the distill stage (see docs/teacher_signal.md); returns the manifest."""
    from mydistill.signal import compute_teacher_signal

    require_done(plan.mix_uri, "mix")
    if not plan.signal_uri:
        raise ValueError("the signal stage runs only with signal.enabled: true")
    data_uri = io.join(plan.mix_uri, TRAIN_FILE)
    # what the store is made with, concretely: the loss temperature and the mode 'auto' stands for
    signal_cfg = cfg.signal.model_copy(update={"temperature": signal_temperature(cfg), "mode": signal_mode(cfg)})
    sweep_debris(plan.signal_uri)
    # the store covers the examples as the distill stage will cut them
    max_length = cfg.distill.max_length or with_lengths(train_job(cfg, plan, "distill"))[1]["max_length"]
    started = time.perf_counter()
    with tracking.stage_run(parent_run_id, "signal", cfg.tracking.experiment) as run_id:
        if cfg.signal.backend == "openai":  # a served teacher scores the mix; the student's tokenizer checks it
            from mydistill.signal.served import compute_served_signal

            manifest = compute_served_signal(
                data_uri, cfg.student.init_uri or plan.teacher_uri, plan.signal_uri, cfg=signal_cfg,
                max_length=max_length, temperature=signal_cfg.temperature,
            )
        else:
            manifest = compute_teacher_signal(
                data_uri, plan.teacher_uri, plan.signal_uri, max_length=max_length, teacher_id=plan.teacher_id,
                cfg=signal_cfg, divergence=cfg.distill.loss.divergence,
                lineage={**teacher_lineage(plan), "temperature": signal_cfg.temperature, "k": signal_cfg.k},
            )
        if run_id:
            tracking.log_metrics(run_id, costs.stage_cost(
                wall_s=time.perf_counter() - started, gpu=cfg.signal.backend == "local" and on_gpu(cfg.signal.device),
            ))  # a served teacher's GPUs are the server's, not this stage's
            tracking.log_params(run_id, {"signal": signal_cfg.model_dump(), "teacher": plan.teacher_uri, "output_uri": plan.signal_uri})
            tracking.log_metrics(run_id, {**numeric(manifest["counts"]), "bytes_per_token": manifest["bytes_per_token"]})
    return manifest
