"""The training stages (distill, finetune, baseline): their jobs, the lineage checks before them, the run."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from mydistill import io, lineage, tracking
from mydistill.pipeline import costs
from mydistill.config import DISTILL_ONLY_FIELDS, PipelineConfig
from mydistill.fingerprint import fingerprint
from mydistill.mix import TASK_TRAIN_FILE, TRAIN_FILE, VAL_FILE
from mydistill.pipeline.plan import StagePlan, baseline_steps
from mydistill.stage_functions.common import on_gpu, one_writer, require_done, sweep_debris
from mydistill.stage_functions.registry import log_model
from mydistill.training.job import TrainJob, job_lengths
from mydistill.train import run_job


def train_job(cfg: PipelineConfig, plan: StagePlan, stage: str) -> TrainJob:
    """The training job for ``stage`` in this plan: ``distill``, ``finetune`` or ``baseline``."""
    init_uri = plan.student_init_uri or cfg.student.init_uri
    init = {"init_uri": init_uri, "arch": None if init_uri else cfg.student.arch.as_dict()}
    tokenizer_uri = init_uri or plan.teacher_uri
    cut = {"student_init": (io.read_manifest(plan.student_init_uri) or {}).get("inputs")} if plan.student_init_uri else {}
    if stage == "distill":
        return TrainJob(
            stage="distill", data_uri=io.join(plan.mix_uri, TRAIN_FILE), val_uri=io.join(plan.mix_uri, VAL_FILE),
            output_uri=plan.distill_uri, tokenizer_uri=tokenizer_uri, teacher_uri=plan.teacher_uri, teacher_dtype=cfg.teacher.dtype,
            signal_uris=_signal_uris(cfg, plan), train=cfg.distill.model_dump(),
            inputs={**_data_inputs(plan, TRAIN_FILE), **_signal_inputs(cfg, plan), "lineage": student_lineage(cfg, plan), **cut}, **init,
        )
    if stage == "finetune":
        assert plan.finetune_uri
        return TrainJob(
            stage="finetune", data_uri=io.join(plan.mix_uri, TASK_TRAIN_FILE), val_uri=io.join(plan.mix_uri, VAL_FILE),
            output_uri=plan.finetune_uri, tokenizer_uri=plan.distill_uri, init_uri=plan.distill_uri,
            train=cfg.finetune.model_dump(exclude={"enabled"}),
            inputs={
                **_data_inputs(plan, TASK_TRAIN_FILE), "init": (io.read_manifest(plan.distill_uri) or {}).get("inputs_sha256"),
                "lineage": student_lineage(cfg, plan),
            },
        )
    if stage == "baseline":
        assert plan.baseline_uri
        train = cfg.distill.model_dump(exclude=DISTILL_ONLY_FIELDS)
        train["steps"] = baseline_steps(cfg)
        return TrainJob(
            stage="baseline", data_uri=io.join(plan.mix_uri, TASK_TRAIN_FILE), val_uri=io.join(plan.mix_uri, VAL_FILE),
            output_uri=plan.baseline_uri, tokenizer_uri=tokenizer_uri, train=train,
            # the real data's split alone: the baseline does not depend on the teacher's responses
            inputs={**_real_split_inputs(plan), "lineage": student_lineage(cfg, plan, with_teacher=False), **cut}, **init,
        )
    raise ValueError(f"unknown training stage {stage!r}; expected distill, finetune or baseline")


def prepare_student_init(cfg: PipelineConfig, plan: StagePlan) -> dict[str, Any] | None:
    """With ``student.init.from_teacher``: cut the student from the teacher once (its blocks
    ``student.init.layers`` / ``keep_every``, or with ``layers: auto`` the most influential blocks
    measured over the first ``importance_prompts`` of the run's prompt pool, or of the mix's teacher
    examples with ``importance_on: responses``) into
    ``plan.student_init_uri``; returns its manifest."""
    if not plan.student_init_uri:
        return None
    from mydistill.models import ensure_cut_student, ensure_measured_cut

    init = cfg.student.init
    if init.layers == "auto":
        if init.importance_on == "responses":
            # the teacher's own answers, as the student will be trained on them (the mix's teacher examples)
            source = io.join(plan.mix_uri, TRAIN_FILE)
            exchanges = []
            for record in io.iter_records(source):
                if record.get("source") != "teacher":
                    continue
                where = f"{source}: record {record.get('id', len(exchanges) + 1)}"
                exchanges.append((io.text_field(record, "prompt", where), io.text_field(record, "response", where)))
                if len(exchanges) == init.importance_prompts:
                    break
            if not exchanges:
                raise io.DataError(f"{source}: no teacher examples to measure the blocks on (student.init.importance_on: "
                                   "responses); measure on prompts, or raise mix.teacher_fraction")
            return ensure_measured_cut(
                plan.teacher_uri, None, plan.student_init_uri, exchanges=exchanges, num_layers=init.num_layers,
                parameter_fraction=init.parameter_fraction, prompts_sha256=io.sha256_of(exchanges), importance=init.importance,
            )
        prompts = []
        for record in io.iter_records(plan.prompts_uri):
            prompts.append(io.text_field(record, cfg.data.prompt_field, f"{plan.prompts_uri}: record {len(prompts) + 1}"))
            if len(prompts) == init.importance_prompts:
                break
        return ensure_measured_cut(
            plan.teacher_uri, prompts, plan.student_init_uri, num_layers=init.num_layers,
            parameter_fraction=init.parameter_fraction, prompts_sha256=io.sha256_of(prompts), importance=init.importance,
        )
    return ensure_cut_student(plan.teacher_uri, init.layers, init.keep_every, plan.student_init_uri)


def log_measured_cut(run_id: str, manifest: dict[str, Any] | None) -> None:
    """A cut chosen by measurement, on the training run that starts from it: each block's score
    (``block_influence`` or ``skip_kl``) as metrics (step = block) and a plot, the kept blocks as a parameter."""
    criterion = next((name for name in ("block_influence", "skip_kl") if name in (manifest or {})), None)
    if manifest is None or criterion is None:
        return
    from mydistill.block_importance import influence_figure

    scores, kept = manifest[criterion], manifest["teacher_layers"]
    tracking.log_history(run_id, [{"step": block, criterion: float(score)} for block, score in enumerate(scores)])
    tracking.log_params(run_id, {"student_init.chosen_layers": kept})
    tracking.log_figure(run_id, influence_figure(scores, kept, criterion), f"plots/{criterion}.png")


def with_lengths(job: TrainJob) -> tuple[TrainJob, dict[str, Any]]:
    """The job with ``max_length`` made concrete from its data, and the length report; refuses a
    job whose data has prompts that leave no room for a response, before any training."""
    lengths = job_lengths(job)
    if lengths["dropped_prompts"]:
        raise io.DataError(
            f"{job.data_uri}: {lengths['dropped_prompts']} of {lengths['examples']} prompts are {lengths['max_length']} "
            f"tokens or longer, leaving no room for a response; raise {job.stage}.max_length (or max_length_cap), or "
            "shorten those prompts"
        )
    job.train = {**job.train, "max_length": lengths["max_length"]}
    return job, lengths


@one_writer(lambda cfg, plan, stage, *_, **__: getattr(plan, f"{stage}_uri", None), lambda cfg, plan, stage, *_, **__: stage)
def train(
    cfg: PipelineConfig, plan: StagePlan, stage: str, parent_run_id: str | None = None, *,
    progress: bool = False, on_line: Callable[[str], None] | None = None, labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run one training stage (``distill``, ``finetune`` or ``baseline``); returns the checkpoint manifest.

    With ``launcher`` set in the stage's config the job runs on launched worker processes whose
    output lines go to ``on_line``; rank 0 logs metrics into this stage's MLflow run. With
    ``engine: kubeflow`` it runs as a TrainJob on a cluster, ``labels`` on it (who made it).
    """
    require_done(plan.mix_uri, "mix")
    if stage == "distill":
        require_done(plan.signal_uri, "signal")
    if stage == "finetune":
        require_done(plan.distill_uri, "distill")
    check_lineage(cfg, plan, stage)  # before anything is written or logged
    init_manifest = prepare_student_init(cfg, plan) if stage in ("distill", "baseline") else None
    job, lengths = with_lengths(train_job(cfg, plan, stage))
    sweep_debris(job.output_uri)
    (on_line or (lambda line: None))(
        f"{stage}: max_length {lengths['max_length']} ({'from the data' if lengths['chosen_from_data'] else 'configured'}; "
        f"median example {lengths['tokens_p50']} tokens, longest {lengths['tokens_max']}); "
        f"{lengths['truncated_responses']} of {lengths['examples']} responses truncated, {lengths['dropped_prompts']} prompts dropped"
    )
    started = time.perf_counter()
    with tracking.stage_run(parent_run_id, stage, cfg.tracking.experiment) as run_id:
        if run_id:
            tracking.log_metrics(run_id, {f"length_{k}": float(v) for k, v in lengths.items() if not isinstance(v, bool)})
            log_measured_cut(run_id, init_manifest)
        if run_id:
            tracking.log_params(run_id, {
                stage: job.train, "init_uri": job.init_uri, "teacher_uri": job.teacher_uri, "output_uri": job.output_uri,
                **({"signal_uris": job.signal_uris} if job.signal_uris else {}),  # the teacher signal came from these stores
            })
            tracking.log_dataset(run_id, io.read_records(job.data_uri), name=os.path.basename(job.data_uri).removesuffix(".jsonl"), source=job.data_uri, context="training")
        before = io.read_manifest(job.output_uri)
        job.mlflow_run_id = run_id
        manifest = run_job(
            job, on_line=on_line, on_metrics=tracking.metrics_logger(run_id) if run_id else None, progress=progress,
            env={"MLFLOW_TRACKING_URI": tracking.current_uri()}, labels=labels,
        )
        if run_id:
            train_cfg = job.train_config()
            tracking.log_metrics(run_id, costs.stage_cost(
                wall_s=time.perf_counter() - started, gpu=on_gpu(train_cfg.device),
                processes=train_cfg.num_processes * train_cfg.nodes if train_cfg.launcher != "none" else 1,  # every node's
                train_tokens=0 if manifest == before else manifest.get("tokens_seen", 0),
            ))
            if manifest == before:
                # an earlier run made this checkpoint from the same inputs: show its curves here too
                tracking.set_tags(run_id, {"mydistill.reused": "true"})
                tracking.log_history(run_id, manifest.get("history", []))
            tracking.log_metrics(run_id, {f"final_{k}": v for k, v in manifest.get("final_metrics", {}).items()})
            tracking.log_metrics(run_id, {"parameters": manifest.get("parameters", 0)})
            log_model(cfg, plan, run_id, job.output_uri)
    return manifest


