"""Where each stage of a pipeline run reads and writes: a plan computed from the config and from
what the inputs hold.

Every stage's output URI is ``<work_dir>/<stage>-<hash>`` where the hash covers the config
sections that stage depends on, the fingerprints (:mod:`mydistill.fingerprint`) of the inputs it
reads and the hashes of its upstream stages. The same config on unchanged inputs therefore names
the same artifacts (a re-run finds them and skips the work); a changed config, or data or a
teacher changed in place at the same URI, names new ones for exactly the stages downstream of the
change (nothing is overwritten); and any stage can be run alone from the artifacts before it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from mydistill import io
from mydistill.config import DISTILL_ONLY_FIELDS, PipelineConfig, learned_fields
from mydistill.fingerprint import fingerprint, part

STAGES = ("generate", "mix", "signal", "distill", "finetune", "baseline", "evaluate")
# What each stage reads: fingerprinted inputs (``teacher.tokenizer`` is one part of the teacher's
# fingerprint: the baseline reads the teacher's tokenizer and chat template, not its weights)
# and earlier stages. The plan's hashes follow this; `mydistill plan` explains re-runs with it.
STAGE_READS: dict[str, tuple[str, ...]] = {
    "generate": ("teacher", "prompts"),
    "mix": ("generate", "real"),
    "signal": ("mix", "teacher"),
    "distill": ("mix", "signal", "teacher", "student_init", "extra_teachers", "signal_extra"),
    "finetune": ("distill", "mix"),
    "baseline": ("real", "student_init", "teacher.tokenizer", "teacher.chat_template"),
    "evaluate": ("finetune", "distill", "baseline", "teacher", "eval"),
}


@dataclass(frozen=True)
class StagePlan:
    teacher_uri: str
    teacher_id: str
    prompts_uri: str
    real_uri: str
    eval_uri: str
    demo_data_uri: str | None
    generate_uri: str
    mix_uri: str
    distill_uri: str
    finetune_uri: str | None
    baseline_uri: str | None
    evaluate_uri: str
    signal_uri: str | None = None  # the teacher-signal store (signal.enabled), between mix and distill
    response_cache_uri: str | None = None  # teacher responses kept across runs (generate.reuse_responses)
    # input name -> fingerprint (mydistill.fingerprint) of what it held when the plan was made
    fingerprints: dict[str, Any] = field(default_factory=dict)
    student_init_uri: str | None = None  # the student cut from the teacher (student.init.from_teacher)

    @property
    def student_uri(self) -> str:
        """The pipeline's final student: stage 2's output, or stage 1's when stage 2 is off."""
        return self.finetune_uri or self.distill_uri

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def stage_uris(self) -> dict[str, str]:
        """``{stage: output URI}`` of the stages this plan runs, in pipeline order."""
        return {s: uri for s in STAGES if (uri := getattr(self, f"{s}_uri"))}


# student.init fields that only size a measured cut (layers: auto); left out of a fixed cut's key so it keeps its old one
_AUTO_CUT_FIELDS = {"num_layers", "parameter_fraction", "importance_prompts", "importance", "importance_on"}


def _key(*parts: Any) -> str:
    return io.sha256_of(parts)[:12]


