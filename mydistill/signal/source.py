"""Where the distill stage's teacher signal comes from, batch by batch: one object, one call.

:class:`TeacherSource` hides the choice the trainer should not have to spell out: the online
teacher (same tokenizer), one or several teacher-signal stores, or a teacher with another
tokenizer (ULD); sequence-level KD needs no signal at all. ``source.signal(batch, indices)``
returns the keyword arguments for the objective (``teacher_hidden``/``teacher_head_weight``,
``teacher_topk``, or ``uld_teacher_logits``/``uld_student_rows``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mydistill.tokenization import shift_labels


@dataclass
class TeacherSource:
    """The teacher side of every batch. At most one of ``store`` / ``uld`` is set; ``teacher`` is
    the online model (used when neither is, and by on-policy batches)."""

    teacher: Any = None
    store: Any = None  # mydistill.signal.teacher.StoreTeacher
    uld: Any = None  # mydistill.training.cross_tokenizer.ULDTeacher

    @property
    def kind(self) -> str:
        if self.store is not None:
            return "store"
        if self.uld is not None:
            return "uld"
        return "online" if self.teacher is not None else "none"

    def signal(self, batch: dict[str, Tensor], indices: Sequence[int] | None = None) -> dict[str, Any]:
        """Objective keyword arguments for ``batch``; ``indices`` are its rows' positions in the training
        records (needed by stores and ULD, which look the examples up)."""
        if self.store is not None or self.uld is not None:
            if indices is None:
                raise ValueError(f"a {self.kind} teacher signal needs the batch's example indices")
            if self.store is not None:
                return {"teacher_topk": self.store.batch_topk(list(indices), shift_labels(batch["labels"]))}
            return self.uld.signal(batch, list(indices))
        return online_signal(self.teacher, batch)


def online_signal(teacher: Any, batch: dict[str, Tensor], hidden_states: bool = False) -> dict[str, Any]:
    """The frozen online teacher's final hidden states and output projection for ``batch``
    (the objective computes its logits chunk by chunk, like the student's); with
    ``hidden_states`` also every layer's states, for layer-wise distillation."""
    if teacher is None:
        return {}
    with torch.no_grad():
        out = teacher.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=hidden_states)
    signal = {"teacher_hidden": out.last_hidden_state, "teacher_head_weight": teacher.lm_head.weight}
    if hidden_states:
        signal["teacher_hidden_states"] = out.hidden_states
    return signal
