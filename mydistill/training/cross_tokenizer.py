"""Teachers with another tokenizer: check that tokenizers agree, and distil across them when they do not.

Logit distillation compares two distributions token id by token id, so the check before any
training (:func:`check_tokenizers_agree`) asks more than "same vocabulary size": the same ids must
mean the same strings, and the same text must become the same ids. When they do not, training
stops with a message that says how they differ, unless ``distill.cross_tokenizer.method`` is one
of:

* ``sequence`` -- sequence-level KD (Kim & Rush 2016): cross-entropy on the teacher's generated
  text, tokenized with the student's tokenizer. Always possible; uses no teacher logits.
* ``uld`` -- Universal Logit Distillation (Boizard et al. 2024, arXiv 2402.12030): each model reads
  the same (prompt, response) text through its own tokenizer; the i-th response token of one is
  aligned with the i-th of the other (both sequences cut to the shorter, as in the paper's code),
  and ``L = CE + λ ULD`` with ULD the L1 distance between the sorted probability vectors
  (:func:`mydistill.losses.uld.uld_loss`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mydistill.config.cross_tokenizer import CrossTokenizerConfig, CrossTokenizerMethod
from mydistill.losses.objective import LossOutput
from mydistill.losses.batch_signal import BatchSignal, ULDSignal
from mydistill.losses.uld import uld_loss
from mydistill.models import VocabularyMismatch
from mydistill.tokenization import (
    IGNORE_INDEX,
    TokenizedExample,
    collate,
    shift_labels,
    tokenize_example,
)


PROBE_TEXTS = (
    "Hello, world! How are you?",
    "reverse: dbcaf",
    "  leading spaces\ttabs\nand newlines  ",
    "numbers 12345 3.14159 and ünïcödé ✓",
    "def f(x):\n    return x * 2  # code",
)


# ----------------------------------------------------------------------------------------------
# tokenizer identity


class TokenizerMismatch(VocabularyMismatch):
    """Teacher and student tokenizers disagree and no cross-tokenizer method is configured."""


@dataclass
class TokenizerComparison:
    """How two tokenizers differ; ``agree`` means logit distillation can compare them id by id."""

    teacher_size: int
    student_size: int
    only_teacher: list[str] = field(default_factory=list)
    only_student: list[str] = field(default_factory=list)
    moved: list[tuple[str, int, int]] = field(default_factory=list)  # (token, teacher id, student id)
    counts: dict[str, int] = field(default_factory=dict)
    probes: list[tuple[str, list[int], list[int]]] = field(default_factory=list)  # texts tokenized differently
    notes: list[str] = field(default_factory=list)

    @property
    def same_vocabulary(self) -> bool:
        return not (self.counts.get("only_teacher") or self.counts.get("only_student") or self.counts.get("moved"))

    @property
    def agree(self) -> bool:
        return self.same_vocabulary and not self.probes

    def describe(self) -> str:
        if self.agree:
            return "the tokenizers agree" + (f" ({'; '.join(self.notes)})" if self.notes else "")
        parts = [f"teacher has {self.teacher_size} tokens, student {self.student_size}"]
        if self.counts.get("only_teacher"):
            parts.append(f"{self.counts['only_teacher']} only in the teacher, e.g. {self.only_teacher}")
        if self.counts.get("only_student"):
            parts.append(f"{self.counts['only_student']} only in the student, e.g. {self.only_student}")
        if self.counts.get("moved"):
            shown = ", ".join(f"{tok!r}: teacher {a} / student {b}" for tok, a, b in self.moved)
            parts.append(f"{self.counts['moved']} shared tokens with other ids, e.g. {shown}")
        if self.probes:
            text, t_ids, s_ids = self.probes[0]
            parts.append(
                f"the same text becomes other ids ({len(self.probes)} of {len(PROBE_TEXTS)} probe texts), e.g. "
                f"{text!r}: teacher {t_ids[:8]}, student {s_ids[:8]}"
            )
        return "; ".join(parts + self.notes)


def compare_tokenizers(teacher_tokenizer: Any, student_tokenizer: Any, *, samples: int = 5) -> TokenizerComparison:
    """Compare id -> string maps and the ids of a few probe texts (normalizer, pre-tokenizer, merges)."""
    t_vocab, s_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    only_t = sorted(set(t_vocab) - set(s_vocab))
    only_s = sorted(set(s_vocab) - set(t_vocab))
    moved = sorted((tok, t_vocab[tok], s_vocab[tok]) for tok in set(t_vocab) & set(s_vocab) if t_vocab[tok] != s_vocab[tok])
    out = TokenizerComparison(
        teacher_size=len(teacher_tokenizer),
        student_size=len(student_tokenizer),
        only_teacher=only_t[:samples],
        only_student=only_s[:samples],
        moved=moved[:samples],
        counts={"only_teacher": len(only_t), "only_student": len(only_s), "moved": len(moved)},
    )
    for text in PROBE_TEXTS:
        t_ids = teacher_tokenizer(text, add_special_tokens=False)["input_ids"]
        s_ids = student_tokenizer(text, add_special_tokens=False)["input_ids"]
        if t_ids != s_ids:
            out.probes.append((text, t_ids, s_ids))
    if getattr(teacher_tokenizer, "chat_template", None) != getattr(student_tokenizer, "chat_template", None):
        out.notes.append("their chat templates differ (training formats text with the student's)")
    return out


def check_tokenizers_agree(
    teacher_tokenizer: Any, student_tokenizer: Any, *, method: CrossTokenizerMethod = "none"
) -> TokenizerComparison:
    """Stop before training when the tokenizers disagree and no cross-tokenizer method is set.

    Raises :class:`TokenizerMismatch` (a :class:`~mydistill.models.VocabularyMismatch`) saying how
    they differ and what to do; returns the comparison otherwise.
    """
    comparison = compare_tokenizers(teacher_tokenizer, student_tokenizer)
    if comparison.agree or method != "none":
        return comparison
    raise TokenizerMismatch(
        f"teacher and student tokenizers differ: {comparison.describe()}. Logit distillation compares "
        "distributions token id by token id, so it needs one tokenizer. Either build the student with the "
        "teacher's tokenizer (leave student.init_uri empty: the student is built from the teacher's), or "
        "set distill.cross_tokenizer.method to 'sequence' (cross-entropy on the teacher's text, no logits) "
        "or 'uld' (Universal Logit Distillation across vocabularies)."
    )


# ----------------------------------------------------------------------------------------------
# ULD on batches


def teacher_examples(records: Sequence[dict[str, Any]], teacher_tokenizer: Any, max_length: int) -> list[TokenizedExample]:
    """The training records tokenized with the teacher's tokenizer (its own chat template)."""
    return [tokenize_example(teacher_tokenizer, r["prompt"], r["response"], max_length) for r in records]