def make_plan(cfg: PipelineConfig) -> StagePlan:
    root = cfg.work_dir
    demo_data_uri = None
    if cfg.demo is not None:
        from mydistill.demo.bootstrap import teacher_key

        demo_data_uri = io.join(root, f"demo-data-{_key(cfg.demo.model_dump(include={'num_real', 'num_prompts', 'num_eval'}))}")
        teacher_uri = cfg.teacher.uri or io.join(cfg.demo.cache_dir, f"teacher-{teacher_key(cfg.demo)}")
        prompts_uri = cfg.data.prompts_uri or io.join(demo_data_uri, "prompts.jsonl")
        real_uri = cfg.data.real_uri or io.join(demo_data_uri, "real.jsonl")
        eval_uri = cfg.data.eval_uri or io.join(demo_data_uri, "eval.jsonl")
    else:
        teacher_uri, prompts_uri, real_uri, eval_uri = (
            cfg.teacher.uri, cfg.data.prompts_uri, cfg.data.real_uri, cfg.data.eval_uri,
        )
    assert teacher_uri and prompts_uri and real_uri and eval_uri  # guaranteed by PipelineConfig
    teacher_id = cfg.teacher.id or io.basename(teacher_uri)
    fps = input_fingerprints(cfg, teacher_uri=teacher_uri, prompts_uri=prompts_uri, real_uri=real_uri, eval_uri=eval_uri)
    sha = {name: fp["sha256"] for name, fp in fps.items()}
    extra = {"extra_teachers": [sha[f"extra_teacher_{i}"] for i in range(len(cfg.distill.extra_teachers))]}
    generate = _key("generate", teacher_uri, sha["teacher"], teacher_id, prompts_uri, sha["prompts"], cfg.generate.content_params())
    mix = _key("mix", generate, real_uri, sha["real"], cfg.data.model_dump(), cfg.mix.model_dump())
    init = cfg.student.init
    # the defaults of the measured cut's criterion stay out of its key, so cuts measured before they could be
    # chosen keep theirs; measured on the teacher's responses, the cut depends on the mix they are read from
    defaults = {k for k in ("importance", "importance_on") if getattr(init, k) == type(init).model_fields[k].default}
    student_init = (
        _key("student-init", sha.get("teacher", teacher_uri), init.model_dump(exclude=defaults), sha["prompts"],
             *([mix] if init.importance_on == "responses" else [])) if init.layers == "auto"
        else _key("student-init", sha.get("teacher", teacher_uri), init.model_dump(exclude=_AUTO_CUT_FIELDS))
        if init.from_teacher else None
    )
    # the student as its stages read it: a pretrained folder (by content), a cut of the teacher, or an architecture
    # (student.dtype is the precision students are evaluated in: the evaluate stage's key holds it, training's does not)
    unsized = (
        {"dtype": True, **({"init": {"importance_on": True}} if "importance_on" in defaults else {})} if init.layers == "auto"
        else {"dtype": True, "init": dict.fromkeys(_AUTO_CUT_FIELDS, True)}
    )
    student = {**cfg.student.model_dump(exclude=unsized), "arch": cfg.student.arch.as_dict(), "init": sha.get("student_init"),
               "cut_from_teacher": student_init}

    signal = _key("signal", mix, teacher_uri, sha["teacher"], _signal_content(cfg), cfg.distill.max_length) if cfg.signal.enabled else None
    signal_extra = [sha[f"signal_extra_{i}"] for i in range(len(cfg.signal.extra_uris))]
    distill = _key(
        "distill", mix, teacher_uri, sha["teacher"], student, learned_fields(cfg.distill), cfg.distill.loss.model_dump(), extra,
        *([signal, cfg.signal.extra_uris, signal_extra] if signal else []),
    )
    finetune = _key("finetune", distill, learned_fields(cfg.finetune)) if cfg.finetune.enabled else None
    # the baseline reads the real data's split of the mix (independent of the teacher's responses)
    # and, without a pretrained student, the teacher's tokenizer: nothing of stage 1's
    baseline = (
        _key(
            "baseline", real_uri, sha["real"], cfg.data.model_dump(), cfg.mix.model_dump(include={"val_fraction", "dedup", "seed"}),
            student, None if cfg.student.init_uri else [part(fps["teacher"], p) for p in ("tokenizer", "chat_template")],
            learned_fields(cfg.distill, DISTILL_ONLY_FIELDS), baseline_steps(cfg),
        )
        if cfg.evaluate.baseline else None
    )
    # the precisions models are evaluated in, once set (left at auto they stay out: older keys still hold)
    dtypes = [{"dtypes": [cfg.teacher.dtype, cfg.student.dtype]}] if {cfg.teacher.dtype, cfg.student.dtype} != {"auto"} else []
    evaluate = _key(
        "evaluate", finetune or distill, baseline, sha["teacher"], eval_uri, sha["eval"], cfg.data.model_dump(), cfg.evaluate.model_dump(),
        *dtypes,
    )
    return StagePlan(
        teacher_uri=teacher_uri,
        teacher_id=teacher_id,
        prompts_uri=prompts_uri,
        real_uri=real_uri,
        eval_uri=eval_uri,
        demo_data_uri=demo_data_uri,
        generate_uri=io.join(root, f"generate-{generate}"),
        mix_uri=io.join(root, f"mix-{mix}"),
        distill_uri=io.join(root, f"distill-{distill}"),
        finetune_uri=io.join(root, f"finetune-{finetune}") if finetune else None,
        baseline_uri=io.join(root, f"baseline-{baseline}") if baseline else None,
        evaluate_uri=io.join(root, f"evaluate-{evaluate}"),
        signal_uri=io.join(root, f"signal-{signal}") if signal else None,
        response_cache_uri=io.join(root, "response-cache") if cfg.generate.reuse_responses else None,
        fingerprints=fps,
        student_init_uri=io.join(root, f"student-init-{student_init}") if student_init else None,
    )


