"""The trained module (student + the objective's learned parts) and one step's loss."""

from __future__ import annotations

from typing import Any

import torch

from mydistill.losses import BatchSignal, DistillObjective, LossOutput
from mydistill.tokenization import shift_labels
from mydistill.training.step_by_step import LABEL_ROWS
from mydistill.training.teachers import SignalSource


class StudentObjective(torch.nn.Module):
    """The student and the objective's learned parts as one module, so one engine wraps both.

    The forward never materialises full-vocabulary logits: the objective projects the final
    hidden states chunk by chunk (full (B, T, V) logits dominate peak memory at real vocabulary
    sizes). Under ZeRO-3 the output projection is used outside its own module's forward, so it
    is registered as an external parameter of this module; the forward returns the loss as a
    plain tensor (with the metrics beside it) so that ZeRO-3 hooks it and gathers that parameter
    again for the backward pass, where the fused loss hands over its gradient.
    """

    def __init__(self, student: Any, objective: DistillObjective):
        super().__init__()
        self.student = student
        self.objective = objective
        # layer-wise distillation (distill.loss.hidden) needs every layer's hidden states
        self.wants_hidden_states = getattr(getattr(objective, "cfg", None), "hidden", None) is not None

    def forward(self, batch: dict[str, torch.Tensor], signal: BatchSignal) -> tuple[torch.Tensor, dict[str, float]]:
        student_out = self.student.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=self.wants_hidden_states
        )
        # distilling step-by-step: the objective splits the batch's label and rationale rows again
        tasks = {"label_rows": batch[LABEL_ROWS]} if LABEL_ROWS in batch else {}
        out = self.objective(
            student_hidden=student_out.last_hidden_state,
            student_head_weight=self.student.lm_head.weight,
            labels=shift_labels(batch["labels"]),
            attention_mask=batch["attention_mask"],
            signal=signal,
            student_hidden_states=student_out.hidden_states if self.wants_hidden_states else None,
            **tasks,
        )
        return out.loss, out.metrics


def forward_loss(engine: Any, batch: dict[str, torch.Tensor], source: SignalSource, indices: list[int] | None = None) -> LossOutput:
    """Loss for one batch: the teacher's signal from ``source``, then the student and objective under the engine."""
    signal = source.signal(batch, indices, hidden_states=engine.module.wants_hidden_states)
    loss, metrics = engine(batch, signal)
    return LossOutput(loss, metrics)
