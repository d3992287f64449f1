"""Distilling step-by-step in the distill stage (Hsieh et al. 2023, arXiv 2305.02301, §3.2).

Every training record gives a *label* task, ``label_prefix + prompt -> answer``; a record with a
teacher rationale (the generate stage's rationale mode) also gives a *rationale* task,
``rationale_prefix + prompt -> rationale``. Real records have no rationale and give the label task
alone (their answer is the gold one); a teacher record's label is the teacher's parsed answer.

Each training step takes one batch of label examples and one of rationale examples (own seeded
order) and runs them as one batch through the student and the teacher, so that data parallel and
ZeRO-3 see a single forward and backward per step. :class:`StepByStepObjective` splits the rows
again and calls the objective once per task (KD + CE each, as configured), then combines the two
with ``DistillObjective.combine_step_by_step``: ``label_weight * L_label + rationale_weight *
L_rationale``, with per-task metrics ``label/...`` and ``rationale/...``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from mydistill.mix import has_rationale
from mydistill.io import DataError
from mydistill.losses import BatchSignal, LossOutput, StepByStepConfig
from mydistill.tokenization import TokenizedExample, collate, tokenize_example, with_prefix

# Batch key: the number of leading rows that belong to the label task (the rest are rationale rows).
LABEL_ROWS = "label_rows"



@dataclass
class StepByStepExamples:
    """The two tasks' tokenized examples; ``label[i]`` comes from training record ``i``."""

    label: list[TokenizedExample]
    rationale: list[TokenizedExample]
    rationale_order: Iterator[list[int]] | None = field(default=None, repr=False)

    def collate(self, label_rows: Sequence[TokenizedExample], pad_token_id: int) -> dict[str, Tensor]:
        """One batch of ``label_rows`` followed by the next rationale batch, plus :data:`LABEL_ROWS`."""
        if self.rationale_order is None:
            raise RuntimeError("set rationale_order (the rationale examples' batch order) before collating")
        rationale_rows = [self.rationale[i] for i in next(self.rationale_order)]
        batch = collate([*label_rows, *rationale_rows], pad_token_id)
        batch[LABEL_ROWS] = torch.tensor(len(label_rows))
        return batch


def step_by_step_examples(
    records: Sequence[dict[str, Any]], tokenizer: Any, max_length: int, cfg: StepByStepConfig, source_uri: str
) -> StepByStepExamples:
    """Tokenize the label task of every record and the rationale task of every record with a rationale.

    ``records`` are training records with ``prompt`` and ``response`` (as
    :func:`mydistill.training.batches.read_training_records` returns them). Raises
    :class:`~mydistill.io.DataError` naming ``source_uri`` when no record has a rationale.
    """
    label, rationale = [], []
    for r in records:
        answer = r.get("answer") if has_rationale(r) else None
        target = answer if isinstance(answer, str) and answer.strip() else r["response"]
        label.append(tokenize_example(tokenizer, with_prefix(cfg.label_prefix, r["prompt"]), target, max_length))
        if has_rationale(r):
            prompt = with_prefix(cfg.rationale_prefix, r["prompt"])
            rationale.append(tokenize_example(tokenizer, prompt, r["rationale"], max_length))
    if not rationale:
        raise DataError(
            f"{source_uri}: distill.loss.step_by_step is set but none of its {len(label)} training records has a "
            "'rationale'. Turn on the generate stage's rationale mode (generate.rationale: true) so that the "
            "teacher's records carry rationales (a new generate and mix output is made), or remove "
            "distill.loss.step_by_step"
        )
    return StepByStepExamples(label=label, rationale=rationale)


def _rows(value: Any, rows: slice) -> Any:
    if value is None:
        return None
    if isinstance(value, Tensor):
        return value[rows]
    return [_rows(v, rows) for v in value]  # per-layer hidden states


class StepByStepObjective(nn.Module):
    """Wraps the trainer's objective: one call on a label + rationale batch, one objective pass per task.

    Called with ``label_rows`` (from the batch's :data:`LABEL_ROWS`) the first ``label_rows`` rows
    are the label task and the rest the rationale task; without it the batch is one plain pass.
    """

    def __init__(self, objective: nn.Module):
        super().__init__()
        self.objective = objective

    @property
    def cfg(self) -> Any:
        return self.objective.cfg

    def forward(
        self,
        *,
        student_hidden: Tensor,
        student_head_weight: Tensor,
        labels: Tensor | None,
        signal: BatchSignal | None = None,
        attention_mask: Tensor | None = None,
        student_hidden_states: Any = None,
        label_rows: int | Tensor | None = None,
        **shared: Any,
    ) -> LossOutput:
        signal = signal or BatchSignal()
        per_row = dict(student_hidden=student_hidden, labels=labels, attention_mask=attention_mask, student_hidden_states=student_hidden_states)
        if label_rows is None:
            return self.objective(student_head_weight=student_head_weight, signal=signal, **per_row, **shared)
        if signal.origin not in ("online", "none"):
            raise ValueError(
                f"distilling step-by-step needs the online teacher (or none), not a {signal.origin} teacher signal: "
                "its task-prefixed examples are not in a teacher-signal store"
            )
        n = int(label_rows)
        parts = []
        for rows in (slice(0, n), slice(n, None)):
            sliced = {k: _rows(v, rows) for k, v in per_row.items()}
            parts.append(self.objective(student_head_weight=student_head_weight, signal=signal.rows(rows), **sliced, **shared))
        return self.objective.combine_step_by_step(*parts)


__all__ = ["LABEL_ROWS", "StepByStepExamples", "StepByStepObjective", "step_by_step_examples"]
