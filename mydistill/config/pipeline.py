"""The pipeline configuration: one pydantic tree, loadable from YAML, validated with clear messages.

The same models are the Prefect flows' parameters, so the Prefect UI renders a form from the
field descriptions below. YAML files in ``configs/`` are presets of this tree.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_serializer, field_validator, model_validator

from mydistill.config.cross_tokenizer import CrossTokenizerConfig
from mydistill.config.generation import GenerateConfig, mask_url, warn_if_credentials
from mydistill.config.losses import LossConfig
from mydistill.config.on_policy import OnPolicyConfig
from mydistill.config.signal import SignalConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
PRESETS_DIR = REPO_ROOT / "configs"


ModelDtype = Literal["auto", "float32", "bfloat16", "float16"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelArch(_Section):
    """A Llama-style architecture for a model built from a config (the demo, or a student from scratch)."""

    hidden_size: int = Field(64, gt=0, description="Width of the residual stream.")
    num_hidden_layers: int = Field(2, gt=0, description="Number of transformer blocks.")
    num_attention_heads: int = Field(4, gt=0, description="Attention heads per block.")
    intermediate_size: int = Field(256, gt=0, description="Width of the MLP.")
    max_position_embeddings: int = Field(64, gt=0, description="Longest sequence the model accepts.")
    tie_word_embeddings: bool = Field(True, description="Share input embedding and output projection.")

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ModelArch:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )
        return self


class TeacherSpec(_Section):
    uri: str | None = Field(
        None,
        description="Teacher model folder (local path or s3://, saved with save_pretrained) or, with "
        "the openai generation backend, the served model name. Left empty with `demo` set: the demo "
        "teacher is used.",
    )
    id: str | None = Field(None, description="A name for the teacher recorded in datasets and MLflow.")
    dtype: ModelDtype = Field(
        "auto",
        description="Precision the frozen teacher is loaded in, wherever it is loaded (generation, the signal stage, "
        "both training stages, evaluation): 'auto' = bfloat16 on a GPU that supports it, else float32. Setting it "
        "also sets generate.dtype and signal.dtype where those are left at 'auto'.",
    )


class StudentInit(_Section):
    """A student cut from the teacher: its embeddings, some of its blocks, final norm and head."""

    from_teacher: bool = Field(
        False, description="Start the student from the teacher's own weights (Llama/Qwen/Mistral-style decoders)."
    )
    layers: list[int] | None = Field(
        None, description="Teacher blocks to keep, in order (0-based), e.g. [0, 2, 4, 29]."
    )
    keep_every: int | None = Field(
        None, gt=0, description="Keep every k-th teacher block (0, k, 2k, …) plus the last one; instead of `layers`."
    )

    @model_validator(mode="after")
    def _one_choice_of_layers(self) -> StudentInit:
        if not self.from_teacher:
            if self.layers is not None or self.keep_every is not None:
                raise ValueError("layers / keep_every choose teacher blocks, so they need from_teacher: true")
            return self
        if (self.layers is None) == (self.keep_every is None):
            raise ValueError("from_teacher: give exactly one of layers (a list of block indices) or keep_every")
        if self.layers is not None:
            if not self.layers:
                raise ValueError("layers: keep at least one block")
            bad = [i for i in self.layers if i < 0]
            if bad:
                raise ValueError(f"layers: block indices start at 0 (got {bad})")
            if sorted(set(self.layers)) != self.layers:
                raise ValueError(f"layers: give distinct indices in increasing order (got {self.layers})")
        return self

    def chosen_layers(self, num_teacher_layers: int) -> list[int]:
        """The teacher blocks kept; raises ValueError for an index past the teacher's last block."""
        if self.layers is not None:
            too_big = [i for i in self.layers if i >= num_teacher_layers]
            if too_big:
                raise ValueError(
                    f"student.init.layers {too_big} out of range: the teacher has {num_teacher_layers} blocks "
                    f"(0..{num_teacher_layers - 1})"
                )
            return list(self.layers)
        assert self.keep_every is not None
        kept = list(range(0, num_teacher_layers, self.keep_every))
        return kept if kept[-1] == num_teacher_layers - 1 else [*kept, num_teacher_layers - 1]


