"""The teachers of a training job: which are loaded, how, and where each batch's signal comes from.

The frozen teacher is loaded whole on every process in ``teacher.dtype``, or partitioned across
them by ZeRO-3 inference (``distill.teacher_sharding: zero3``). ``distill.extra_teachers`` run
beside it (:class:`OnlineTeachers`, mixed per token by ``distill.loss.teacher_weights``; all share
the student's tokenizer). When the signal comes from stores (``signal.enabled``) or from a teacher
with another tokenizer (ULD), a :class:`~mydistill.signal.source.TeacherSource` stands between
the trainer and the teacher. :func:`load_teachers` makes all of these decisions once, and
returns them as one :class:`Teachers`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from mydistill.config import DistillConfig
from mydistill.models import count_parameters, load_model, load_tokenizer, resolve_dtype
from mydistill.signal.source import TeacherSource, online_signal
from mydistill.training.cross_tokenizer import TokenizerMismatch, ULDTeacher, check_tokenizers_agree
from mydistill.training.engines import import_deepspeed
from mydistill.training.job import TrainJob
from mydistill.training.student import student_vocab_size


@dataclass
class Teachers:
    """What one training job learns from.

    Attributes:
        model: the main frozen teacher (None: stores alone, sequence-level KD, or a stage without one).
        extras: ``distill.extra_teachers``, loaded like ``model``.
        tokenizer: the main teacher's tokenizer (checked against the student's before any load).
        source: what each batch's signal comes from: the online teacher(s), or a ``TeacherSource``.
    """

    model: Any = None
    extras: list[Any] = field(default_factory=list)
    tokenizer: Any = None
    source: Any = None

    @property
    def online(self) -> Any:
        """The teacher(s) that score student-sampled (on-policy) batches."""
        return OnlineTeachers([self.model, *self.extras]) if self.extras else self.model

    def fit_heads(self, vocab_size: int, *, same_tokenizer: bool) -> None:
        """Trim padded output projections to the student's vocabulary (see :func:`match_head_rows`)."""
        for teacher in ([self.model] if same_tokenizer and self.model is not None else []) + self.extras:
            match_head_rows(teacher, vocab_size)

    def forward_parameters(self, *, from_stores: bool) -> int:
        """Parameters run forward on every batch (for MFU); none when the signal comes from stores."""
        return 0 if from_stores else sum(count_parameters(t) for t in (self.model, *self.extras) if t is not None)


def load_teachers(
    job: TrainJob, distill: DistillConfig | None, student_tokenizer: Any, records: list[dict[str, Any]],
    ds_config: dict[str, Any] | None, device: torch.device,
) -> Teachers:
    """Check, load and wire the job's teachers, before the student and before any ZeRO-3 config
    exists for the student (so the frozen teacher is never partitioned by accident)."""
    if not job.teacher_uri:
        return Teachers()
    method = distill.cross_tokenizer.method if distill else "none"
    # before anything heavy: the same ids must mean the same strings, unless a cross-tokenizer method is set
    tokenizer = load_tokenizer(job.teacher_uri)
    check_tokenizers_agree(tokenizer, student_tokenizer, method=method)
    dtype = resolve_dtype(job.teacher_dtype, device)
    model = load_teacher(job.teacher_uri, distill, ds_config, device, dtype) if needs_teacher_model(job, distill) else None
    extras = load_extra_teachers(job, distill, model, student_tokenizer, ds_config, device, dtype)
    teachers = Teachers(model=model, extras=extras, tokenizer=tokenizer)
    teachers.source = teachers.online if extras else teacher_source(job, distill, records, model, tokenizer, student_tokenizer)
    return teachers


@dataclass
class OnlineTeachers:
    """Frozen teacher models, the main one first; :meth:`signal` gives the objective's keyword arguments."""

    models: list[Any]

    def signal(self, batch: dict[str, torch.Tensor], hidden_states: bool = False) -> dict[str, Any]:
        """Each teacher's final hidden states and head, as lists in teacher order; with ``hidden_states``
        also the main teacher's per-layer states (layer-wise distillation follows the main teacher)."""
        signals = [online_signal(m, batch, hidden_states=hidden_states and i == 0) for i, m in enumerate(self.models)]
        out: dict[str, Any] = {
            "teacher_hidden": [s["teacher_hidden"] for s in signals],
            "teacher_head_weight": [s["teacher_head_weight"] for s in signals],
        }
        if hidden_states:
            out["teacher_hidden_states"] = signals[0]["teacher_hidden_states"]
        return out


