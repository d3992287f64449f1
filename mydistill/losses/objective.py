"""The training objective the trainer calls: config in, one module, one scalar loss plus metrics out.

::

    objective = DistillObjective(cfg.loss, student_hidden_size=H_s, student_num_layers=L_s,
                                 teacher_hidden_size=H_t, teacher_num_layers=L_t)
    optimizer = AdamW([*student.parameters(), *objective.parameters()])  # projections are learned
    out = objective(student_hidden=h[:, :-1], student_head_weight=student.lm_head.weight,
                    labels=input_ids[:, 1:], teacher_logits=t_logits[:, :-1])
    out.loss.backward(); log(out.metrics)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mydistill.losses.chunked import chunked_distill_loss
from mydistill.config.losses import LossConfig
from mydistill.losses.divergences import DistillLossParts, distill_loss
from mydistill.losses.hidden import HiddenStateDistiller
from mydistill.losses.teacher import TopKTeacher


@dataclass
class LossOutput:
    """A scalar loss to backpropagate and plain-float metrics to log (``kd``, ``ce``, ``hidden``, ...)."""

    loss: Tensor
    metrics: dict[str, float] = field(default_factory=dict)


def _list(x: Tensor | Sequence[Tensor] | None) -> list[Tensor]:
    if x is None:
        return []
    return [x] if isinstance(x, Tensor) else list(x)


def _drop_unweighted(
    weights: Sequence[float] | None, *per_teacher: Tensor | Sequence[Tensor | None] | None
) -> tuple[list[float] | None, list[Tensor | Sequence[Tensor | None] | None]]:
    """Leave out the teachers whose weight is 0 (``teacher_weights: [1, 0]`` is the first teacher alone).

    ``per_teacher`` are the per-teacher arguments (logits, hidden states, heads, biases), each None,
    one tensor, or a list with one entry per weight. Returns the positive weights and the arguments
    with the same teachers kept, so a zero-weight teacher costs no vocabulary-sized work.
    """
    if weights is None or all(w > 0 for w in weights):
        return (None if weights is None else list(weights)), list(per_teacher)
    keep = [i for i, w in enumerate(weights) if w > 0]
    kept: list[Tensor | Sequence[Tensor | None] | None] = []
    for arg in per_teacher:
        if arg is None:
            kept.append(None)
            continue
        if isinstance(arg, Tensor) or len(arg) != len(weights):
            n = 1 if isinstance(arg, Tensor) else len(arg)
            raise ValueError(f"got {len(weights)} teacher weights (some 0) for {n} teacher signals; give one per teacher")
        kept.append([arg[i] for i in keep])
    return [weights[i] for i in keep], kept


class DistillObjective(nn.Module):
    """Hinton soft/hard mix with any divergence, optional hidden-state term, chunked or plain.

    Owns the hidden-state projections / TED filters (``self.hidden``), so add ``objective.parameters()``
    to the optimizer. Without a teacher signal it returns the cross-entropy alone (stage-2 SFT).

    Args:
        cfg: the validated :class:`LossConfig`.
        student_hidden_size, student_num_layers: the student's width and block count.
        teacher_hidden_size, teacher_num_layers: the teacher's (needed only for ``cfg.hidden``).
    """

    def __init__(
        self,
        cfg: LossConfig,
        *,
        student_hidden_size: int,
        student_num_layers: int,
        teacher_hidden_size: int | None = None,
        teacher_num_layers: int | None = None,
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
            )

    def forward(
        self,
        *,
        student_hidden: Tensor,
        student_head_weight: Tensor,
        labels: Tensor | None,
        teacher_logits: Tensor | Sequence[Tensor] | None = None,
        teacher_hidden: Tensor | Sequence[Tensor] | None = None,
        teacher_head_weight: Tensor | Sequence[Tensor] | None = None,
        teacher_topk: TopKTeacher | None = None,
        student_hidden_states: Sequence[Tensor] | None = None,
        teacher_hidden_states: Sequence[Tensor] | None = None,
        attention_mask: Tensor | None = None,
        student_head_bias: Tensor | None = None,
        teacher_head_bias: Tensor | Sequence[Tensor | None] | None = None,
    ) -> LossOutput:
        """Compute the loss for one batch.

        Args:
            student_hidden: ``(B, T, H)`` or ``(N, H)`` final hidden states; position i predicts ``labels[..., i]``
                (the caller has already shifted).
            student_head_weight: ``(V, H)`` the student's output projection; ``student_head_bias`` ``(V,)``.
            labels: ``(B, T)`` or ``(N,)``; ``cfg.ignore_index`` marks tokens to skip in every logit term.
                None is allowed only for pure KD (``alpha = 1``); ``attention_mask`` then marks valid tokens.
            teacher_logits: ``(B, T, V)`` aligned with ``student_hidden`` (a list for several teachers).
            teacher_hidden, teacher_head_weight, teacher_head_bias: the teacher's final hidden states
                ``(B, T, H_t)`` and head ``(V, H_t)`` instead of its logits (lists for several teachers).
            teacher_topk: a cached sparse teacher, ``(B, T, k)`` ids and log-probs.
            student_hidden_states, teacher_hidden_states: per-layer states (``output_hidden_states``),
                needed when ``cfg.hidden`` is set and a teacher is given.
            attention_mask: ``(B, T)`` positions that count for the hidden-state term.
        """
        cfg = self.cfg
        has_teacher = teacher_logits is not None or teacher_hidden is not None or teacher_topk is not None
        mask = attention_mask if labels is None else None
        teacher_weights = cfg.teacher_weights
        if teacher_topk is None:  # a store's top-k teacher arrives already combined
            teacher_weights, (teacher_logits, teacher_hidden, teacher_head_weight, teacher_head_bias) = _drop_unweighted(
                teacher_weights, teacher_logits, teacher_hidden, teacher_head_weight, teacher_head_bias
            )
        if cfg.chunked:
            parts = chunked_distill_loss(
                student_hidden,
                student_head_weight,
                student_head_bias,
                labels=labels,
                mask=mask,
                teacher_logits=teacher_logits,
                teacher_hidden=teacher_hidden,
                teacher_weight=teacher_head_weight,
                teacher_bias=teacher_head_bias,
                teacher_topk=teacher_topk,
                teacher_weights=teacher_weights,
                divergence=cfg.divergence,
                temperature=cfg.temperature,
                alpha=cfg.alpha,
                beta=cfg.beta,
                skew_alpha=cfg.skew_alpha,
                ignore_index=cfg.ignore_index,
                chunk_size=cfg.chunk_size,
                compute_agreement=has_teacher,
            )
        else:
            parts = self._plain(
                student_hidden,
                student_head_weight,
                student_head_bias,
                labels,
                mask,
                teacher_logits,
                teacher_hidden,
                teacher_head_weight,
                teacher_head_bias,
                teacher_topk,
                teacher_weights,
            )

        loss = parts.loss
        named: dict[str, Tensor] = {"kd": parts.kd, "ce": parts.ce, "tokens": parts.num_tokens.float()}
        if parts.teacher_agreement is not None:
            named["teacher_agreement"] = parts.teacher_agreement
        if self.hidden is not None and has_teacher and cfg.hidden is not None:
            if student_hidden_states is None or teacher_hidden_states is None:
                raise ValueError(
                    "distill.loss.hidden is set, so the objective needs student_hidden_states and "
                    "teacher_hidden_states (run both models with output_hidden_states=True), or remove the hidden "
                    "section"
                )
            hidden_loss = self.hidden(student_hidden_states, teacher_hidden_states, attention_mask)
            loss = loss + cfg.hidden.weight * hidden_loss
            named["hidden"] = hidden_loss.detach()
        named["loss"] = loss.detach()
        values = torch.stack([v.float().reshape(()) for v in named.values()]).tolist()  # one device sync
        return LossOutput(loss=loss, metrics=dict(zip(named, values, strict=True)))

    def _plain(
        self,
        student_hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        labels: Tensor | None,
        mask: Tensor | None,
        teacher_logits: Tensor | Sequence[Tensor] | None,
        teacher_hidden: Tensor | Sequence[Tensor] | None,
        teacher_weight: Tensor | Sequence[Tensor] | None,
        teacher_bias: Tensor | Sequence[Tensor | None] | None,
        teacher_topk: TopKTeacher | None,
        teacher_weights: Sequence[float] | None,
    ) -> DistillLossParts:
        cfg = self.cfg
        student_logits = F.linear(student_hidden, weight, bias)
        teacher: Tensor | list[Tensor] | TopKTeacher | None
        if teacher_hidden is not None:
            hiddens, heads = _list(teacher_hidden), _list(teacher_weight)
            if len(heads) != len(hiddens):
                raise ValueError(
                    f"got {len(hiddens)} teacher hidden-state tensors but {len(heads)} teacher head weights"
                )
            biases = [None] * len(hiddens) if teacher_bias is None else _list(teacher_bias)  # type: ignore[arg-type]
            with torch.no_grad():
                teacher = [F.linear(h, w, b) for h, w, b in zip(hiddens, heads, biases, strict=True)]
        elif teacher_topk is not None:
            teacher = teacher_topk
        elif teacher_logits is not None:
            teacher = _list(teacher_logits)
        else:
            teacher = None
        if isinstance(teacher, list) and len(teacher) == 1:
            teacher = teacher[0]
        return distill_loss(
            student_logits,
            teacher,
            labels=labels,
            mask=mask,
            divergence=cfg.divergence,
            temperature=cfg.temperature,
            alpha=cfg.alpha,
            beta=cfg.beta,
            skew_alpha=cfg.skew_alpha,
            ignore_index=cfg.ignore_index,
            teacher_weights=teacher_weights if isinstance(teacher, list) else None,
            compute_agreement=teacher is not None,
        )

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
