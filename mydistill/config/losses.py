"""The loss section of the pipeline config (``distill.loss:`` in YAML), validated.

Example::

    distill:
      loss:
        divergence: skew_kl
        temperature: 2.0
        alpha: 0.9
        skew_alpha: 0.1
        hidden: {weight: 1.0, layer_map: uniform, loss: mse}
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mydistill.config.section import optional_fields_as_plain

Divergence = Literal[
    "forward_kl",
    "reverse_kl",
    "symmetric_kl",
    "generalized_jsd",
    "skew_kl",
    "skew_reverse_kl",
    "tvd",
    "logit_mse",
]

LayerIndex = Annotated[int, Field(ge=0)]


class HiddenStateLossConfig(BaseModel):
    """Layer-wise hidden-state distillation, added to the logit loss (needs the teacher's hidden states)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=optional_fields_as_plain)

    weight: float = Field(
        1.0, ge=0, allow_inf_nan=False, description="Weight of the hidden-state term added to the loss (>= 0)."
    )
    layer_map: Literal["uniform", "kept"] | list[tuple[LayerIndex, LayerIndex]] = Field(
        "uniform",
        description="'uniform' (student block i -> teacher block i*L_t//L_s), 'kept' (each block of a student cut "
        "from the teacher -> the teacher block it was copied from, also for student.init.layers: auto) or explicit "
        "[student_layer, teacher_layer] pairs; 0 is the embeddings.",
    )
    loss: Literal["mse", "cosine"] = Field(
        "mse", description="Per-layer loss: 'mse' (TinyBERT) or 'cosine' (1 - cos, DistilBERT)."
    )
    projection: Literal["auto", "linear", "none", "ted"] = Field(
        "auto",
        description="'auto': learned linear map only where widths differ; 'linear': always; "
        "'none': widths must match; 'ted': TED task-aware filters.",
    )
    filter_size: int | None = Field(
        None, gt=0, description="Width of the TED filter space (projection='ted'); default: the teacher's hidden size."
    )
    teacher_filter_steps: int = Field(
        0,
        ge=0,
        description="TED stage 1 (projection='ted'): AdamW steps training the teacher filters on next-token CE of "
        "the response tokens, the teacher frozen, before distillation starts; 0 keeps random orthogonal filters.",
    )
    teacher_filter_lr: float = Field(
        1e-3, gt=0, allow_inf_nan=False, description="Learning rate of TED stage 1 (constant, AdamW, no weight decay)."
    )

    @model_validator(mode="after")
    def _ted_fields_only_for_ted(self) -> HiddenStateLossConfig:
        if self.filter_size is not None and self.projection != "ted":
            raise ValueError(
                f"filter_size is only used with projection='ted' (projection is {self.projection!r}); "
                "remove filter_size or set projection: ted"
            )
        if self.teacher_filter_steps > 0 and self.projection != "ted":
            raise ValueError(
                f"teacher_filter_steps trains TED teacher filters, which only projection='ted' has (projection is "
                f"{self.projection!r}); set projection: ted or teacher_filter_steps: 0"
            )
        if isinstance(self.layer_map, list) and not self.layer_map:
            raise ValueError("layer_map is an empty list; give [student_layer, teacher_layer] pairs or 'uniform'")
        return self


class StepByStepConfig(BaseModel):
    """Distilling step-by-step (Hsieh et al. 2023, arXiv 2305.02301).

    ``L = label_weight * L_label + rationale_weight * L_rationale``.
    """

    model_config = ConfigDict(extra="forbid", json_schema_extra=optional_fields_as_plain)

    label_weight: float = Field(
        1.0, ge=0, allow_inf_nan=False, description="Weight of the loss on the label (answer) targets (>= 0)."
    )
    rationale_weight: float = Field(
        1.0,
        ge=0,
        allow_inf_nan=False,
        description="Weight of the loss on the rationale targets, the paper's lambda (>= 0).",
    )
    label_prefix: str = Field(
        "[label] ",
        description="Task prefix put before the prompt of the label task (predict the answer). The distilled "
        "student records it in its checkpoint, and fine-tuning and evaluation prompt it the same way; '' trains "
        "the label task on the plain prompt.",
    )
    rationale_prefix: str = Field(
        "[rationale] ",
        min_length=1,
        description="Task prefix put before the prompt of the rationale task (generate the teacher's rationale).",
    )

    @model_validator(mode="after")
    def _not_both_zero(self) -> StepByStepConfig:
        if self.label_weight == 0 and self.rationale_weight == 0:
            raise ValueError(
                "label_weight and rationale_weight are both 0, so nothing would be trained; make at least one positive"
            )
        if self.label_prefix == self.rationale_prefix:
            raise ValueError(
                f"label_prefix and rationale_prefix are both {self.label_prefix!r}, so the student cannot tell the "
                "two tasks apart; give them different prefixes"
            )
        return self


class LossConfig(BaseModel):
    """How the student is trained against the teacher: ``alpha * T² * D_T + (1 - alpha) * CE`` (+ extras)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=optional_fields_as_plain)

    divergence: Divergence = Field(
        "forward_kl",
        description="Soft-target divergence between teacher and student distributions (see docs/losses.md).",
    )
    temperature: float = Field(
        2.0,
        gt=0,
        allow_inf_nan=False,
        description="Softmax temperature T for the soft term (> 0); the soft term is scaled by T².",
    )
    alpha: float = Field(
        0.5,
        ge=0,
        le=1,
        allow_inf_nan=False,
        description="Weight of the soft (KD) term in [0, 1]; the hard-label CE gets 1 - alpha.",
    )
    beta: float = Field(
        0.5,
        ge=0,
        le=1,
        allow_inf_nan=False,
        description="generalized_jsd's beta in [0, 1]: 0 = forward KL, 1 = reverse KL.",
    )
    skew_alpha: float = Field(
        0.1,
        ge=0,
        le=1,
        allow_inf_nan=False,
        description="skew_kl / skew_reverse_kl mixing alpha in [0, 1] (DistiLLM uses 0.1).",
    )
    chunk_size: int | None = Field(
        1024,
        gt=0,
        description="Tokens per chunk in the fused loss; work memory is 4-6 x chunk_size x V x 4 bytes; null "
        "chooses it from the shapes (the work buffers about the size of the head).",
    )
    chunked: bool = Field(
        True,
        description="Use the chunked fused loss from hidden states; False uses the plain reference on full logits.",
    )
    ignore_index: int = Field(-100, description="Label value marking tokens that count for no loss term.")
    teacher_weights: list[Annotated[float, Field(ge=0, allow_inf_nan=False)]] | None = Field(
        None,
        min_length=1,
        description="Multi-teacher: one weight >= 0 per teacher (normalised; 0 leaves that teacher out), the main "
        "teacher first; null gives equal weights.",
    )
    hidden: HiddenStateLossConfig | None = Field(
        None, description="Optional layer-wise hidden-state distillation; null disables it."
    )
    step_by_step: StepByStepConfig | None = Field(
        None,
        description="Optional distilling step-by-step: train a label task and a rationale task (from the generate "
        "stage's rationale mode) with these weights and task prefixes; null disables it.",
    )

    @model_validator(mode="after")
    def _some_teacher_weighted(self) -> LossConfig:
        if self.teacher_weights is not None and not any(w > 0 for w in self.teacher_weights):
            raise ValueError(
                f"teacher_weights are all 0 ({self.teacher_weights}), so no teacher would be learned from; "
                "make at least one positive"
            )
        return self