def student_lineage(cfg: PipelineConfig, plan: StagePlan, *, with_teacher: bool = True) -> dict[str, Any]:
    """What a student checkpoint is made from: its tokenizer (the pretrained student's, else the
    teacher's) and, for the distilled stages, the teacher's fingerprint."""
    uri = cfg.student.init_uri or plan.teacher_uri
    fp = plan.fingerprints.get("student_init" if cfg.student.init_uri else "teacher")
    out = lineage.model_lineage(uri, fp)
    if with_teacher:
        out["teacher"] = (plan.fingerprints.get("teacher") or {}).get("sha256")
    return out


def check_lineage(cfg: PipelineConfig, plan: StagePlan, stage: str) -> list[str]:
    """Refuse to join artifacts whose lineage disagrees (see :mod:`mydistill.lineage`); returns the
    disagreements ``allow_lineage_mismatch`` let through, for the log."""
    allow, notes = cfg.allow_lineage_mismatch, []
    if stage == "distill":
        # the teacher as it is now: a teacher replaced in place after generation must not pass
        planned = plan.fingerprints.get("teacher") or {"kind": "model"}
        now = fingerprint(plan.teacher_uri, kind="model") if planned["kind"] == "model" else planned
        ours = {**student_lineage(cfg, plan), "teacher": now["sha256"]}
        generated = lineage.recorded(io.read_manifest(plan.generate_uri))
        notes += lineage.check(
            ours, generated, keys=["teacher"], allow=allow,
            ours_name=f"the teacher distilled online ({plan.teacher_uri}, fingerprint {now['sha256']})",
            theirs_name=f"the responses in {plan.generate_uri} (generated by teacher {generated.get('teacher_uri')}, fingerprint {generated.get('teacher')})",
            hint="Re-run the pipeline so that generation and distillation see the same teacher.",
        )
        for i, uri in enumerate(_signal_uris(cfg, plan)):
            store = io.read_manifest(uri) or {}
            theirs = {**lineage.recorded(store), "tokenizer": store.get("tokenizer_sha256")}
            keys = ["tokenizer", "teacher"] if i == 0 else ["tokenizer"]  # extra stores are other teachers on purpose
            notes += lineage.check(
                ours, theirs, keys=keys, allow=allow,
                ours_name=f"this run's student (tokenizer {str(ours.get('tokenizer'))[:12]}, teacher {ours['teacher']})",
                theirs_name=f"the teacher-signal store {uri} (tokenizer {str(theirs.get('tokenizer'))[:12]}, teacher {theirs.get('teacher')})",
                hint="A store holds token ids of its teacher's tokenizer; recompute it for this teacher and student.",
            )
    if stage == "finetune" and plan.finetune_uri:
        ours = student_lineage(cfg, plan, with_teacher=False)
        init = lineage.recorded(io.read_manifest(plan.distill_uri))
        notes += lineage.check(
            ours, init, keys=lineage.TOKENIZER_KEYS, allow=allow,
            ours_name=f"the student's tokenizer ({cfg.student.init_uri or plan.teacher_uri}, {str(ours.get('tokenizer'))[:12]})",
            theirs_name=f"the stage-1 checkpoint {plan.distill_uri} (trained with tokenizer {str(init.get('tokenizer'))[:12]})",
            hint="Stage 2 would read token ids the stage-1 model was not trained on; re-run stage 1.",
        )
    return notes


def _data_inputs(plan: StagePlan, name: str) -> dict[str, Any]:
    manifest = io.read_manifest(plan.mix_uri) or {}
    return {"data": (manifest.get("files", {}).get(name) or {}).get("sha256"), "mix": manifest.get("inputs_sha256")}


def _signal_uris(cfg: PipelineConfig, plan: StagePlan) -> list[str]:
    """The stores the distill stage reads: this run's, then ``signal.extra_uris`` (other teachers)."""
    return [plan.signal_uri, *cfg.signal.extra_uris] if plan.signal_uri else []


def _signal_inputs(cfg: PipelineConfig, plan: StagePlan) -> dict[str, Any]:
    uris = _signal_uris(cfg, plan)
    return {"signal": [(io.read_manifest(u) or {}).get("inputs_sha256") for u in uris]} if uris else {}


def _real_split_inputs(plan: StagePlan) -> dict[str, Any]:
    files = (io.read_manifest(plan.mix_uri) or {}).get("files", {})
    return {"data": (files.get(TASK_TRAIN_FILE) or {}).get("sha256"), "val": (files.get(VAL_FILE) or {}).get("sha256")}
