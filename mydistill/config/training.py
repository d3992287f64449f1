"""The training stages: what every stage shares, stage 1 (distill) and stage 2 (finetune)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from mydistill.config.cluster import KubeflowConfig
from mydistill.config.cross_tokenizer import CrossTokenizerConfig
from mydistill.config.losses import LossConfig
from mydistill.config.models import TeacherSpec
from mydistill.config.on_policy import OnPolicyConfig
from mydistill.config.section import Section


class TrainConfig(Section):
    steps: int = Field(300, gt=0, description="Optimizer steps.")
    batch_size: int = Field(64, gt=0, description="Sequences per step.")
    lr: float = Field(3e-3, gt=0, description="Peak learning rate (AdamW, warmup then cosine decay).")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final learning rate as a fraction of the peak.")
    warmup_steps: int = Field(30, ge=0, description="Linear warmup steps.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    freeze: list[str] = Field(
        default_factory=list,
        description="Student parameters left as they start, by name pattern (shell-style, e.g. 'model.embed_tokens.*' "
        "or '*.mlp.*'); a tied parameter is matched by any of its names. Empty: every parameter is trained.",
    )
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
    nodes: int = Field(
        1, ge=1,
        description="Machines the run spans (num_processes workers on each); above 1 every node runs the same "
        "command against the job on shared storage (see docs/operations.md, 'Several nodes by hand'). With "
        "engine kubeflow: the TrainJob's nodes (pods).",
    )
    deepspeed: str | None = Field(
        None, description="DeepSpeed config (e.g. deploy/deepspeed/zero3.json or zero3_offload.json); empty: no DeepSpeed."
    )
    hostfile: str | None = Field(
        None,
        description="DeepSpeed hostfile for multi-node runs (launcher 'deepspeed'); a relative path is taken from the "
        "launching process's working directory, else from the repository, and handed on as an absolute path.",
    )
    resume: bool = Field(True, description="Resume from the latest checkpoint of an unfinished run on the same output.")
    peak_tflops: float | None = Field(
        None,
        gt=0,
        description="Peak dense TFLOP/s of one device for the `mfu` metric; empty: known GPUs (H100/H200, A100, "
        "L40S, ...) are looked up by name, and no MFU is logged on other devices.",
    )
    engine: Literal["local", "kubeflow"] = Field(
        "local",
        description="'local': train on this machine (as `launcher` says); 'kubeflow': submit a Kubeflow Trainer "
        "TrainJob to a cluster (the `kubeflow` section), follow its logs and wait for it.",
    )
    kubeflow: KubeflowConfig = Field(
        default_factory=KubeflowConfig, description="The cluster job of `engine: kubeflow` (docs/operations.md)."
    )

    @model_validator(mode="before")
    @classmethod
    def _kubeflow_num_nodes_is_nodes(cls, data: Any) -> Any:
        """``kubeflow.num_nodes`` (the field's name until 2026-12) is the stage's ``nodes``: one count
        for nodes started by hand and for a TrainJob's pods."""
        if not isinstance(data, dict) or not isinstance(data.get("kubeflow"), dict) or "num_nodes" not in data["kubeflow"]:
            return data
        kubeflow = dict(data["kubeflow"])
        old = kubeflow.pop("num_nodes")
        if "nodes" in data and data["nodes"] != old:
            raise ValueError(
                f"kubeflow.num_nodes ({old}) and nodes ({data['nodes']}) disagree: `nodes` is the one node count "
                "(kubeflow.num_nodes is its older name); set only nodes"
            )
        return {**data, "kubeflow": kubeflow, "nodes": old}

    @model_validator(mode="after")
    def _freeze_patterns_are_names(self) -> TrainConfig:
        for i, pattern in enumerate(self.freeze):
            if not pattern.strip():
                raise ValueError(f"freeze[{i}] is empty; give a parameter name pattern such as 'model.embed_tokens.*'")
        return self

    @model_validator(mode="after")
    def _kubeflow_needs_an_image(self) -> TrainConfig:
        if self.engine == "kubeflow" and not self.kubeflow.image:
            raise ValueError("engine: kubeflow needs kubeflow.image, the container image every node runs (deploy/Dockerfile.gpu)")
        return self

    @model_validator(mode="after")
    def _nodes_need_a_launcher(self) -> TrainConfig:
        if self.nodes > 1 and self.launcher == "none" and self.engine != "kubeflow":  # a TrainJob's pods run torchrun
            raise ValueError(
                f"nodes: {self.nodes} starts a worker process on every node, so it needs launcher torchrun or "
                "deepspeed (got none)"
            )
        if self.nodes > 1 and self.launcher == "deepspeed" and not self.hostfile:
            raise ValueError(
                f"nodes: {self.nodes} with launcher deepspeed needs a hostfile listing the nodes (`host slots=N` lines, "
                "see deploy/hostfile.example), or launcher torchrun, which needs none"
            )
        return self


# How a run is carried out, not what it learns: left out of artifact hashes, so that e.g. a run
# resumed with another logging cadence or launcher still finds its outputs.
RUN_ONLY_FIELDS = {
    "log_every", "eval_every", "save_every", "device", "threads", "launcher", "hostfile", "resume", "peak_tflops",
    "teacher_sharding", "engine", "kubeflow",
    # the node count does change the global batch; run_training adds it to its inputs when it is not 1, so
    # that every hash made before the field existed stays as it was
    "nodes",
}


def learned_fields(cfg: TrainConfig, exclude: set[str] = frozenset()) -> dict[str, Any]:
    """What the stage learns from, for its artifact hash: the config without RUN_ONLY_FIELDS, and
    ``freeze`` only when set, so that every hash made before the field existed stays as it was."""
    fields = cfg.model_dump(exclude=RUN_ONLY_FIELDS | {"freeze"} | set(exclude))
    if cfg.freeze and "freeze" not in exclude:
        fields["freeze"] = list(cfg.freeze)
    return fields


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
