"""One function per pipeline stage: read the plan's inputs, do the work, write the plan's output.

These are what the Prefect tasks call (one each) and what a user calls from Python. Each takes
the validated config, the :class:`~mydistill.plan.StagePlan` and, optionally, the MLflow
parent run to log a child run under. Each is idempotent: outputs carry manifests, and a stage
whose output already matches its inputs returns at once.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

from mydistill import costs, io, lineage, tracking
from mydistill.config import DISTILL_ONLY_FIELDS, PipelineConfig
from mydistill.fingerprint import fingerprint
from mydistill.mix import TASK_TRAIN_FILE, TRAIN_FILE, VAL_FILE, run_mix
from mydistill.plan import StagePlan, baseline_steps, signal_mode, signal_temperature
from mydistill.training.launch import launch_training
from mydistill.training.job import TrainJob, job_lengths
from mydistill.tokenization import PROMPT_PREFIX_KEY, prompt_prefix_of


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
                wall_s=time.perf_counter() - started, gpu=cfg.generate.backend != "openai" and _on_gpu(cfg.generate.device),
                teacher_api=cfg.generate.backend == "openai", **_teacher_tokens(manifest),
            ))
            tracking.log_params(run_id, {"generate": cfg.generate.public_dict(), "teacher": plan.teacher_uri})
            tracking.log_dataset(run_id, io.read_records(plan.prompts_uri), name="prompts", source=plan.prompts_uri, context="input")
            responses = io.read_records(plan.generate_uri)
            tracking.log_dataset(run_id, responses, name="teacher_responses", source=plan.generate_uri, context="output")
            tracking.log_table(run_id, responses[:50], "samples/teacher_responses.json")
            tracking.log_metrics(run_id, _numbers(manifest.get("counts", {}), prefix="count_"))
    return manifest


def mix(cfg: PipelineConfig, plan: StagePlan, parent_run_id: str | None = None) -> dict[str, Any]:
    require_done(plan.generate_uri, "generate")
    sweep_debris(plan.mix_uri)
    started = time.perf_counter()
    with tracking.stage_run(parent_run_id, "mix", cfg.tracking.experiment) as run_id:
        manifest = run_mix(
            plan.generate_uri, plan.real_uri, plan.mix_uri,
            prompt_field=cfg.data.prompt_field, answer_field=cfg.data.answer_field, **cfg.mix.model_dump(),
        )
        if run_id:
            tracking.log_metrics(run_id, costs.stage_cost(wall_s=time.perf_counter() - started))
            tracking.log_params(run_id, {"mix": cfg.mix.model_dump()})
            tracking.log_metrics(run_id, _numbers(manifest["stats"]))
            for name, context in ((TRAIN_FILE, "training"), (VAL_FILE, "validation"), (TASK_TRAIN_FILE, "training")):
                uri = io.join(plan.mix_uri, name)
                tracking.log_dataset(run_id, io.read_records(uri), name=name.removesuffix(".jsonl"), source=uri, context=context)
    return manifest


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
    max_length = cfg.distill.max_length or _with_lengths(train_job(cfg, plan, "distill"))[1]["max_length"]
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
                wall_s=time.perf_counter() - started, gpu=cfg.signal.backend == "local" and _on_gpu(cfg.signal.device),
            ))  # a served teacher's GPUs are the server's, not this stage's
            tracking.log_params(run_id, {"signal": signal_cfg.model_dump(), "teacher": plan.teacher_uri, "output_uri": plan.signal_uri})
            tracking.log_metrics(run_id, {**_numbers(manifest["counts"]), "bytes_per_token": manifest["bytes_per_token"]})
    return manifest


def train_job(cfg: PipelineConfig, plan: StagePlan, stage: str) -> TrainJob:
    """The training job for ``stage`` in this plan: ``distill``, ``finetune`` or ``baseline``."""
    init_uri = plan.student_init_uri or cfg.student.init_uri
    init = {"init_uri": init_uri, "arch": None if init_uri else cfg.student.arch.model_dump()}
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
    ``student.init.layers`` / ``keep_every``) into ``plan.student_init_uri``; returns its manifest."""
    if not plan.student_init_uri:
        return None
    from mydistill.models import ensure_cut_student

    init = cfg.student.init
    return ensure_cut_student(plan.teacher_uri, init.layers, init.keep_every, plan.student_init_uri)


def _with_lengths(job: TrainJob) -> tuple[TrainJob, dict[str, Any]]:
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


