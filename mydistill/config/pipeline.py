"""The pipeline configuration: one pydantic tree, loadable from YAML, validated with clear messages.

The same models are the Prefect flows' parameters, so the Prefect UI renders a form from the
field descriptions below. YAML files in ``configs/`` are presets of this tree.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from mydistill.config.evaluation import EvaluateConfig, RegisterConfig
from mydistill.config.generation import GenerateConfig
from mydistill.config.models import ModelArch, StudentSpec, TeacherSpec
from mydistill.config.section import Section
from mydistill.config.signal import SignalConfig
from mydistill.config.tracking import CostsConfig, TrackingConfig
from mydistill.config.training import (
    DistillConfig,
    FinetuneConfig,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
PRESETS_DIR = REPO_ROOT / "configs"


class DataConfig(Section):
    prompts_uri: str | None = Field(None, description="Unlabelled prompts for the teacher (JSONL/Parquet, field `prompt`).")
    real_uri: str | None = Field(None, description="Real labelled task data (JSONL/Parquet, fields `prompt` and the answer field).")
    eval_uri: str | None = Field(None, description="Held-out labelled data for evaluation.")
    prompt_field: str = Field("prompt", description="Record field holding the prompt.")
    answer_field: str = Field("answer", description="Record field holding the reference answer in real/eval data.")
    category_field: str | None = Field(
        "category", description="Eval record field naming a category (scores are also reported per category); empty: none."
    )


class DemoConfig(Section):
    """The embedded offline demo: writes its datasets and trains (once, cached) its teacher."""

    num_real: int = Field(200, gt=0, description="Real labelled examples (small on purpose).")
    num_prompts: int = Field(3000, gt=0, description="Unlabelled prompts the teacher answers.")
    num_eval: int = Field(300, gt=0, description="Held-out evaluation examples.")
    teacher_arch: ModelArch = Field(
        default_factory=lambda: ModelArch(
            hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512,
            tie_word_embeddings=False,
        ),
        description="Architecture of the demo teacher.",
    )
    teacher_train_examples: int = Field(20000, gt=0, description="Labelled examples the demo teacher is trained on.")
    teacher_steps: int = Field(800, gt=0, description="Training steps for the demo teacher.")
    teacher_lr: float = Field(3e-3, gt=0, description="Learning rate for the demo teacher.")
    cache_dir: str = Field(".cache/demo", description="Where the trained demo teacher is cached (keyed by its config).")


class MixConfig(Section):
    teacher_fraction: float = Field(
        0.7, ge=0, le=1, description="Fraction of the training mix drawn from teacher responses (the rest is real data)."
    )
    val_fraction: float = Field(0.1, ge=0, lt=1, description="Fraction of the real data held out for validation.")
    total: int | None = Field(
        None, gt=0, description="Size of the training mix. Empty: every usable teacher record is used once."
    )
    upsample: bool = Field(
        True, description="Sample the scarcer source with replacement to reach the ratio (else shrink the mix)."
    )
    dedup: bool = Field(True, description="Drop duplicate prompts (and teacher prompts that appear in the real data).")
    seed: int = Field(0, description="Seed for sampling and shuffling.")


class PipelineConfig(Section):
    """Everything one pipeline run needs: teacher → mix → distill → finetune → evaluate → register."""

    name: str = Field("demo", min_length=1, description="Run name shown in Prefect and MLflow.")
    work_dir: str = Field("runs", description="Root for all artifacts (local path or s3://).")

    @field_validator("work_dir")
    @classmethod
    def _work_dir_is_a_folder_of_its_own(cls, value: str) -> str:
        # every stage writes and sweeps below it: never the filesystem root, a bucket's root or ''
        stripped = value.strip()
        bare = stripped.removeprefix("file://").rstrip("/")
        if not bare or bare in (".", "~") or (bare.startswith("s3:") and bare.count("/") < 3) or os.path.abspath(os.path.expanduser(bare)) == "/":
            raise ValueError(
                f"work_dir must name a folder of its own for this project's artifacts (e.g. runs or s3://bucket/mydistill), "
                f"not {value!r}"
            )
        return stripped
    seed: int = Field(0, description="Global seed.")
    demo: DemoConfig | None = Field(None, description="Run on the embedded offline demo (datasets and teacher made locally).")
    teacher: TeacherSpec = Field(default_factory=TeacherSpec, description="The teacher.")
    student: StudentSpec = Field(default_factory=StudentSpec, description="The student.")
    data: DataConfig = Field(default_factory=DataConfig, description="Input datasets.")
    generate: GenerateConfig = Field(default_factory=GenerateConfig, description="Teacher generation (see docs/generation.md).")
    mix: MixConfig = Field(default_factory=MixConfig, description="Mixing teacher and real data.")
    signal: SignalConfig = Field(
        default_factory=SignalConfig,
        description="Optional stage between mix and distill: the teacher's sparse signal (sampled or top-k) "
        "computed once and stored (see docs/teacher_signal.md).",
    )
    distill: DistillConfig = Field(default_factory=DistillConfig, description="Stage 1: distillation.")
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig, description="Stage 2: fine-tuning on task data.")
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig, description="Evaluation.")
    registry: RegisterConfig = Field(default_factory=RegisterConfig, description="Model registration and quality gate.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow tracking.")
    costs: CostsConfig = Field(default_factory=CostsConfig, description="Prices for the run's cost report (optional).")
    allow_lineage_mismatch: bool = Field(
        False,
        description="Let a stage join artifacts whose lineage disagrees (teacher responses by another teacher than "
        "the one distilled online, a stage-1 checkpoint or teacher-signal store made with another tokenizer). "
        "Off: such a join stops with one message naming both sides. Turn on only when that is what you intend.",
    )
    training_flow_runs: bool = Field(
        False,
        description="Run each training stage (distill, finetune, baseline) as a flow run of its own stage deployment "
        "(deploy/prefect.yaml: on the GPU pool), a subflow of the pipeline's: the pipeline runs on the CPU pool and "
        "GPUs are held only while training. Off: every stage runs inside the pipeline's own flow run.",
    )

    @model_validator(mode="after")
    def _teacher_dtype_everywhere(self) -> PipelineConfig:
        # one knob for the teacher's precision: the stages that load it follow unless set on their own
        if self.teacher.dtype != "auto":
            for section in (self.generate, self.signal):
                if section.dtype == "auto":
                    object.__setattr__(section, "dtype", self.teacher.dtype)
        return self

    @model_validator(mode="after")
    def _inputs_present(self) -> PipelineConfig:
        if self.demo is None:
            missing = [
                name
                for name, value in [
                    ("teacher.uri", self.teacher.uri),
                    ("data.prompts_uri", self.data.prompts_uri),
                    ("data.real_uri", self.data.real_uri),
                    ("data.eval_uri", self.data.eval_uri),
                ]
                if not value
            ]
            if missing:
                raise ValueError(f"without `demo`, these must be set: {', '.join(missing)}")
        return self

    @model_validator(mode="after")
    def _student_layers_exist(self) -> PipelineConfig:
        # checked here when the teacher is a local folder, so a wrong index fails before any work;
        # an s3:// teacher is checked when the student is cut
        init, uri = self.student.init, self.teacher.uri
        if init.from_teacher and uri and "://" not in uri:
            config = Path(uri) / "config.json"
            if config.exists():
                import json

                layers = json.loads(config.read_text()).get("num_hidden_layers")
                if isinstance(layers, int) and init.layers == "auto":
                    if init.num_layers is not None and init.num_layers > layers:
                        raise ValueError(f"student.init.num_layers {init.num_layers} is more than the teacher's {layers} blocks ({config})")
                elif isinstance(layers, int):
                    try:
                        init.chosen_layers(layers)
                    except ValueError as e:
                        raise ValueError(f"{e} ({config})") from None
        return self

    @model_validator(mode="after")
    def _kept_layer_map_has_a_cut(self) -> PipelineConfig:
        hidden = self.distill.loss.hidden
        if hidden is not None and hidden.layer_map == "kept" and not self.student.init.from_teacher:
            raise ValueError(
                "distill.loss.hidden.layer_map: kept pairs each student block with the teacher block it was cut from, "
                "so it needs student.init.from_teacher: true; use 'uniform' or explicit pairs for another student"
            )
        return self

    @model_validator(mode="after")
    def _gate_metric_computed(self) -> PipelineConfig:
        if self.registry.gate_metric not in self.evaluate.metrics:
            raise ValueError(
                f"registry.gate_metric {self.registry.gate_metric!r} is not computed: add it to evaluate.metrics "
                f"(now {self.evaluate.metrics}) or gate on one of those"
            )
        return self

    @model_validator(mode="after")
    def _signal_fits_distill(self) -> PipelineConfig:
        sig, loss = self.signal, self.distill.loss
        if not sig.enabled:
            if sig.extra_uris:
                raise ValueError("signal.extra_uris are read only with signal.enabled: true")
            return self
        problems = []
        if self.distill.cross_tokenizer.method != "none":
            problems.append(
                "a teacher-signal store holds token ids of the teacher's tokenizer, so it needs "
                "distill.cross_tokenizer.method: none (one shared tokenizer)"
            )
        if loss.hidden is not None:
            problems.append("distill.loss.hidden needs the online teacher's hidden states, which a store does not hold")
        try:  # mode auto becomes sampled with forward_kl: k must leave room for exact tokens then too
            sig.exact_tokens(sig.resolved_mode(loss.divergence))
        except ValueError as e:
            problems.append(str(e))
        if sig.mode == "sampled" and loss.divergence != "forward_kl":
            problems.append(
                f"signal.mode: sampled is unbiased only for distill.loss.divergence: forward_kl (got {loss.divergence!r})"
            )
        stores = 1 + len(sig.extra_uris)
        if loss.teacher_weights is not None and len(loss.teacher_weights) != stores:
            problems.append(
                f"distill.loss.teacher_weights has {len(loss.teacher_weights)} weights for {stores} teacher-signal "
                "stores (this run's, then signal.extra_uris)"
            )
        if loss.teacher_weights is not None and 0 in loss.teacher_weights:
            problems.append(
                "distill.loss.teacher_weights of 0 leave out an online teacher; with stores leave the store out of "
                "signal.extra_uris instead (store weights must be positive)"
            )
        if self.distill.extra_teachers:
            problems.append(
                "distill.extra_teachers are online teachers, but the distill stage reads the stores instead; give the "
                "other teachers' stores as signal.extra_uris, or turn signal.enabled off"
            )
        if loss.step_by_step is not None:
            problems.append(
                "distill.loss.step_by_step trains on new task-prefixed examples (label and rationale tasks) that a "
                "store, keyed by the mix's prompt + response, does not hold; turn signal.enabled off (the online "
                "teacher scores both tasks) or remove distill.loss.step_by_step"
            )
        if problems:
            raise ValueError("signal.enabled: " + "; ".join(problems))
        return self

    @model_validator(mode="after")
    def _online_teachers_fit_weights(self) -> PipelineConfig:
        weights, teachers = self.distill.loss.teacher_weights, 1 + len(self.distill.extra_teachers)
        if not self.signal.enabled and weights is not None and len(weights) != teachers:
            raise ValueError(
                f"distill.loss.teacher_weights has {len(weights)} weights for {teachers} online teacher(s) (teacher, "
                "then distill.extra_teachers); add teachers to distill.extra_teachers or give one weight per teacher"
            )
        return self


class ConfigError(ValueError):
    """A configuration file or value is invalid; the message names the file and the field."""


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        value = f" (got {e['input']!r})" if "input" in e and not isinstance(e["input"], dict) else ""
        lines.append(f"  {where}: {e['msg']}{value}")
    return "\n".join(lines)


def validate_config(data: dict[str, Any], source: str = "config") -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, source)) from None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) to a nested dict."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. distill.steps=100")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        node[parts[-1]] = yaml.safe_load(raw)
    return data


def resolve_preset(name_or_path: str) -> Path:
    """A YAML path, or the name of a preset in ``configs/`` (``demo`` → ``configs/demo.yaml``)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        return path
    preset = PRESETS_DIR / f"{name_or_path}.yaml"
    if not preset.exists():
        available = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))
        raise ConfigError(f"no preset named {name_or_path!r}; available: {', '.join(available)}")
    return preset


def load_config(name_or_path: str, overrides: list[str] | None = None) -> PipelineConfig:
    """Load a preset name or YAML file, apply ``key=value`` overrides and validate."""
    path = resolve_preset(name_or_path)
    if not path.exists():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return validate_config(apply_overrides(data, overrides or []), str(path))
