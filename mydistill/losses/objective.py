"""The training objective the trainer calls: config in, one module, one scalar loss plus metrics out.

::

    objective = DistillObjective(cfg.loss, student_hidden_size=H_s, student_num_layers=L_s,
                                 teacher_hidden_size=H_t, teacher_num_layers=L_t)
    optimizer = AdamW([*student.parameters(), *objective.parameters()])  # projections are learned
    out = objective(student_hidden=h[:, :-1], student_head_weight=student.lm_head.weight,
                    labels=input_ids[:, 1:], teacher=DenseLogits(t_logits[:, :-1]))
    # or, from the trainer: objective(..., signal=BatchSignal(teacher=..., hidden_states=...))
    out.loss.backward(); log(out.metrics)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mydistill.config.losses import LossConfig
from mydistill.losses.chunked import chunked_distill_loss
from mydistill.losses.divergences import distill_loss
from mydistill.losses.hidden import HiddenStateDistiller
from mydistill.losses.batch_signal import BatchSignal
from mydistill.losses.teacher_signal import TeacherSignal, as_signal
from mydistill.losses.table import DistillMix


class LossOutput(NamedTuple):
    """A scalar loss to backpropagate and plain-float metrics to log (``kd``, ``ce``, ``hidden``, ...).

    A named tuple, not a dataclass: ZeRO-3 hooks a module's outputs by walking tuples, lists and
    dicts, and would not see the loss inside a dataclass (DeepSpeed warned "unknown inputs or outputs
    type": its backward hooks for the objective's module may then not run)."""

    loss: Tensor
    metrics: dict[str, float]


class DistillObjective(nn.Module):
    """Hinton soft/hard mix with any divergence, optional hidden-state term, chunked or plain.

    Owns the hidden-state projections / TED filters (``self.hidden``), so add ``objective.parameters()``
    to the optimizer. Without a teacher signal it returns the cross-entropy alone (stage-2 SFT).

    Args:
        cfg: the validated :class:`LossConfig`.
        student_hidden_size, student_num_layers: the student's width and block count.
        teacher_hidden_size, teacher_num_layers: the teacher's (needed only for ``cfg.hidden``).
        teacher_layers: the teacher blocks a student cut from the teacher kept (for ``layer_map: kept``).
    """

    def __init__(
        self,
        cfg: LossConfig,
        *,
        student_hidden_size: int,
        student_num_layers: int,
        teacher_hidden_size: int | None = None,
        teacher_num_layers: int | None = None,
        teacher_layers: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.hidden: HiddenStateDistiller | None = None
        if cfg.hidden is not None:
            if teacher_hidden_size is None or teacher_num_layers is None:
                raise ValueError(
                    "distill.loss.hidden (hidden-state distillation) needs teacher_hidden_size and teacher_num_layers"
                )
            self.hidden = HiddenStateDistiller(
                student_hidden_size=student_hidden_size,
                teacher_hidden_size=teacher_hidden_size,
                student_num_layers=student_num_layers,
                teacher_num_layers=teacher_num_layers,
                layer_map=cfg.hidden.layer_map,
                loss=cfg.hidden.loss,
                projection=cfg.hidden.projection,
                filter_size=cfg.hidden.filter_size,
                teacher_layers=teacher_layers,
            )

    def forward(
        self,
        *,
        student_hidden: Tensor,
        student_head_weight: Tensor,
        labels: Tensor | None,
        signal: BatchSignal | None = None,
        teacher: TeacherSignal | Tensor | Sequence[Tensor] | None = None,
        student_hidden_states: Sequence[Tensor] | None = None,
        attention_mask: Tensor | None = None,
        student_head_bias: Tensor | None = None,
    ) -> LossOutput:
        """Compute the loss for one batch.

        Args:
            student_hidden: ``(B, T, H)`` or ``(N, H)`` final hidden states; position i predicts ``labels[..., i]``
                (the caller has already shifted).
            student_head_weight: ``(V, H)`` the student's output projection; ``student_head_bias`` ``(V,)``.
            labels: ``(B, T)`` or ``(N,)``; ``cfg.ignore_index`` marks tokens to skip in every logit term.
                None is allowed only for pure KD (``alpha = 1``); ``attention_mask`` then marks valid tokens.
            signal: everything the teacher side gives for this batch (:class:`BatchSignal`): its
                distribution aligned with ``student_hidden`` and, for ``cfg.hidden``, its per-layer states.
            teacher: a shorthand for ``signal=BatchSignal(teacher=...)``: any :class:`TeacherSignal`,
                or a logits tensor ``(B, T, V)`` (a list of them: equal-weight ensemble).
            student_hidden_states: the student's per-layer states (``output_hidden_states``), needed
                when ``cfg.hidden`` is set and a teacher is given.
            attention_mask: ``(B, T)`` positions that count for the hidden-state term.
        """
        cfg = self.cfg
        if teacher is not None:
            if signal is not None:
                raise ValueError("give the teacher either as signal= or as teacher=, not both")
            signal = BatchSignal(teacher=as_signal(teacher), origin="online")
        signal = signal or BatchSignal()
        teacher = signal.teacher
        has_teacher = teacher is not None
        mask = attention_mask if labels is None else None
        mix = DistillMix.from_config(cfg)
        if cfg.chunked:
            parts = chunked_distill_loss(
                student_hidden,
                student_head_weight,
                teacher,
                labels=labels,
                mask=mask,
                mix=mix,
                student_bias=student_head_bias,
                chunk_size=cfg.chunk_size,
                compute_agreement=has_teacher,
            )
        else:
            student_logits = F.linear(student_hidden, student_head_weight, student_head_bias)
            parts = distill_loss(
                student_logits, teacher, labels=labels, mask=mask, mix=mix, compute_agreement=has_teacher
            )

        loss = parts.loss
        named: dict[str, Tensor] = {"kd": parts.kd, "ce": parts.ce, "tokens": parts.num_tokens.float()}
        if parts.teacher_agreement is not None:
            named["teacher_agreement"] = parts.teacher_agreement
        if self.hidden is not None and has_teacher and cfg.hidden is not None:
            if student_hidden_states is None or signal.hidden_states is None:
                raise ValueError(
                    "distill.loss.hidden is set, so the objective needs student_hidden_states and the teacher's "
                    "(signal.hidden_states; run both models with output_hidden_states=True), or remove the hidden "
                    "section"
                )
            hidden_loss = self.hidden(student_hidden_states, signal.hidden_states, attention_mask)
            loss = loss + cfg.hidden.weight * hidden_loss
            named["hidden"] = hidden_loss.detach()
        named["loss"] = loss.detach()
        values = torch.stack([v.float().reshape(()) for v in named.values()]).tolist()  # one device sync
        return LossOutput(loss=loss, metrics=dict(zip(named, values, strict=True)))

    def combine_step_by_step(self, label: LossOutput, rationale: LossOutput) -> LossOutput:
        """Distilling step-by-step: weight the label-task pass and the rationale-task pass.

        ``loss = label_weight * label.loss + rationale_weight * rationale.loss`` (arXiv 2305.02301,
        ``L = L_label + λ L_rationale``); each pass is one call of this objective on its own batch.
        """
        if self.cfg.step_by_step is None:
            raise ValueError(
                "combine_step_by_step needs distill.loss.step_by_step (label_weight, rationale_weight) in the config"
            )
        w = self.cfg.step_by_step
        loss = w.label_weight * label.loss + w.rationale_weight * rationale.loss
        metrics = {f"label/{k}": v for k, v in label.metrics.items()}
        metrics.update({f"rationale/{k}": v for k, v in rationale.metrics.items()})
        metrics["loss"] = w.label_weight * label.metrics.get("loss", 0.0) + w.rationale_weight * rationale.metrics.get(
            "loss", 0.0
        )
        return LossOutput(loss=loss, metrics=metrics)