def aligned_response_rows(
    student_labels: Tensor, teacher_labels: Tensor, ignore_index: int = IGNORE_INDEX
) -> tuple[Tensor, Tensor]:
    """Flat row indices aligning the i-th response position of each student row with the teacher's.

    Args:
        student_labels: ``(B, T_s)`` shifted labels (position j predicts token j + 1).
        teacher_labels: ``(B, T_t)`` the teacher's, same B, same examples in the same order.

    Returns ``(s_rows, t_rows)``, each ``(N,)`` indices into the flattened ``(B * T_s)`` and
    ``(B * T_t)`` positions; per example the response is cut to the shorter of the two.
    """
    if student_labels.shape[0] != teacher_labels.shape[0]:
        raise ValueError(f"student batch has {student_labels.shape[0]} rows, teacher batch {teacher_labels.shape[0]}")
    s_valid, t_valid = student_labels != ignore_index, teacher_labels != ignore_index
    # rank of each valid position within its row: the i-th response token of the row
    s_rank = s_valid.long().cumsum(-1) - 1
    t_rank = t_valid.long().cumsum(-1) - 1
    n = torch.minimum(s_valid.sum(-1), t_valid.sum(-1)).unsqueeze(-1)
    s_keep = s_valid & (s_rank < n)
    t_keep = t_valid & (t_rank < n)
    return s_keep.reshape(-1).nonzero().squeeze(-1), t_keep.reshape(-1).nonzero().squeeze(-1)