def match_head_rows(teacher: Any, vocab_size: int) -> None:
    """Drop padding rows of the teacher's output projection beyond the student's vocabulary.

    Models of one family often pad their heads to different sizes (Qwen2.5-7B has 152,064 rows,
    0.5B 151,936) while sharing one tokenizer, whose ids all lie below both sizes (checked before
    this point), so the extra rows are never a real token's.
    """
    weight = teacher.lm_head.weight
    if weight.shape[0] > vocab_size:
        teacher.lm_head.weight = torch.nn.Parameter(weight[:vocab_size].detach(), requires_grad=False)


def load_teacher(
    uri: str, distill: DistillConfig | None, ds_config: dict[str, Any] | None, device: torch.device, dtype: torch.dtype,
) -> Any:
    """The frozen teacher in ``dtype``: whole on every process, or (``distill.teacher_sharding: zero3``)
    partitioned across them by ZeRO-3 inference, for a teacher too large for one device (its
    precision is then the DeepSpeed config's)."""
    if distill is not None and distill.teacher_sharding == "zero3":
        assert ds_config is not None  # DistillConfig refuses teacher_sharding: zero3 without deepspeed
        import_deepspeed()
        from mydistill.training.sharded_teacher import ShardedTeacher

        return ShardedTeacher(uri, ds_config, device)
    return load_model(uri, device=device, dtype=dtype).eval().requires_grad_(False)


def load_extra_teachers(
    job: TrainJob, distill: DistillConfig | None, teacher: Any, student_tokenizer: Any, ds_config: dict[str, Any] | None,
    device: torch.device, dtype: torch.dtype,
) -> list[Any]:
    """``distill.extra_teachers``, loaded like the main teacher.

    All tokenizers are checked before any model is loaded; a disagreement raises
    :class:`~mydistill.training.cross_tokenizer.TokenizerMismatch` naming the teacher (its index and URI).
    """
    if distill is None or not distill.extra_teachers:
        return []
    if job.signal_uris:
        raise ValueError(
            "distill.extra_teachers are online teachers, but this job reads teacher-signal stores; give the other "
            "teachers' stores as signal.extra_uris instead"
        )
    if teacher is None:
        raise ValueError("distill.extra_teachers are mixed with the main online teacher, so the job needs teacher_uri")
    uris = [spec.uri for spec in distill.extra_teachers if spec.uri]
    for i, uri in enumerate(uris):
        try:
            check_tokenizers_agree(load_tokenizer(uri), student_tokenizer, method="none")
        except TokenizerMismatch as e:
            raise TokenizerMismatch(
                f"distill.extra_teachers[{i}] ({uri}): {e} (distill.extra_teachers must all share the student's "
                "tokenizer; cross-tokenizer methods apply to the main teacher only)"
            ) from None
    return [load_teacher(uri, distill, ds_config, device, dtype) for uri in uris]


def needs_teacher_model(job: TrainJob, distill: DistillConfig | None) -> bool:
    """Whether the teacher's weights must be in memory: not when every batch's signal comes from
    stores (unless on-policy batches need scoring), nor for sequence-level KD (CE on its text)."""
    if distill is None:
        return True
    if distill.cross_tokenizer.method == "sequence":
        return False
    return not job.signal_uris or distill.on_policy.fraction > 0


def teacher_source(
    job: TrainJob, distill: DistillConfig | None, records: list[dict[str, Any]], teacher: Any, teacher_tokenizer: Any,
    tokenizer: Any,
) -> Any:
    """What the objective learns from each batch: the online teacher (or none), or a
    :class:`~mydistill.signal.source.TeacherSource` over stores or the ULD teacher. Stores are
    checked against this run's tokenizer, data and vocabulary here, before any training."""
    if distill is None or not (job.signal_uris or distill.cross_tokenizer.method == "uld"):
        return teacher
    if job.signal_uris:
        from mydistill.signal.teacher import StoreTeacher

        loss = distill.loss
        store = StoreTeacher(
            job.signal_uris, records=records, tokenizer=tokenizer, vocab_size=student_vocab_size(job, tokenizer),
            weights=loss.teacher_weights, temperature=loss.temperature, divergence=loss.divergence,
        )
        return TeacherSource(teacher=teacher, store=store)
    return TeacherSource(teacher=teacher, uld=ULDTeacher(teacher, teacher_tokenizer, records, distill.max_length))
