"""The teachers of a training job: which are loaded, how, and where each batch's signal comes from.

The frozen teacher is loaded whole on every process in ``teacher.dtype``, or partitioned across
them by ZeRO-3 inference (``distill.teacher_sharding: zero3``). ``distill.extra_teachers`` run
beside it, mixed per token by ``distill.loss.teacher_weights`` (all share the student's tokenizer).

Every source of a batch's teacher signal answers one call, ``source.signal(batch, indices,
hidden_states=...)``, with one :class:`~mydistill.losses.BatchSignal`:

* :class:`OnlineTeachers` -- teacher models run on the batch (one model is an ensemble of one);
* :class:`~mydistill.signal.teacher.StoreTeacher` -- top-k read from teacher-signal stores;
* :class:`~mydistill.training.cross_tokenizer.ULDTeacher` -- a teacher with another tokenizer;
* :class:`NoTeacher` -- none (stage 2, sequence-level KD).

:func:`load_teachers` makes all of these decisions once, and returns them as one :class:`Teachers`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from mydistill.config import DistillConfig
from mydistill.losses import BatchSignal, teacher_from_parts
from mydistill.models import count_parameters, load_model, load_tokenizer, resolve_dtype
from mydistill.training.cross_tokenizer import TokenizerMismatch, ULDTeacher, check_tokenizers_agree
from mydistill.training.process import import_deepspeed
from mydistill.training.job import TrainJob
from mydistill.training.student import student_vocab_size


class SignalSource(Protocol):
    """Where each batch's teacher signal comes from (see the module docstring)."""

    def signal(self, batch: dict[str, Tensor], indices: Sequence[int] | None = None, *, hidden_states: bool = False) -> BatchSignal:
        """The teacher side of ``batch``; ``indices`` are its rows' positions in the training records
        (stores and ULD look the examples up); ``hidden_states`` asks for the per-layer states too."""
        ...


class NoTeacher:
    """No teacher signal: the objective trains on the labels alone."""

    def signal(self, batch: dict[str, Tensor], indices: Sequence[int] | None = None, *, hidden_states: bool = False) -> BatchSignal:
        return BatchSignal()


@dataclass
class Teachers:
    """What one training job learns from.

    Attributes:
        model: the main frozen teacher (None: stores alone, sequence-level KD, or a stage without one).
        extras: ``distill.extra_teachers``, loaded like ``model``.
        weights: ``distill.loss.teacher_weights`` for the online teachers (None: equal).
        tokenizer: the main teacher's tokenizer (checked against the student's before any load).
        source: what each batch's signal comes from (a :class:`SignalSource`).
    """

    model: Any = None
    extras: list[Any] = field(default_factory=list)
    weights: Sequence[float] | None = None
    tokenizer: Any = None
    source: SignalSource = field(default_factory=NoTeacher)

    @property
    def online(self) -> SignalSource:
        """The teacher(s) that score student-sampled (on-policy) batches."""
        if self.model is None:
            return NoTeacher()
        return OnlineTeachers([self.model, *self.extras], self.weights)

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
    weights = distill.loss.teacher_weights if distill is not None and extras else None
    teachers = Teachers(model=model, extras=extras, weights=weights, tokenizer=tokenizer)
    teachers.source = teachers.online if extras else teacher_source(job, distill, records, teachers.online, tokenizer, student_tokenizer)
    return teachers


@dataclass
class OnlineTeachers:
    """Frozen teacher models run on each batch, the main one first, mixed per token by ``weights``.

    The objective computes their logits chunk by chunk from the final hidden states and heads
    (full ``(B, T, V)`` logits dominate peak memory at real vocabulary sizes)."""

    models: list[Any]
    weights: Sequence[float] | None = None

    def signal(self, batch: dict[str, Tensor], indices: Sequence[int] | None = None, *, hidden_states: bool = False) -> BatchSignal:
        """Each teacher's final hidden states and head as one signal (a weight of 0 leaves a teacher
        out); with ``hidden_states`` also the main teacher's per-layer states (layer-wise
        distillation follows the main teacher)."""
        hiddens, per_layer = [], None
        with torch.no_grad():
            for i, teacher in enumerate(self.models):
                want = hidden_states and i == 0
                out = teacher.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=want)
                hiddens.append(out.last_hidden_state)
                per_layer = out.hidden_states if want else per_layer
        teacher = teacher_from_parts(hidden=hiddens, head_weight=[t.lm_head.weight for t in self.models], weights=self.weights)
        return BatchSignal(teacher=teacher, hidden_states=per_layer, origin="online")


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
    job: TrainJob, distill: DistillConfig | None, records: list[dict[str, Any]], online: SignalSource, teacher_tokenizer: Any,
    tokenizer: Any,
) -> SignalSource:
    """What the objective learns from each batch: the ``online`` teacher (or none), stores, or the
    ULD teacher. Stores are checked against this run's tokenizer, data and vocabulary here, before
    any training."""
    if distill is None or not (job.signal_uris or distill.cross_tokenizer.method == "uld"):
        return online
    if job.signal_uris:
        from mydistill.signal.teacher import StoreTeacher

        loss = distill.loss
        return StoreTeacher(
            job.signal_uris, records=records, tokenizer=tokenizer, vocab_size=student_vocab_size(job, tokenizer),
            weights=loss.teacher_weights, temperature=loss.temperature, divergence=loss.divergence,
        )
    assert isinstance(online, OnlineTeachers)  # ULD needs the teacher model (needs_teacher_model)
    return ULDTeacher(online.models[0], teacher_tokenizer, records, distill.max_length)