def input_fingerprints(cfg: PipelineConfig, *, teacher_uri: str, prompts_uri: str, real_uri: str, eval_uri: str) -> dict[str, Any]:
    """The fingerprint of every input the pipeline reads: datasets, teacher, student init, other
    teachers and teacher-signal stores. One listing per input, no dataset read."""
    teacher_kind = "model"
    if cfg.generate.backend == "openai" and not io.exists(teacher_uri):
        teacher_kind = "name"  # an API-served teacher: known by its name (and endpoint)
    fps = {
        "teacher": fingerprint(teacher_uri, kind=teacher_kind),
        "prompts": fingerprint(prompts_uri),
        "real": fingerprint(real_uri),
        "eval": fingerprint(eval_uri),
    }
    if teacher_kind == "name" and cfg.generate.api_base:
        fps["teacher"] = fingerprint(f"{cfg.generate.api_base}#{cfg.generate.api_model or teacher_uri}", kind="name")
    if cfg.student.init_uri:
        fps["student_init"] = fingerprint(cfg.student.init_uri, kind="model")
    for i, t in enumerate(cfg.distill.extra_teachers):
        fps[f"extra_teacher_{i}"] = fingerprint(t.uri, kind="model")
    for i, uri in enumerate(cfg.signal.extra_uris):
        fps[f"signal_extra_{i}"] = fingerprint(uri)
    return fps


def _signal_content(cfg: PipelineConfig) -> dict[str, Any]:
    # what the store holds; batch sizes, shard size and device only change how it is computed
    content = cfg.signal.model_dump(include={"k", "sampled_tokens", "seed"})
    # a served teacher is named by its endpoint and model (empty for the local backend: its keys stay as they were)
    return {**content, **cfg.signal.source_params(), "mode": signal_mode(cfg), "temperature": signal_temperature(cfg)}


def signal_mode(cfg: PipelineConfig) -> str:
    """The store's concrete mode: ``signal.mode``, with 'auto' decided by ``distill.loss.divergence``."""
    return cfg.signal.resolved_mode(cfg.distill.loss.divergence)


def signal_temperature(cfg: PipelineConfig) -> float:
    """The store's temperature: ``signal.temperature``, or the distill loss temperature when empty."""
    return cfg.signal.temperature if cfg.signal.temperature is not None else cfg.distill.loss.temperature


def baseline_steps(cfg: PipelineConfig) -> int:
    """The baseline gets the distilled student's whole step budget (stage 1 + stage 2)."""
    return cfg.distill.steps + (cfg.finetune.steps if cfg.finetune.enabled else 0)