class ULDObjective(torch.nn.Module):
    """The training objective for ``cross_tokenizer.method: uld``: ``CE + λ ULD``.

    Wraps the run's :class:`~mydistill.losses.DistillObjective` (which gives the student's CE,
    chunked, with no teacher) and takes the same arguments; the teacher's part is the ``uld`` of
    the :class:`~mydistill.losses.BatchSignal` that :meth:`ULDTeacher.signal` gives: its logits at
    the response positions aligned with the student's flattened rows. So it drops into the
    trainer wherever the plain objective goes, under any engine.
    """

    def __init__(self, objective: torch.nn.Module, cfg: CrossTokenizerConfig) -> None:
        super().__init__()
        self.objective = objective
        self.cross_cfg = cfg

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
        student_head_bias: Tensor | None = None,
        **kwargs: Any,
    ) -> LossOutput:
        # the wrapped objective sees no logit teacher: its part is the CE (and any hidden-state term)
        out = self.objective(
            student_hidden=student_hidden, student_head_weight=student_head_weight, labels=labels,
            student_head_bias=student_head_bias, **kwargs,
        )
        uld_signal = signal.uld if signal is not None else None
        if uld_signal is None:
            return out
        rows = student_hidden.reshape(-1, student_hidden.shape[-1])[uld_signal.student_rows]
        # full-vocabulary student logits, but only at the aligned response positions
        student_logits = F.linear(rows, student_head_weight, student_head_bias)
        uld = uld_loss(
            student_logits, uld_signal.logits, temperature=self.cross_cfg.uld_temperature, top_k=self.cross_cfg.uld_top_k
        )
        loss = out.loss + self.cross_cfg.uld_weight * uld
        metrics = {**out.metrics, "uld": float(uld.detach()), "uld_positions": float(uld_signal.student_rows.numel())}
        metrics["loss"] = float(loss.detach())
        return LossOutput(loss=loss, metrics=metrics)


class ULDTeacher:
    """The teacher side of ULD: the training examples tokenized the teacher's way, and its logits
    at the response positions aligned with a student batch.

    Args:
        teacher: the teacher model (its own vocabulary).
        teacher_tokenizer: its tokenizer.
        records: the training records, in the order the trainer indexes them.
        max_length: as for the student.
    """

    def __init__(self, teacher: Any, teacher_tokenizer: Any, records: Sequence[dict[str, Any]], max_length: int) -> None:
        self.teacher = teacher
        self.tokenizer = teacher_tokenizer
        self.examples = teacher_examples(records, teacher_tokenizer, max_length)

    @torch.no_grad()
    def signal(self, batch: dict[str, Tensor], indices: Sequence[int] | None = None, *, hidden_states: bool = False) -> BatchSignal:
        """The teacher's logits ``(N, V_t)`` at the N response positions aligned with the student
        ``batch``, whose rows are the training records at ``indices``."""
        if indices is None:
            raise ValueError("a ULD teacher signal needs the batch's example indices")
        device = batch["input_ids"].device
        teacher_batch = {k: v.to(device) for k, v in collate_teacher([self.examples[i] for i in indices], self.tokenizer).items()}
        s_rows, t_rows = aligned_response_rows(shift_labels(batch["labels"]), shift_labels(teacher_batch["labels"]))
        hidden = self.teacher.model(
            input_ids=teacher_batch["input_ids"], attention_mask=teacher_batch["attention_mask"]
        ).last_hidden_state
        logits = self.teacher.lm_head(hidden.reshape(-1, hidden.shape[-1])[t_rows])
        return BatchSignal(uld=ULDSignal(logits, s_rows), origin="uld")


def uld_batch_loss(
    student: Any,
    teacher: Any,
    objective: Any,
    batch: dict[str, Tensor],
    teacher_batch: dict[str, Tensor],
    cfg: CrossTokenizerConfig,
) -> LossOutput:
    """``CE(student) + λ ULD(teacher, student)`` on one batch of examples tokenized both ways.

    ``batch`` is the student's collated batch, ``teacher_batch`` the same examples collated with the
    teacher's tokenizer. The same computation as :class:`ULDObjective` fed by :class:`ULDTeacher`,
    for use outside the trainer.
    """
    labels = shift_labels(batch["labels"])
    s_rows, t_rows = aligned_response_rows(labels, shift_labels(teacher_batch["labels"]))
    with torch.no_grad():
        t_hidden = teacher.model(
            input_ids=teacher_batch["input_ids"], attention_mask=teacher_batch["attention_mask"]
        ).last_hidden_state
        teacher_logits = teacher.lm_head(t_hidden.reshape(-1, t_hidden.shape[-1])[t_rows])
    hidden = student.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    return ULDObjective(objective, cfg)(
        student_hidden=hidden, student_head_weight=student.lm_head.weight, labels=labels,
        signal=BatchSignal(uld=ULDSignal(teacher_logits, s_rows), origin="uld"),
    )


def collate_teacher(examples: Sequence[TokenizedExample], teacher_tokenizer: Any) -> dict[str, Tensor]:
    pad = teacher_tokenizer.pad_token_id if teacher_tokenizer.pad_token_id is not None else 0
    return collate(examples, pad)