class StudentSpec(_Section):
    init_uri: str | None = Field(
        None,
        description="Pretrained student folder to start from (local path or s3://). Empty: build the "
        "student from `arch` with the teacher's tokenizer.",
    )
    arch: ModelArch = Field(default_factory=ModelArch, description="Architecture when building from scratch.")
    dtype: ModelDtype = Field(
        "auto",
        description="Precision trained students (and the baseline) are loaded in for evaluation: 'auto' = bfloat16 "
        "on a GPU that supports it, else float32. Training keeps float32 master weights (DeepSpeed's bf16 "
        "section sets the compute precision).",
    )
    init: StudentInit = Field(
        default_factory=StudentInit,
        description="Cut the student from the teacher (from_teacher: true with layers or keep_every) instead of "
        "building it from `arch`.",
    )

    @model_validator(mode="after")
    def _one_start(self) -> StudentSpec:
        if self.init.from_teacher and self.init_uri:
            raise ValueError("give either init_uri (a pretrained student) or init.from_teacher, not both")
        return self


class DataConfig(_Section):
    prompts_uri: str | None = Field(None, description="Unlabelled prompts for the teacher (JSONL/Parquet, field `prompt`).")
    real_uri: str | None = Field(None, description="Real labelled task data (JSONL/Parquet, fields `prompt` and the answer field).")
    eval_uri: str | None = Field(None, description="Held-out labelled data for evaluation.")
    prompt_field: str = Field("prompt", description="Record field holding the prompt.")
    answer_field: str = Field("answer", description="Record field holding the reference answer in real/eval data.")
    category_field: str | None = Field(
        "category", description="Eval record field naming a category (scores are also reported per category); empty: none."
    )


class DemoConfig(_Section):
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


class MixConfig(_Section):
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


