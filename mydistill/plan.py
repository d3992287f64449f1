"""Where each stage of a pipeline run reads and writes: a plan computed from the config alone.

Every stage's output URI is ``<work_dir>/<stage>-<hash>`` where the hash covers the config
sections that stage depends on and the hashes of its upstream stages. The same config therefore
always names the same artifacts (a re-run finds them and skips the work), a changed config names
new ones (nothing is overwritten), and any stage can be run alone from the artifacts of the
stages before it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from mydistill import io
from mydistill.config import RUN_ONLY_FIELDS, PipelineConfig, TrainConfig


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

    @property
    def student_uri(self) -> str:
        """The pipeline's final student: stage 2's output, or stage 1's when stage 2 is off."""
        return self.finetune_uri or self.distill_uri

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _key(*parts: Any) -> str:
    return io.sha256_of(parts)[:12]


def _training(cfg: TrainConfig) -> dict[str, Any]:
    return cfg.model_dump(exclude=RUN_ONLY_FIELDS)


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
    teacher_id = cfg.teacher.id or teacher_uri.rstrip("/").rsplit("/", 1)[-1]
    student = cfg.student.model_dump()

    generate = _key("generate", teacher_uri, prompts_uri, cfg.generate.content_params())
    mix = _key("mix", generate, real_uri, cfg.data.model_dump(), cfg.mix.model_dump())
    signal = _key("signal", mix, teacher_uri, _signal_content(cfg), cfg.distill.max_length) if cfg.signal.enabled else None
    distill = _key(
        "distill", mix, teacher_uri, student, _training(cfg.distill), cfg.distill.loss.model_dump(),
        *([signal, cfg.signal.extra_uris] if signal else []),
    )
    finetune = _key("finetune", distill, _training(cfg.finetune)) if cfg.finetune.enabled else None
    baseline = (
        _key("baseline", mix, student, _training(cfg.distill), baseline_steps(cfg)) if cfg.evaluate.baseline else None
    )
    evaluate = _key("evaluate", finetune or distill, baseline, eval_uri, cfg.evaluate.model_dump())
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
    )


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
