"""Distillation losses: the divergence family, the chunked fused path, hidden states, the objective.

The teacher's signal is one type (:mod:`.teacher_signal`: dense logits, hidden states + head, top-k, an
ensemble), and everything a teacher gives for one batch another (:mod:`.batch_signal`, what the objective takes); each divergence is written once, in one table (:mod:`.table`), which drives the plain
reference functions on ``(N, V)`` logits (:mod:`.divergences`) and the memory-efficient path from
hidden states (:mod:`.chunked`); layer-wise
distillation in :mod:`.hidden` (TED's stage 1, training the teacher filters, in :mod:`.ted`); the
config section and the trainer-facing module in :mod:`.config` and :mod:`.objective`; the cross-tokenizer ULD loss in :mod:`.uld`. See docs/losses.md.
"""

from mydistill.config.losses import HiddenStateLossConfig, LossConfig, StepByStepConfig
from mydistill.losses.chunked import (
    FusedLinearDistillFunction,
    auto_chunk_size,
    chunked_cross_entropy,
    chunked_distill_loss,
    chunked_divergence,
)
from mydistill.losses.divergences import (
    DIVERGENCE_NAMES,
    DIVERGENCES,
    DistillLossParts,
    cross_entropy,
    distill_loss,
    forward_kl,
    generalized_jsd,
    logit_mse,
    reverse_kl,
    skew_kl,
    skew_reverse_kl,
    symmetric_kl,
    tvd,
)
from mydistill.losses.hidden import (
    HiddenStateDistiller,
    hidden_cosine,
    hidden_mse,
    kept_layer_map,
    resolve_layer_map,
    uniform_layer_map,
)
from mydistill.losses.multitask import step_by_step_loss
from mydistill.losses.objective import DistillObjective, LossOutput
from mydistill.losses.ted import TeacherFilterFit, filter_task_loss, fit_teacher_filters
from mydistill.losses.batch_signal import BatchSignal, ULDSignal
from mydistill.losses.teacher_signal import (
    DenseLogits,
    HiddenHead,
    TeacherEnsemble,
    TeacherSignal,
    TopKTeacher,
    VocabSizeMismatch,
    teacher_from_parts,
)
from mydistill.losses.table import DIVERGENCE_TABLE, Divergence, DistillMix
from mydistill.losses.uld import uld_loss

__all__ = [
    "BatchSignal",
    "ULDSignal",
    "DIVERGENCES",
    "DIVERGENCE_NAMES",
    "DIVERGENCE_TABLE",
    "DenseLogits",
    "Divergence",
    "DistillMix",
    "HiddenHead",
    "TeacherSignal",
    "auto_chunk_size",
    "teacher_from_parts",
    "DistillLossParts",
    "DistillObjective",
    "FusedLinearDistillFunction",
    "HiddenStateDistiller",
    "HiddenStateLossConfig",
    "LossConfig",
    "LossOutput",
    "StepByStepConfig",
    "TeacherEnsemble",
    "TeacherFilterFit",
    "TopKTeacher",
    "VocabSizeMismatch",
    "chunked_cross_entropy",
    "chunked_distill_loss",
    "chunked_divergence",
    "cross_entropy",
    "distill_loss",
    "filter_task_loss",
    "fit_teacher_filters",
    "forward_kl",
    "generalized_jsd",
    "hidden_cosine",
    "hidden_mse",
    "kept_layer_map",
    "logit_mse",
    "resolve_layer_map",
    "reverse_kl",
    "skew_kl",
    "skew_reverse_kl",
    "step_by_step_loss",
    "symmetric_kl",
    "tvd",
    "uld_loss",
    "uniform_layer_map",
]
