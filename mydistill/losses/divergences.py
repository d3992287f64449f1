"""The plain (reference) distillation losses on full logits: tensors in, a scalar out.

Every divergence of :data:`~mydistill.losses.table.DIVERGENCE_TABLE` is a public function here,
``fn(student_logits, teacher, *, temperature=1.0, mask=None, labels=None, ignore_index=-100,
[beta | alpha])``, returning the mean over valid tokens of the per-token divergence between
``q = softmax(student / T)`` and the teacher's ``p`` at T, *without* the T² factor
(:func:`distill_loss` applies it in the Hinton soft/hard mix).

Shapes: ``student_logits`` is ``(N, V)`` (leading dimensions are flattened, e.g. ``(B, S, V)``);
``teacher`` is any :class:`~mydistill.losses.teacher_signal.TeacherSignal` (a logits tensor or a list of
them is accepted too); ``mask`` and ``labels`` are ``(N,)``. A token is valid when ``mask`` is true
(if given) and ``labels != ignore_index`` (if given); invalid rows are dropped before any
vocabulary-sized work. Everything runs in fp32 whatever the input dtype (fp64 stays fp64), the
teacher is a constant, and zero valid tokens give 0 (with zero gradients), never NaN.

These functions materialise ``(N, V)`` fp32 tensors; :mod:`mydistill.losses.chunked` computes the
same values and gradients from hidden states chunk by chunk, and the tests hold the two equal.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mydistill.losses.teacher_signal import DenseLogits, HiddenHead, TeacherSignal, as_signal, upcast
from mydistill.losses.table import (
    DIVERGENCE_NAMES,
    DIVERGENCE_TABLE,
    Divergence,
    DistillMix,
    check_unit,
    divergence_rows,
    lookup,
)

__all__ = ["DIVERGENCES", "DIVERGENCE_NAMES", "DistillLossParts", "cross_entropy", "distill_loss"]


def valid_token_mask(n_tokens: int, mask: Tensor | None, labels: Tensor | None, ignore_index: int, device: Any) -> Tensor:
    """``(N,)`` bool: ``mask`` (if given) and ``labels != ignore_index`` (if given)."""
    valid = torch.ones(n_tokens, dtype=torch.bool, device=device)
    if mask is not None:
        if mask.numel() != n_tokens:
            raise ValueError(f"mask has {mask.numel()} entries for {n_tokens} tokens; give one per token")
        valid &= mask.reshape(-1).to(device=device, dtype=torch.bool)
    if labels is not None:
        if labels.numel() != n_tokens:
            raise ValueError(f"labels has {labels.numel()} entries for {n_tokens} tokens; give one per token")
        valid &= labels.reshape(-1).to(device) != ignore_index
    return valid


def _flat(x: Tensor, what: str) -> Tensor:
    if x.dim() < 2:
        raise ValueError(f"{what} must have shape (N, V) or (..., V), got {tuple(x.shape)}")
    return x.reshape(-1, x.shape[-1])


def mean_divergence(
    divergence: Divergence,
    student_logits: Tensor,
    teacher: TeacherSignal,
    valid: Tensor,
    temperature: float,
    param: float,
) -> Tensor:
    """Mean of ``divergence`` over the ``valid`` rows of ``(N, V)`` logits and a checked teacher."""
    n_valid = valid.sum().clamp_min(1)
    # drop invalid rows first: padding never reaches the vocabulary-sized math
    z = upcast(student_logits[valid]) / temperature
    teacher = teacher.rows(valid)
    vocab = student_logits.shape[-1]
    if divergence.on_logits:
        target = teacher.scaled_logits(temperature)
    else:
        target = teacher.category_log_probs(temperature, vocab)
    return divergence_rows(divergence, z, target, teacher.category_ids(), param).sum() / n_valid


def _public(divergence: Divergence) -> Callable[..., Tensor]:
    """The plain function for one table row, its parameter (if any) a keyword under the paper's name."""

    def loss(
        student_logits: Tensor,
        teacher: Any,
        *,
        temperature: float = 1.0,
        mask: Tensor | None = None,
        labels: Tensor | None = None,
        ignore_index: int = -100,
        **param: float,
    ) -> Tensor:
        unknown = set(param) - {divergence.param}
        if unknown:
            raise TypeError(f"{divergence.name}() got unexpected keyword arguments {sorted(unknown)}")
        value = param.get(divergence.param or "", divergence.default)
        if divergence.param is not None:
            check_unit(divergence.param, value)
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        student = _flat(student_logits, "student_logits")
        signal = as_signal(teacher)
        assert signal is not None, f"{divergence.name} needs a teacher"
        signal = signal.checked(*student.shape)
        valid = valid_token_mask(student.shape[0], mask, labels, ignore_index, student.device)
        return mean_divergence(divergence, student, signal, valid, temperature, value)

    args = list(inspect.signature(loss).parameters.values())[:-1]
    if divergence.param is not None:
        args.insert(2, inspect.Parameter(divergence.param, inspect.Parameter.KEYWORD_ONLY, default=divergence.default))
    loss.__signature__ = inspect.Signature(args, return_annotation=Tensor)  # type: ignore[attr-defined]
    loss.__name__ = loss.__qualname__ = divergence.name
    loss.__doc__ = (
        f"{divergence.summary}\n\nArgs:\n    student_logits: ``(N, V)`` (or ``(..., V)``).\n"
        "    teacher: a TeacherSignal (dense logits, hidden + head, top-k, ensemble) or ``(N, V)`` logits.\n"
        "    temperature: softmax temperature T > 0.\n    mask: ``(N,)`` true for tokens to count.\n"
        "    labels: ``(N,)``; positions equal to ``ignore_index`` are skipped.\n\n"
        "Returns the mean over valid tokens, a scalar, without the T² factor."
    )
    return loss