def train(
    cfg: PipelineConfig, plan: StagePlan, stage: str, parent_run_id: str | None = None, *,
    progress: bool = False, on_line: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run one training stage (``distill``, ``finetune`` or ``baseline``); returns the checkpoint manifest.

    With ``launcher`` set in the stage's config the job runs on launched worker processes whose
    output lines go to ``on_line``; rank 0 logs metrics into this stage's MLflow run.
    """
    require_done(plan.mix_uri, "mix")
    if stage == "distill":
        require_done(plan.signal_uri, "signal")
    if stage == "finetune":
        require_done(plan.distill_uri, "distill")
    check_lineage(cfg, plan, stage)  # before anything is written or logged
    if stage in ("distill", "baseline"):
        prepare_student_init(cfg, plan)
    job, lengths = _with_lengths(train_job(cfg, plan, stage))
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
        if run_id:
            tracking.log_params(run_id, {
                stage: job.train, "init_uri": job.init_uri, "teacher_uri": job.teacher_uri, "output_uri": job.output_uri,
                **({"signal_uris": job.signal_uris} if job.signal_uris else {}),  # the teacher signal came from these stores
            })
            tracking.log_dataset(run_id, io.read_records(job.data_uri), name=os.path.basename(job.data_uri).removesuffix(".jsonl"), source=job.data_uri, context="training")
        before = io.read_manifest(job.output_uri)
        job.mlflow_run_id = run_id
        manifest = launch_training(
            job, on_line=on_line, on_metrics=tracking.metrics_logger(run_id) if run_id else None, progress=progress,
            env={"MLFLOW_TRACKING_URI": tracking.current_uri()},
        )
        if run_id:
            train_cfg = job.train_config()
            tracking.log_metrics(run_id, costs.stage_cost(
                wall_s=time.perf_counter() - started, gpu=_on_gpu(train_cfg.device),
                processes=train_cfg.num_processes if train_cfg.launcher != "none" else 1,
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


def evaluate(cfg: PipelineConfig, plan: StagePlan, parent_run_id: str | None = None) -> dict[str, Any]:
    """Score student, teacher and baseline; log the report, samples and plots to MLflow.

    The plots (student vs teacher vs baseline, and the loss curves of both training stages from
    their checkpoint manifests) go to the evaluate run and to the pipeline run, as images.
    """
    from mydistill.evaluate import PLOT_FILE, SAMPLES_FILE, evaluate_models, loss_curves_figure

    models = {"teacher": plan.teacher_uri, "student": plan.student_uri}
    if plan.baseline_uri:
        models["baseline"] = plan.baseline_uri
    require_done(plan.student_uri, "finetune" if plan.finetune_uri else "distill")
    require_done(plan.baseline_uri, "baseline")
    sweep_debris(plan.evaluate_uri)
    started = time.perf_counter()
    with tracking.stage_run(parent_run_id, "evaluate", cfg.tracking.experiment) as run_id:
        ev = cfg.evaluate
        judge = judge_id = None
        if "judge" in ev.metrics:
            from mydistill.judge import judge_cache_uri, make_judge

            assert ev.judge is not None  # the config requires it with the judge metric
            judge = make_judge(ev.judge, cache_uri=ev.judge.cache_uri or judge_cache_uri(cfg.work_dir))
            judge_id = f"{ev.judge.base_url}|{ev.judge.model}|{ev.judge.mode}"
        report = evaluate_models(
            models, plan.eval_uri, plan.evaluate_uri, answer_field=cfg.data.answer_field,
            prompt_field=cfg.data.prompt_field, category_field=cfg.data.category_field, metrics=ev.metrics,
            extract_pattern=ev.extract, gate_metric=cfg.registry.gate_metric, judge=judge, judge_id=judge_id,
            max_new_tokens=ev.max_new_tokens, batch_size=ev.batch_size, num_samples=ev.num_samples,
            dtypes={name: cfg.teacher.dtype if name == "teacher" else cfg.student.dtype for name in models},
        )
        if run_id:
            tracking.log_metrics(run_id, costs.stage_cost(
                wall_s=time.perf_counter() - started, gpu=_on_gpu("auto"), eval_examples=report["num_examples"] * len(models),
            ))
            tracking.log_params(run_id, {"evaluate": cfg.evaluate.model_dump(exclude={"judge"}), "models": models})
            tracking.log_dataset(run_id, io.read_records(plan.eval_uri), name="eval", source=plan.eval_uri, context="evaluation")
            tracking.log_metrics(run_id, summary_metrics(report))
            tracking.log_table(run_id, io.read_records(io.join(plan.evaluate_uri, SAMPLES_FILE)), "evaluation/samples.json")
            evaluation = io.localize(plan.evaluate_uri)
            tracking.log_artifacts(run_id, evaluation, "evaluation")
            histories = {
                stage: (io.read_manifest(uri) or {}).get("history", [])
                for stage, uri in (("distill", plan.distill_uri), ("finetune", plan.finetune_uri), ("baseline", plan.baseline_uri))
                if uri
            }
            curves = loss_curves_figure(histories)
            for target in (run_id, parent_run_id):
                tracking.log_figure(target, curves, "plots/loss_curves.png")
                tracking.log_artifact(target, os.path.join(evaluation, PLOT_FILE), "plots")
    return report


def summary_metrics(report: dict[str, Any]) -> dict[str, float]:
    """Flat ``<model>_<metric>`` numbers from an evaluation report (and ``<model>_<category>_<metric>``
    per category); undefined values (None) are left out."""
    out = {
        f"{model}_{k}": float(v) for model, m in report["models"].items() for k, v in m.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    for category, row in report.get("by_category", {}).items():
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(category))
        for model, m in row.items():
            if isinstance(m, dict):
                out.update({f"{model}_{safe}_{k}": float(v) for k, v in m.items() if isinstance(v, (int, float))})
    return out


def _on_gpu(device: str) -> bool:
    """Whether a stage configured for ``device`` runs on GPUs here ('auto': when CUDA is available)."""
    if device.startswith("cuda"):
        return True
    if device != "auto":
        return False
    import torch

    return torch.cuda.is_available()


def _teacher_tokens(manifest: dict[str, Any]) -> dict[str, float]:
    """Teacher tokens this run paid for: those of the responses generated now, not of reused ones."""
    counts = manifest.get("counts", {})
    made, reused = counts.get("generated"), counts.get("reused")
    share = made / (made + reused) if made is not None and reused is not None and made + reused else 1.0
    return {
        "teacher_prompt_tokens": counts.get("prompt_tokens", 0) * share,
        "teacher_completion_tokens": counts.get("completion_tokens", 0) * share,
    }


def run_costs(cfg: PipelineConfig, parent_run_id: str, teacher_retained: float | None = None) -> dict[str, float]:
    """The pipeline run's cost: its stages' ``cost/*`` summed, priced with ``costs:``; logged on the run."""
    total = costs.priced(costs.total_cost(tracking.child_metrics(parent_run_id)), cfg.costs, teacher_retained)
    tracking.log_metrics(parent_run_id, total)
    return total


def sweep_debris(uri: str) -> None:
    """Clear what a killed earlier run of this stage left (temporary files, staging folders, stale
    checkpoints; see :func:`mydistill.io.sweep_debris`) and say so."""
    removed = io.sweep_debris(uri)
    if removed:
        logging.getLogger("mydistill").info("removed %d leftover(s) of a killed run: %s", len(removed), ", ".join(removed))


def require_done(uri: str | None, stage: str) -> None:
    """Fail clearly when a stage's input, the output of an earlier stage, is not there yet."""
    if uri and io.read_manifest(uri) is None:
        raise io.DataError(f"{uri}: no finished {stage} output here; run the {stage} stage (or the whole pipeline) first")


def _numbers(d: dict[str, Any], prefix: str = "") -> dict[str, float]:
    return {f"{prefix}{k}": float(v) for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _signal_uris(cfg: PipelineConfig, plan: StagePlan) -> list[str]:
    """The stores the distill stage reads: this run's, then ``signal.extra_uris`` (other teachers)."""
    return [plan.signal_uri, *cfg.signal.extra_uris] if plan.signal_uri else []


def _signal_inputs(cfg: PipelineConfig, plan: StagePlan) -> dict[str, Any]:
    uris = _signal_uris(cfg, plan)
    return {"signal": [(io.read_manifest(u) or {}).get("inputs_sha256") for u in uris]} if uris else {}


def _real_split_inputs(plan: StagePlan) -> dict[str, Any]:
    files = (io.read_manifest(plan.mix_uri) or {}).get("files", {})
    return {"data": (files.get(TASK_TRAIN_FILE) or {}).get("sha256"), "val": (files.get(VAL_FILE) or {}).get("sha256")}


def teacher_lineage(plan: StagePlan) -> dict[str, Any]:
    """The teacher as recorded in manifests: its fingerprint, and its tokenizer when it is a folder."""
    fp = plan.fingerprints.get("teacher") or fingerprint(plan.teacher_uri, kind="model")
    tokenizer = lineage.model_lineage(plan.teacher_uri, fp) if fp.get("kind") == "model" else {}
    return {"teacher": fp["sha256"], "teacher_uri": plan.teacher_uri, **tokenizer}


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


def log_model(cfg: PipelineConfig, plan: StagePlan, run_id: str, checkpoint_uri: str) -> dict[str, str]:
    """The checkpoint as an MLflow model (transformers flavor) logged once: a checkpoint already
    logged (the same inputs, an earlier night) is referenced, not logged again."""
    fingerprint = (io.read_manifest(checkpoint_uri) or {}).get("inputs_sha256") or io.sha256_of(checkpoint_uri)
    logged = tracking.find_logged_model(cfg.tracking.experiment, fingerprint)
    if logged is None:
        logged = tracking.log_checkpoint_model(
            run_id, io.localize(checkpoint_uri), fingerprint=fingerprint, example_prompt=_example_prompt(cfg, plan),
            max_new_tokens=cfg.evaluate.max_new_tokens, prompt_prefix=prompt_prefix_of(checkpoint_uri),
        )
    tracking.set_tags(run_id, {"mydistill.model_uri": logged["model_uri"]})
    return logged


def _example_prompt(cfg: PipelineConfig, plan: StagePlan) -> str:
    """An input example for the logged model: the first eval prompt."""
    if io.exists(plan.eval_uri):
        for record in io.iter_records(plan.eval_uri):
            return str(record.get(cfg.data.prompt_field, ""))
    return "Hello"


def quality_gate(
    score: float, teacher_retained: float | None, *, min_teacher_retained: float, champion: dict[str, Any] | None,
    beat_champion: bool = True, metric: str = "exact", retained_undefined: str | None = None,
) -> dict[str, Any]:
    """Decide whether a student may take the alias, and say why in one sentence.

    It passes when it keeps at least ``min_teacher_retained`` of the teacher's ``metric`` score
    and, with ``beat_champion``, scores strictly higher than ``champion`` (``{"version", "score",
    "metric"}`` of the version the alias points to now; None: no champion yet, which passes; a
    champion with no recorded score, or one scored on another metric, cannot be compared and does
    not block). ``retained_undefined`` says why there is no share to compare (a teacher scoring 0):
    the gate then passes only when ``min_teacher_retained`` is 0.
    """
    if teacher_retained is None:
        # undefined is not 0%: it blocks only a gate that asks for some share of the teacher's score
        passed = min_teacher_retained == 0
        reasons = [f"% of teacher retained is undefined: {retained_undefined}" if retained_undefined
                   else "no teacher score to compare with"]
        if passed:
            reasons.append("the gate asks for no share of it (min_teacher_retained 0)")
    else:
        passed = teacher_retained >= min_teacher_retained
        relation = "at least" if passed else "below"
        said = "exact match" if metric == "exact" else metric
        reasons = [f"student keeps {teacher_retained:.1%} of the teacher's {said} ({relation} the gate's {min_teacher_retained:.0%})"]
    if beat_champion:
        if champion is None:
            reasons.append("no champion yet")
        elif champion.get("score") is None:
            reasons.append(f"champion v{champion['version']} has no recorded score to beat")
        elif champion.get("metric", "exact") != metric:
            reasons.append(f"champion v{champion['version']} was scored on {champion.get('metric', 'exact')}, not {metric}: not compared")
        elif score > champion["score"]:
            reasons.append(f"beats champion v{champion['version']} ({score:.3f} > {champion['score']:.3f})")
        else:
            passed = False
            reasons.append(f"does not beat champion v{champion['version']} ({score:.3f} ≤ {champion['score']:.3f})")
    return {
        "passed": passed,
        "reason": "; ".join(reasons),
        "metric": metric,
        "score": score,
        "teacher_retained": teacher_retained,
        "threshold": min_teacher_retained,
        "champion_version": champion["version"] if champion else None,
        "champion_score": champion.get("score") if champion else None,
    }


STUDENT_TAG = "mydistill.student_sha256"  # the checkpoint's identity (its manifest's inputs_sha256)


def _registered_before(cfg: PipelineConfig, existing: dict[str, Any]) -> dict[str, Any]:
    """The decision already taken for this checkpoint's version. If that run passed the gate but died
    before moving the alias, the alias moves now, unless a later version holds it."""
    reg, version, tags = cfg.registry, existing["version"], existing["tags"]
    passed = tags.get("gate_passed") == "True"
    holder = tracking.alias_holder(reg.model_name, reg.alias)
    if passed and (holder is None or int(holder["version"]) < int(version)):
        tracking.set_model_alias(reg.model_name, reg.alias, version)
        holder = {"version": version}
    score = float(tags[tracking.SCORE_TAG]) if tracking.SCORE_TAG in tags else float("nan")
    return {
        "passed": passed, "reason": f"already registered as v{version} (same checkpoint): {tags.get('gate_reason', '')}",
        "score": score, "teacher_retained": float(tags["teacher_retained"]) if "teacher_retained" in tags else None,
        "threshold": reg.min_teacher_retained, "champion_version": None, "champion_score": None,
        "registered": True, "reused": True, "model_name": reg.model_name, "version": version,
        "alias": reg.alias if holder is not None and holder["version"] == version else None,
        "version_url": tracking.model_version_url(reg.model_name, version),
    }


def register(cfg: PipelineConfig, plan: StagePlan, report: dict[str, Any], parent_run_id: str | None = None) -> dict[str, Any]:
    """Register the student in the MLflow model registry; move the alias only if the gate passes.

    The gate (:func:`quality_gate`): the student keeps at least ``registry.min_teacher_retained``
    of the teacher's ``registry.gate_metric`` score and beats the version the alias points to now (its
    ``mydistill.score`` tag). Every student is registered, passing or not; the decision and its
    reason are tags on the new version and on the register run, and ``decision.json`` there.
    Without tracking (no parent run) or with the registry off, only the decision is returned. A
    checkpoint registered before (a re-run, a nightly run on which nothing changed) is not
    registered again: its earlier decision is returned (``reused``).
    """
    from mydistill.metrics import report_key

    reg = cfg.registry
    student = report["models"]["student"]
    metric = report.get("gate_metric", reg.gate_metric)
    score, retained = float(student[report_key(metric)]), student.get("teacher_retained")
    gate = {"metric": metric, "retained_undefined": report.get("retained_undefined")}
    if not reg.enabled or parent_run_id is None:
        decision = quality_gate(
            score, retained, min_teacher_retained=reg.min_teacher_retained, champion=None, beat_champion=False, **gate,
        )
        return {**decision, "registered": False}
    # exactly once per checkpoint: a re-run (or a run killed after registering) finds its version
    fingerprint = (io.read_manifest(plan.student_uri) or {}).get("inputs_sha256")
    existing = tracking.find_model_version(reg.model_name, STUDENT_TAG, fingerprint) if fingerprint else None
    if existing is not None:
        return _registered_before(cfg, existing)
    with tracking.stage_run(parent_run_id, "register", cfg.tracking.experiment) as run_id:
        assert run_id is not None
        # read before registering: the new version must be compared with the one before it
        champion = tracking.alias_holder(reg.model_name, reg.alias) if reg.beat_champion else None
        decision = quality_gate(
            score, retained, min_teacher_retained=reg.min_teacher_retained, champion=champion, beat_champion=reg.beat_champion,
            **gate,
        )
        tracking.log_params(run_id, {"register": reg.model_dump(), "student_uri": plan.student_uri})
        tracking.log_metrics(run_id, {
            "gate_score": score, **({tracking.SCORE_METRIC: score} if metric == "exact" else {}),
            **({"teacher_retained": retained} if retained is not None else {}),
        })
        model = log_model(cfg, plan, run_id, plan.student_uri)  # found: the training stage logged it
        # the pipeline run lists its student under "Logged models"; the register run took it as input
        tracking.link_model(parent_run_id, model["model_id"], as_output=True)
        tracking.link_model(run_id, model["model_id"], as_output=False)
        version = tracking.register_model_version(
            reg.model_name, model, register_run_id=run_id,
            tags={
                "gate_passed": str(decision["passed"]), "gate_reason": decision["reason"], "student_uri": plan.student_uri,
                tracking.SCORE_TAG: f"{score:.6f}", tracking.SCORE_METRIC_TAG: metric,
                **({STUDENT_TAG: fingerprint} if fingerprint else {}),
                **({"teacher_retained": f"{retained:.6f}"} if retained is not None else {}),
                **({"champion_before": f"v{decision['champion_version']}"} if decision["champion_version"] else {}),
                # a student distilled step-by-step answers behind its label prefix: whoever serves it needs it
                **({PROMPT_PREFIX_KEY: prefix} if (prefix := prompt_prefix_of(plan.student_uri)) else {}),
            },
        )
        if decision["passed"]:
            tracking.set_model_alias(reg.model_name, reg.alias, version)
        decision.update(
            registered=True, model_name=reg.model_name, version=version, alias=reg.alias if decision["passed"] else None,
            version_url=tracking.model_version_url(reg.model_name, version),
        )
        tracking.log_dict(run_id, decision, "decision.json")
        tracking.set_tags(run_id, {
            "mydistill.gate": "passed" if decision["passed"] else "failed", "mydistill.gate_reason": decision["reason"],
            "mydistill.model_version": f"{reg.model_name}/{version}",
        })
    return decision
