"""Everything the teacher side gives for one training batch, as one type: what the objective takes.

The teacher's distribution (a :class:`~mydistill.losses.teacher_signal.TeacherSignal`), the main
teacher's per-layer hidden states (layer-wise distillation) and, for a teacher with another
tokenizer, the ULD part. Every source of it (online teachers, stores, ULD, none) answers one call:
``source.signal(batch, indices, hidden_states=...)`` (see :mod:`mydistill.training.teachers`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from mydistill.losses.teacher_signal import TeacherSignal


@dataclass(frozen=True)
class ULDSignal:
    """A teacher with another tokenizer, for ULD (:func:`mydistill.losses.uld.uld_loss`).

    Attributes:
        logits: ``(N, V_t)`` the teacher's logits at the N response positions aligned with the student's.
        student_rows: ``(N,)`` int64, those positions in the student's flattened ``(B * T)`` rows.
    """

    logits: Tensor
    student_rows: Tensor


SignalOrigin = str  # "none", "online", "store" or "uld": where a BatchSignal came from


@dataclass(frozen=True)
class BatchSignal:
    """Everything the teacher side gives for one training batch; what the objective takes.

    Attributes:
        teacher: the teacher's distribution aligned with the student's positions: any
            :class:`TeacherSignal` (one online teacher is a :class:`HiddenHead`, several a
            :class:`TeacherEnsemble`, a store a :class:`TopKTeacher`); None for no logit teacher.
        hidden_states: the main teacher's per-layer hidden states, ``L_t + 1`` tensors ``(B, T, H_t)``
            (``output_hidden_states``), for layer-wise distillation; None when not asked for.
        uld: the cross-tokenizer teacher's logits at aligned positions (ULD), instead of ``teacher``.
        origin: ``online`` (teacher models run on the batch), ``store`` (top-k read from a store by
            example index), ``uld``, or ``none``. Signals looked up by example index exist only for
            the training records themselves, so a batch of other rows (distilling step-by-step's
            task-prefixed rows) can use only an online signal.
    """

    teacher: TeacherSignal | None = None
    hidden_states: Sequence[Tensor] | None = None
    uld: ULDSignal | None = None
    origin: SignalOrigin = "none"

    def rows(self, index: slice) -> BatchSignal:
        """The signal of a subset of the batch's examples (rows of the ``(B, T, ...)`` tensors), as
        :meth:`TeacherSignal.rows` gives it for the teacher; only for online signals (see ``origin``)."""
        if self.origin not in ("online", "none"):
            raise ValueError(f"a {self.origin} teacher signal is looked up by example and cannot be split by rows")
        return BatchSignal(
            teacher=None if self.teacher is None else self.teacher.rows(index),
            hidden_states=None if self.hidden_states is None else [h[index] for h in self.hidden_states],
            origin=self.origin,
        )