DIVERGENCES: dict[str, Callable[..., Tensor]] = {name: _public(row) for name, row in DIVERGENCE_TABLE.items()}
forward_kl = DIVERGENCES["forward_kl"]
reverse_kl = DIVERGENCES["reverse_kl"]
symmetric_kl = DIVERGENCES["symmetric_kl"]
generalized_jsd = DIVERGENCES["generalized_jsd"]
skew_kl = DIVERGENCES["skew_kl"]
skew_reverse_kl = DIVERGENCES["skew_reverse_kl"]
tvd = DIVERGENCES["tvd"]
logit_mse = DIVERGENCES["logit_mse"]


def divergence_kwargs(name: str, *, beta: float, skew_alpha: float) -> dict[str, float]:
    """The paper-named parameter a function of :data:`DIVERGENCES` takes, if any."""
    row = lookup(name)
    return {} if row.param is None else {row.param: {"beta": beta, "alpha": skew_alpha}[row.param]}


def cross_entropy(
    student_logits: Tensor, labels: Tensor, *, mask: Tensor | None = None, ignore_index: int = -100
) -> Tensor:
    """Hard-label cross-entropy at T = 1, mean over valid tokens; ``(N, V)`` logits, ``(N,)`` labels."""
    student = _flat(student_logits, "student_logits")
    valid = valid_token_mask(student.shape[0], mask, labels, ignore_index, student.device)
    rows = F.cross_entropy(upcast(student[valid]), labels.reshape(-1).to(student.device)[valid], reduction="sum")
    return rows / valid.sum().clamp_min(1)


@dataclass
class DistillLossParts:
    """What a combined distillation loss returns.

    Attributes:
        loss: scalar to backpropagate: ``alpha * T² * kd + (1 - alpha) * ce`` (or ``ce`` alone).
        kd: detached mean divergence at T, without T² (0 when there is no teacher).
        ce: detached mean hard-label cross-entropy (0 when there are no labels).
        teacher_agreement: detached fraction of valid tokens whose student top-1 equals the
            teacher's top-1, or None when not computed.
        num_tokens: detached count of valid tokens.
    """

    loss: Tensor
    kd: Tensor
    ce: Tensor
    teacher_agreement: Tensor | None
    num_tokens: Tensor


def check_mix(teacher: TeacherSignal | None, labels: Tensor | None, mix: DistillMix) -> None:
    """The inputs the mix needs: labels for any CE weight, one dense teacher for ``logit_mse``."""
    if teacher is None and labels is None:
        raise ValueError("without a teacher the loss is cross-entropy, which needs labels")
    if teacher is not None and mix.alpha < 1.0 and labels is None:
        raise ValueError(
            f"alpha={mix.alpha} puts weight {1 - mix.alpha:g} on the hard-label term, which needs labels; "
            "pass labels or set alpha=1"
        )
    if teacher is not None and mix.entry.on_logits and not isinstance(teacher, (DenseLogits, HiddenHead)):
        raise ValueError("logit_mse compares raw logits, so it needs one dense teacher, not a top-k or ensemble one")


def distill_loss(
    student_logits: Tensor,
    teacher: Any = None,
    *,
    labels: Tensor | None = None,
    mask: Tensor | None = None,
    mix: DistillMix = DistillMix(),
    compute_agreement: bool = False,
) -> DistillLossParts:
    """The Hinton soft/hard mix on full logits (the plain reference for the chunked path).

    ``loss = alpha * T² * D_T(student, teacher) + (1 - alpha) * CE(student, labels)`` where ``D_T``
    is the table's ``mix.divergence`` at temperature T (Hinton et al. 2015: the T² keeps the soft
    term's gradient scale independent of T). Without a teacher the loss is the cross-entropy alone.

    Args:
        student_logits: ``(N, V)`` (or ``(..., V)``).
        teacher: any :class:`TeacherSignal`, ``(N, V)`` logits, a list of them (equal-weight
            ensemble), or None.
        labels: ``(N,)`` hard targets, ``mix.ignore_index`` marks tokens to skip everywhere.
        mask: ``(N,)`` optional extra validity mask.
        mix: divergence, temperature, alpha, its parameters (:class:`DistillMix`).
        compute_agreement: also the fraction of valid tokens where student and teacher top-1 agree.
    """
    student = _flat(student_logits, "student_logits")
    signal = as_signal(teacher)
    check_mix(signal, labels, mix)
    valid = valid_token_mask(student.shape[0], mask, labels, mix.ignore_index, student.device)
    num_tokens = valid.sum()
    zero = student.new_zeros((), dtype=torch.float32)
    ce = cross_entropy(student, labels, mask=mask, ignore_index=mix.ignore_index) if labels is not None else None
    if signal is None:
        assert ce is not None
        return DistillLossParts(ce, zero, ce.detach(), None, num_tokens)
    signal = signal.checked(*student.shape)
    kd = mean_divergence(mix.entry, student, signal, valid, mix.temperature, mix.param)
    loss = mix.alpha * mix.temperature**2 * kd
    if ce is not None and mix.alpha < 1.0:
        loss = loss + (1.0 - mix.alpha) * ce
    agreement = None
    if compute_agreement:
        with torch.no_grad():
            rows = signal.rows(valid)
            same = student[valid].argmax(-1) == rows.top1(rows.category_log_probs(mix.temperature, student.shape[1]))
            agreement = same.float().sum() / num_tokens.clamp_min(1)
    return DistillLossParts(loss, kd.detach(), zero if ce is None else ce.detach(), agreement, num_tokens)