class TrainConfig(_Section):
    steps: int = Field(300, gt=0, description="Optimizer steps.")
    batch_size: int = Field(64, gt=0, description="Sequences per step.")
    lr: float = Field(3e-3, gt=0, description="Peak learning rate (AdamW, warmup then cosine decay).")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final learning rate as a fraction of the peak.")
    warmup_steps: int = Field(30, ge=0, description="Linear warmup steps.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    grad_clip: float = Field(1.0, gt=0, description="Max gradient norm.")
    max_length: int | None = Field(
        None, gt=1,
        description="Longest tokenized example; longer responses are cut. Empty: chosen from the training data "
        "(max_length_percentile of prompt+response tokens, at least the longest prompt, at most max_length_cap).",
    )
    max_length_percentile: float = Field(0.99, gt=0, le=1, description="With max_length empty: the share of examples that fit whole.")
    max_length_cap: int = Field(1024, gt=1, description="With max_length empty: the longest it may be chosen.")
    log_every: int = Field(10, gt=0, description="Log metrics every N steps.")
    eval_every: int = Field(100, gt=0, description="Validation loss every N steps.")
    save_every: int = Field(0, ge=0, description="Checkpoint every N steps (0: only at the end).")
    seed: int = Field(0, description="Seed for data order and initialisation.")
    device: str = Field("auto", description="'auto' (cuda if available), 'cpu' or 'cuda'.")
    threads: int | None = Field(None, gt=0, description="torch CPU threads (empty: torch's default).")
    launcher: Literal["none", "torchrun", "deepspeed"] = Field(
        "none", description="'none': train in the task's own process; 'torchrun' / 'deepspeed': launch num_processes workers."
    )
    num_processes: int = Field(1, gt=0, description="Worker processes per node (one per GPU; CPU workers use gloo).")
    deepspeed: str | None = Field(
        None, description="DeepSpeed config (e.g. deploy/deepspeed/zero3.json or zero3_offload.json); empty: no DeepSpeed."
    )
    hostfile: str | None = Field(None, description="DeepSpeed hostfile for multi-node runs (launcher 'deepspeed').")
    resume: bool = Field(True, description="Resume from the latest checkpoint of an unfinished run on the same output.")
    peak_tflops: float | None = Field(
        None,
        gt=0,
        description="Peak dense TFLOP/s of one device for the `mfu` metric; empty: known GPUs (H100/H200, A100, "
        "L40S, ...) are looked up by name, and no MFU is logged on other devices.",
    )


# How a run is carried out, not what it learns: left out of artifact hashes, so that e.g. a run
# resumed with another logging cadence or launcher still finds its outputs.
RUN_ONLY_FIELDS = {
    "log_every", "eval_every", "save_every", "device", "threads", "launcher", "hostfile", "resume", "peak_tflops",
    "teacher_sharding",
}


class DistillConfig(TrainConfig):
    loss: LossConfig = Field(default_factory=LossConfig, description="Distillation loss (see docs/losses.md).")
    on_policy: OnPolicyConfig = Field(
        default_factory=OnPolicyConfig,
        description="On-policy distillation (GKD): a fraction of batches sampled from the student and scored by "
        "the teacher (see docs/teacher_signal.md).",
    )
    cross_tokenizer: CrossTokenizerConfig = Field(
        default_factory=CrossTokenizerConfig,
        description="A teacher with another tokenizer: 'none' refuses it, 'sequence' or 'uld' distil across "
        "(see docs/teacher_signal.md).",
    )
    extra_teachers: list[TeacherSpec] = Field(
        default_factory=list,
        description="More frozen online teachers beside `teacher` (which also generates), each sharing the "
        "student's tokenizer; their signals are mixed per token with distill.loss.teacher_weights (main teacher "
        "first). See docs/losses.md.",
    )

    teacher_sharding: Literal["none", "zero3"] = Field(
        "none",
        description="'zero3': partition the frozen teacher across the worker processes with ZeRO-3 inference "
        "(no optimizer state) for a teacher too large for one device; needs `deepspeed`. 'none': every "
        "process holds the whole teacher.",
    )

    @model_validator(mode="after")
    def _teacher_sharding_needs_deepspeed(self) -> DistillConfig:
        if self.teacher_sharding == "zero3" and self.deepspeed is None:
            raise ValueError(
                "teacher_sharding: zero3 partitions the teacher with DeepSpeed, so it needs `deepspeed` "
                "(e.g. deploy/deepspeed/zero3.json) and launcher torchrun or deepspeed"
            )
        hidden = self.loss.hidden
        if self.teacher_sharding == "zero3" and hidden is not None and hidden.teacher_filter_steps > 0:
            raise ValueError(
                "loss.hidden.teacher_filter_steps > 0 (TED stage 1) runs the teacher's own final norm and head "
                "outside its forward pass, which teacher_sharding: zero3 keeps partitioned; train the filters "
                "with teacher_sharding: none, or set teacher_filter_steps: 0"
            )
        return self

    @model_validator(mode="after")
    def _on_policy_needs_one_tokenizer(self) -> DistillConfig:
        if self.on_policy.fraction > 0 and self.cross_tokenizer.method != "none":
            raise ValueError(
                f"on_policy.fraction > 0 needs the teacher to score the student's own token ids, so it cannot be "
                f"combined with cross_tokenizer.method={self.cross_tokenizer.method!r}; set one of them off"
            )
        return self

    @model_validator(mode="after")
    def _extra_teachers_fit(self) -> DistillConfig:
        if not self.extra_teachers:
            return self
        problems = [f"extra_teachers[{i}].uri is empty; give the teacher's model folder"
                    for i, t in enumerate(self.extra_teachers) if not t.uri]
        weights = self.loss.teacher_weights
        if weights is not None and len(weights) != 1 + len(self.extra_teachers):
            problems.append(
                f"loss.teacher_weights has {len(weights)} weights for {1 + len(self.extra_teachers)} online teachers "
                "(the main teacher, then extra_teachers)"
            )
        if self.cross_tokenizer.method != "none":
            problems.append(
                "extra_teachers share the student's tokenizer, so they need cross_tokenizer.method: none "
                f"(got {self.cross_tokenizer.method!r})"
            )
        if problems:
            raise ValueError("distill.extra_teachers: " + "; ".join(problems))
        return self

    @model_validator(mode="after")
    def _step_by_step_fits(self) -> DistillConfig:
        if self.loss.step_by_step is None:
            return self
        if self.cross_tokenizer.method == "uld":
            raise ValueError(
                "distill.loss.step_by_step builds new task-prefixed examples, which the ULD teacher (looked up per "
                "training record) does not cover; use cross_tokenizer.method none or sequence, or remove step_by_step"
            )
        if self.on_policy.fraction > 0:
            raise ValueError(
                "distill.loss.step_by_step and distill.on_policy.fraction > 0 are not supported together yet; "
                "set on_policy.fraction: 0 or remove step_by_step"
            )
        return self


# DistillConfig's sections that only stage 1 knows (a baseline run with stage 1's settings drops them)
DISTILL_ONLY_FIELDS = {"loss", "on_policy", "cross_tokenizer", "teacher_sharding", "extra_teachers"}


class FinetuneConfig(TrainConfig):
    steps: int = Field(100, gt=0, description="Optimizer steps.")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate (AdamW, warmup then cosine decay).")
    warmup_steps: int = Field(10, ge=0, description="Linear warmup steps.")
    enabled: bool = Field(True, description="Run stage 2 (fine-tune on the real task data).")


class JudgeConfig(_Section):
    """An OpenAI-compatible chat model that grades answers (the `judge` metric)."""

    base_url: str = Field(..., description="Base URL of the OpenAI-compatible API, e.g. http://127.0.0.1:8000/v1.")
    model: str = Field(..., description="Model name the judge requests ask for.")
    api_key_env: str = Field(
        "OPENAI_API_KEY", description="Environment variable holding the API key (never the key itself); unset: no key sent."
    )
    mode: Literal["reference", "pairwise"] = Field(
        "reference",
        description="'reference': grade each answer against the reference (1 correct / 0 not). 'pairwise': compare "
        "each model's answer with the teacher's, asked twice with the order swapped to cancel position bias "
        "(1 model better, 0.5 tie, 0 teacher better).",
    )
    timeout_s: float = Field(30.0, gt=0, description="Seconds per request.")
    max_retries: int = Field(2, ge=0, description="Retries on a 5xx or connection error (a 4xx is not retried).")
    cache_uri: str | None = Field(
        None, description="Where verdicts are cached (JSONL keyed by prompt, answers and judge). Empty: <work_dir>/judge-cache."
    )


class EvaluateConfig(_Section):
    metrics: list[str] = Field(
        default_factory=lambda: ["exact", "contains"],
        description="Answer metrics computed for every model: exact (normalised case/whitespace/trailing punctuation), "
        "contains (reference as a whole word/number in the answer), extract (see `extract`, then exact), rouge_l, chrf, "
        "judge (see `judge`). Perplexity, KL / top-1 agreement with the teacher, calibration and answer length are "
        "always reported.",
    )
    extract: str = Field(
        "last_number",
        description="For the extract metric: 'last_number', 'after_answer' (text after 'Answer:'), or a regular "
        "expression (group 1 if it has one, else the whole match).",
    )
    judge: JudgeConfig | None = Field(None, description="The grading model for the judge metric.")
    max_new_tokens: int = Field(16, gt=0, description="Tokens generated per answer.")
    batch_size: int = Field(100, gt=0, description="Prompts per generation batch.")
    num_samples: int = Field(10, ge=0, description="Example generations logged per model.")
    baseline: bool = Field(
        True, description="Train a baseline student on the real data alone with the same step budget, for comparison."
    )

    @model_validator(mode="after")
    def _metrics_known(self) -> EvaluateConfig:
        import re

        from mydistill.metrics import EXTRACT_PRESETS, METRIC_NAMES

        unknown = [m for m in self.metrics if m not in METRIC_NAMES]
        if unknown:
            raise ValueError(f"metrics: unknown {unknown}; expected some of {', '.join(METRIC_NAMES)}")
        if not self.metrics:
            raise ValueError("metrics: give at least one, e.g. [exact, contains]")
        if len(set(self.metrics)) != len(self.metrics):
            raise ValueError(f"metrics: {self.metrics} names a metric twice")
        if self.extract not in EXTRACT_PRESETS:
            try:
                re.compile(self.extract)
            except re.error as e:
                raise ValueError(
                    f"extract: {self.extract!r} is neither {' nor '.join(EXTRACT_PRESETS)} nor a valid regular expression ({e})"
                ) from None
        if "judge" in self.metrics and self.judge is None:
            raise ValueError("metrics: judge needs the `judge` section (base_url, model) naming the grading model")
        return self


class RegisterConfig(_Section):
    enabled: bool = Field(True, description="Register the student in the MLflow model registry.")
    model_name: str = Field("mydistill-student", description="Registered model name.")
    alias: str = Field("champion", description="Alias moved to the new version when it passes the gate.")
    gate_metric: str = Field(
        "exact",
        description="The evaluate.metrics entry the quality gate and '% of teacher retained' use (e.g. contains for "
        "free-text answers).",
    )
    min_teacher_retained: float = Field(
        0.8, ge=0, le=1, description="Quality gate: the student must keep at least this fraction of the teacher's score."
    )
    beat_champion: bool = Field(
        True,
        description="Quality gate: the student must also score higher than the version the alias points to now "
        "(no such version yet: passes). Scores are gate_metric on the eval set, so keep one model name per eval set and metric.",
    )


class CostsConfig(_Section):
    """Prices that turn a run's measured device time and tokens into money (each optional)."""

    gpu_hour: float | None = Field(None, ge=0, description="Price of one GPU-hour (training and local teacher stages on GPUs).")
    cpu_hour: float | None = Field(None, ge=0, description="Price of one CPU worker process-hour.")
    api_prompt_per_1k_tokens: float | None = Field(None, ge=0, description="API teacher: price per 1,000 prompt tokens.")
    api_completion_per_1k_tokens: float | None = Field(
        None, ge=0, description="API teacher: price per 1,000 completion tokens."
    )
    currency: str = Field("USD", description="What the prices are in (shown beside the total).")


class TrackingConfig(_Section):
    experiment: str = Field("mydistill", description="MLflow experiment name.")
    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI. Empty: $MLFLOW_TRACKING_URI, else the project-local sqlite store."
    )
    artifact_location: str | None = Field(
        None,
        description="Root for the artifacts of experiments mydistill creates (a folder, s3://…). Empty: beside a "
        "sqlite store, else where the tracking server puts them. Experiments that exist keep theirs.",
    )

    @field_validator("tracking_uri")
    @classmethod
    def _warn_on_credentials(cls, v: str | None) -> str | None:
        warn_if_credentials(v, "tracking.tracking_uri")
        return v

    @field_serializer("tracking_uri")
    def _tracking_uri_without_credentials(self, v: str | None) -> str | None:
        return mask_url(v)


class PipelineConfig(_Section):
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
                if isinstance(layers, int):
                    try:
                        init.chosen_layers(layers)
                    except ValueError as e:
                        raise ValueError(f"{e} ({config})") from None
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
