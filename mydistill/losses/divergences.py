"""The plain (reference) distillation losses: one divergence, one function, tensors in and out.

Every divergence here has the signature ``fn(student_logits, teacher_logits, *, temperature=1.0,
mask=None, labels=None, ignore_index=-100, **param)`` and returns the mean over valid tokens of
the per-token divergence between ``q = softmax(student / T)`` and ``p = softmax(teacher / T)``,
*without* the T² factor (:func:`distill_loss` applies it in the Hinton soft/hard mix).

Shapes: ``student_logits`` is ``(N, V)`` (any leading dimensions are flattened, e.g. ``(B, S, V)``);
``teacher_logits`` is a dense ``(N, V)`` tensor, a :class:`~mydistill.losses.teacher.TopKTeacher`
with ``(N, k)`` ids/log-probs, or a :class:`~mydistill.losses.teacher.TeacherEnsemble` of dense
teachers; ``mask`` and ``labels`` are ``(N,)``. A token is valid when ``mask`` is true (if given) and
``labels != ignore_index`` (if given); invalid rows are dropped before any vocabulary-sized work.
Everything is computed in fp32 whatever the input dtype (fp64 inputs stay fp64), the teacher is
detached (a constant), and zero valid tokens give a loss of 0 (with zero gradients), never NaN.

These functions materialise ``(N, V)`` fp32 tensors; :mod:`mydistill.losses.chunked` computes the
same values and gradients from hidden states chunk by chunk, and the tests hold the two equal.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from mydistill.config.losses import Divergence
from mydistill.losses.teacher import (
    TeacherEnsemble,
    TopKTeacher,
    check_vocab,
    mixture_log_probs,
    normalized_weights,
    upcast,
)

Teacher = Tensor | TopKTeacher | TeacherEnsemble
TeacherArg = Tensor | TopKTeacher | TeacherEnsemble | Sequence[Tensor]

DIVERGENCE_NAMES: tuple[str, ...] = get_args(Divergence)  # the config's list of names is the one list


# --------------------------------------------------------------------------------------------
# input handling shared with the chunked path
# --------------------------------------------------------------------------------------------


def valid_token_mask(
    n_tokens: int,
    *,
    mask: Tensor | None,
    labels: Tensor | None,
    ignore_index: int,
    device: torch.device,
) -> Tensor:
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


def as_teacher(teacher_logits: TeacherArg | None, teacher_weights: Sequence[float] | None = None) -> Teacher | None:
    """Normalise the accepted teacher forms; a list of tensors becomes a :class:`TeacherEnsemble`."""
    if teacher_logits is None or isinstance(teacher_logits, (Tensor, TopKTeacher)):
        if teacher_weights is not None and len(teacher_weights) != 1:
            raise ValueError(f"got {len(teacher_weights)} teacher weights for a single teacher")
        return teacher_logits
    if isinstance(teacher_logits, TeacherEnsemble):
        if teacher_weights is not None:
            raise ValueError("give teacher weights either in the TeacherEnsemble or as teacher_weights, not both")
        return teacher_logits
    teachers = list(teacher_logits)
    if not all(isinstance(t, Tensor) for t in teachers):
        raise TypeError("a multi-teacher signal must be a sequence of dense (N, V) logits tensors")
    if len(teachers) == 1 and teacher_weights is None:
        return teachers[0]
    return TeacherEnsemble(teachers, teacher_weights)


def _flat(x: Tensor, what: str) -> Tensor:
    if x.dim() < 2:
        raise ValueError(f"{what} must have shape (N, V) or (..., V), got {tuple(x.shape)}")
    return x.reshape(-1, x.shape[-1])


def _check_rows(what: str, rows: int, n_tokens: int) -> None:
    if rows != n_tokens:
        raise ValueError(f"{what} has {rows} positions but the student has {n_tokens}; they must align token by token")


def _dense_teacher_rows(teacher: Teacher, vocab: int, n_tokens: int) -> Teacher:
    """Flatten, detach and check a teacher against the student's ``N`` and ``V``."""
    if isinstance(teacher, Tensor):
        flat = _flat(teacher.detach(), "teacher_logits")
        check_vocab(vocab, flat.shape[-1])
        _check_rows("teacher_logits", flat.shape[0], n_tokens)
        return flat
    if isinstance(teacher, TopKTeacher):
        flat_topk = teacher.flatten()
        flat_topk = TopKTeacher(
            flat_topk.token_ids,
            flat_topk.log_probs.detach(),
            None if flat_topk.residual is None else flat_topk.residual.detach(),
        )
        _check_rows("the top-k teacher", flat_topk.token_ids.shape[0], n_tokens)
        if flat_topk.k > vocab:
            raise ValueError(f"the top-k teacher lists k={flat_topk.k} tokens but the student vocabulary has {vocab}")
        return flat_topk
    flats = []
    for i, logits in enumerate(teacher.logits):
        flat = _flat(logits.detach(), f"teacher {i} logits")
        check_vocab(vocab, flat.shape[-1], which=f"teacher {i} of the ensemble")
        _check_rows(f"teacher {i} logits", flat.shape[0], n_tokens)
        flats.append(flat)
    return TeacherEnsemble(flats, teacher.weights)


def _select_rows(teacher: Teacher, valid: Tensor) -> Teacher:
    if isinstance(teacher, Tensor):
        return teacher[valid]
    if isinstance(teacher, TopKTeacher):
        return teacher.rows(valid)
    return TeacherEnsemble([t[valid] for t in teacher.logits], teacher.weights)


def student_category_log_probs(z: Tensor, token_ids: Tensor | None) -> Tensor:
    """Student log-probs over the teacher's categories from scaled logits ``z = s / T``: ``(n, K)``.

    Dense (``token_ids`` None): ``log_softmax(z)`` over V. Top-k: the k listed tokens, then (when
    k < V) the tail ``log sum_{j not listed} q_j``.
    """
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    if token_ids is None:
        return z - lse
    token_ids = token_ids.long()
    top = z.gather(-1, token_ids) - lse
    if token_ids.shape[-1] == z.shape[-1]:
        return top
    tail = torch.logsumexp(z.scatter(-1, token_ids, float("-inf")), dim=-1, keepdim=True) - lse
    return torch.cat([top, tail], dim=-1)


def teacher_category_log_probs(teacher: Teacher, temperature: float, vocab: int) -> Tensor:
    """Teacher log-probs over the categories (see :mod:`mydistill.losses.teacher`), fp32."""
    if isinstance(teacher, Tensor):
        return torch.log_softmax(upcast(teacher) / temperature, dim=-1)
    if isinstance(teacher, TopKTeacher):
        return teacher.category_log_probs(temperature, vocab)
    weights = normalized_weights(teacher.weights, len(teacher.logits))
    return mixture_log_probs(teacher.logits, weights, temperature)


def teacher_argmax(teacher: Teacher, temperature: float = 1.0) -> Tensor:
    """The teacher's top-1 token per row (for an ensemble: of the mixture at ``temperature``)."""
    if isinstance(teacher, Tensor):
        return teacher.argmax(dim=-1)
    if isinstance(teacher, TopKTeacher):
        return teacher.argmax_ids()
    weights = normalized_weights(teacher.weights, len(teacher.logits))
    return mixture_log_probs(teacher.logits, weights, temperature).argmax(dim=-1)


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _check_unit(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


# --------------------------------------------------------------------------------------------
# per-token divergences on category log-probs (autograd does the gradients here)
# --------------------------------------------------------------------------------------------


def _p_log_ratio(p: Tensor, log_p: Tensor, log_x: Tensor) -> Tensor:
    """Elementwise ``p * (log p - log x)`` with the convention ``0 * log 0 = 0``."""
    # where() and not a multiply: a teacher with -inf logits has p = 0 and log p = -inf, 0 * -inf = nan
    return torch.where(p > 0, p * (log_p - log_x), 0.0)


def _log_mix(log_a: Tensor, weight_a: float, log_b: Tensor, weight_b: float) -> Tensor:
    """``log(weight_a * a + weight_b * b)`` for weights summing to one, exact at the ends."""
    if weight_a == 0.0:
        return log_b
    if weight_b == 0.0:
        return log_a
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log(weight_b))


def _rows_forward_kl(lq: Tensor, lp: Tensor) -> Tensor:
    return _p_log_ratio(lp.exp(), lp, lq).sum(-1)


def _rows_reverse_kl(lq: Tensor, lp: Tensor) -> Tensor:
    return _p_log_ratio(lq.exp(), lq, lp).sum(-1)


def _rows_symmetric_kl(lq: Tensor, lp: Tensor) -> Tensor:
    return _rows_forward_kl(lq, lp) + _rows_reverse_kl(lq, lp)


def _rows_generalized_jsd(lq: Tensor, lp: Tensor, beta: float) -> Tensor:
    if beta == 0.0:
        return _rows_forward_kl(lq, lp)
    if beta == 1.0:
        return _rows_reverse_kl(lq, lp)
    lm = _log_mix(lp, beta, lq, 1.0 - beta)
    return beta * _p_log_ratio(lp.exp(), lp, lm).sum(-1) + (1.0 - beta) * _p_log_ratio(lq.exp(), lq, lm).sum(-1)


def _rows_skew_kl(lq: Tensor, lp: Tensor, alpha: float) -> Tensor:
    return _p_log_ratio(lp.exp(), lp, _log_mix(lp, alpha, lq, 1.0 - alpha)).sum(-1)


def _rows_skew_reverse_kl(lq: Tensor, lp: Tensor, alpha: float) -> Tensor:
    return _p_log_ratio(lq.exp(), lq, _log_mix(lp, 1.0 - alpha, lq, alpha)).sum(-1)


def _rows_tvd(lq: Tensor, lp: Tensor) -> Tensor:
    return 0.5 * (lq.exp() - lp.exp()).abs().sum(-1)


def divergence_rows(name: str, lq: Tensor, lp: Tensor, *, beta: float = 0.5, skew_alpha: float = 0.1) -> Tensor:
    """Per-token divergence ``(n,)`` between category log-probs ``lq`` (student) and ``lp`` (teacher)."""
    if name == "forward_kl":
        return _rows_forward_kl(lq, lp)
    if name == "reverse_kl":
        return _rows_reverse_kl(lq, lp)
    if name == "symmetric_kl":
        return _rows_symmetric_kl(lq, lp)
    if name == "generalized_jsd":
        return _rows_generalized_jsd(lq, lp, beta)
    if name == "skew_kl":
        return _rows_skew_kl(lq, lp, skew_alpha)
    if name == "skew_reverse_kl":
        return _rows_skew_reverse_kl(lq, lp, skew_alpha)
    if name == "tvd":
        return _rows_tvd(lq, lp)
    raise ValueError(f"unknown divergence {name!r}; choose one of {', '.join(DIVERGENCE_NAMES)}")


def _mean_divergence(
    name: str,
    student_logits: Tensor,
    teacher_logits: TeacherArg,
    *,
    temperature: float,
    mask: Tensor | None,
    labels: Tensor | None,
    ignore_index: int,
    beta: float = 0.5,
    skew_alpha: float = 0.1,
) -> Tensor:
    _check_temperature(temperature)
    student = _flat(student_logits, "student_logits")
    n_tokens, vocab = student.shape
    teacher = as_teacher(teacher_logits)
    assert teacher is not None
    teacher = _dense_teacher_rows(teacher, vocab, n_tokens)
    valid = valid_token_mask(n_tokens, mask=mask, labels=labels, ignore_index=ignore_index, device=student.device)
    n_valid = valid.sum().clamp_min(1)
    # drop invalid rows first: padding never reaches the vocabulary-sized math
    z = upcast(student[valid]) / temperature
    teacher = _select_rows(teacher, valid)
    if name == "logit_mse":
        if not isinstance(teacher, Tensor):
            raise ValueError(
                "logit_mse compares raw logits, so it needs one dense teacher, not a top-k or ensemble one"
            )
        rows = (z - upcast(teacher) / temperature).square().mean(-1)
        return rows.sum() / n_valid
    token_ids = teacher.token_ids if isinstance(teacher, TopKTeacher) else None
    lq = student_category_log_probs(z, token_ids)
    lp = teacher_category_log_probs(teacher, temperature, vocab)
    rows = divergence_rows(name, lq, lp, beta=beta, skew_alpha=skew_alpha)
    return rows.sum() / n_valid


# --------------------------------------------------------------------------------------------
# the public family
# --------------------------------------------------------------------------------------------


def forward_kl(
    student_logits: Tensor,
    teacher_logits: TeacherArg,
    *,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    labels: Tensor | None = None,
    ignore_index: int = -100,
) -> Tensor:
    """Forward KL ``KL(p || q) = sum_v p_v (log p_v - log q_v)``, mean over valid tokens.

    The mass-covering divergence of classic KD (Hinton et al. 2015, arXiv 1503.02531), with
    ``p = softmax(teacher / T)`` and ``q = softmax(student / T)``. Returns a scalar, no T² factor.

    Args:
        student_logits: ``(N, V)`` (or ``(..., V)``).
        teacher_logits: ``(N, V)`` dense logits, a ``TopKTeacher`` or a ``TeacherEnsemble``.
        temperature: softmax temperature T > 0.
        mask: ``(N,)`` true for tokens to count.
        labels: ``(N,)``; positions equal to ``ignore_index`` are skipped.
    """
    return _mean_divergence(
        "forward_kl",
        student_logits,
        teacher_logits,
        temperature=temperature,
        mask=mask,
        labels=labels,
        ignore_index=ignore_index,
    )


def reverse_kl(
    student_logits: Tensor,
    teacher_logits: TeacherArg,
    *,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    labels: Tensor | None = None,
    ignore_index: int = -100,
) -> Tensor:
    """Reverse KL ``KL(q || p) = sum_v q_v (log q_v - log p_v)``, mean over valid tokens.

    The mode-seeking divergence MiniLLM minimises (Gu et al. 2024, arXiv 2306.08543), here applied
    per token. Shapes and arguments as in :func:`forward_kl`.
    """
    return _mean_divergence(
        "reverse_kl",
        student_logits,
        teacher_logits,
        temperature=temperature,
        mask=mask,
        labels=labels,
        ignore_index=ignore_index,
    )


def symmetric_kl(
    student_logits: Tensor,
    teacher_logits: TeacherArg,
    *,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    labels: Tensor | None = None,
    ignore_index: int = -100,
) -> Tensor:
    """Symmetric (Jeffreys) KL ``KL(p || q) + KL(q || p)``, mean over valid tokens.

    The plain sum, not the average, of :func:`forward_kl` and :func:`reverse_kl`. Shapes and
    arguments as in :func:`forward_kl`.
    """
    return _mean_divergence(
        "symmetric_kl",
        student_logits,
        teacher_logits,
        temperature=temperature,
        mask=mask,
        labels=labels,
        ignore_index=ignore_index,
    )


def generalized_jsd(
    student_logits: Tensor,
    teacher_logits: TeacherArg,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    labels: Tensor | None = None,
    ignore_index: int = -100,
) -> Tensor:
    """Generalized Jensen-Shannon divergence JSD(β) of GKD (Agarwal et al. 2024, arXiv 2306.13649, Eq. 1).

    ``JSD(β) = β KL(p || m) + (1 - β) KL(q || m)`` with ``m = β p + (1 - β) q``, p the teacher and q
    the student. Convention (as TRL's ``generalized_jsd_loss``, the widely used GKD implementation):
    the end points are special-cased to the named KLs, ``β = 0`` is exactly :func:`forward_kl` and
    ``β = 1`` exactly :func:`reverse_kl` (the formula itself tends to 0 at both ends; ``JSD(β) / β``
    tends to the forward KL as β -> 0). ``β = 0.5`` is the symmetric JSD.

    Args:
        beta: interpolation in [0, 1].
        others: as in :func:`forward_kl`.
    """
    _check_unit("beta", beta)
    return _mean_divergence(
        "generalized_jsd",
        student_logits,
        teacher_logits,
        temperature=temperature,
        mask=mask,
        labels=labels,
        ignore_index=ignore_index,
        beta=beta,
    )


def skew_kl(
    student_logits: Tensor,
    teacher_logits: TeacherArg,
    *,
    alpha: float = 0.1,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    labels: Tensor | None = None,
    ignore_index: int = -100,
) -> Tensor:
    """α-skew KL of DistiLLM (Ko et al. 2024, arXiv 2402.03898, §3.1): ``KL(p || α p + (1 - α) q)``.

    Skewing the student towards the teacher bounds the divergence and its gradient where q is
    tiny (``α = 0`` is :func:`forward_kl`; ``α = 1`` is identically 0; the paper uses α = 0.1).

    Args:
        alpha: skew in [0, 1].
        others: as in :func:`forward_kl`.
    """
    _check_unit("alpha", alpha)
    return _mean_divergence(
        "skew_kl",
        student_logits,
        teacher_logits,
        temperature=temperature,
        mask=mask,
        labels=labels,
        ignore_index=ignore_index,
        skew_alpha=alpha,
    )


def skew_reverse_kl(
    student_logits: Tensor,
    teacher_logits: TeacherArg,
    *,
    alpha: float = 0.1,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    labels: Tensor | None = None,
    ignore_index: int = -100,
) -> Tensor:
    """α-skew reverse KL of DistiLLM (arXiv 2402.03898, §3.1): ``KL(q || (1 - α) p + α q)``.

    ``α = 0`` is :func:`reverse_kl`; ``α = 1`` is identically 0.

    Args:
        alpha: skew in [0, 1].
        others: as in :func:`forward_kl`.
    """
    _check_unit("alpha", alpha)
    return _mean_divergence(
        "skew_reverse_kl",
        student_logits,
        teacher_logits,
        temperature=temperature,
        mask=mask,
        labels=labels,
        ignore_index=ignore_index,
        skew_alpha=alpha,
    )


def tvd(
    student_logits: Tensor,
    teacher_logits: TeacherArg,
    *,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    labels: Tensor | None = None,
    ignore_index: int = -100,
) -> Tensor:
    """Total variation distance ``0.5 * sum_v |q_v - p_v|`` (in [0, 1]), mean over valid tokens.

    Used as a distillation objective in f-distill (Wen et al. 2023, arXiv 2307.15190). The
    gradient at ``q_v = p_v`` is taken as 0. Shapes and arguments as in :func:`forward_kl`.
    """
    return _mean_divergence(
        "tvd",
        student_logits,
        teacher_logits,
        temperature=temperature,
        mask=mask,
        labels=labels,
        ignore_index=ignore_index,
    )


def logit_mse(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    labels: Tensor | None = None,
    ignore_index: int = -100,
) -> Tensor:
    """Mean squared error between logits, ``mean_v ((s_v - t_v) / T)²``, mean over valid tokens.

    Logit matching (Ba & Caruana 2014; Kim et al. 2021, arXiv 2105.08919). The mean over the
    vocabulary (not the sum) keeps the scale independent of V; with the T² factor of the Hinton
    mix the temperature cancels. Needs a single dense teacher.
    """
    return _mean_divergence(
        "logit_mse",
        student_logits,
        teacher_logits,
        temperature=temperature,
        mask=mask,
        labels=labels,
        ignore_index=ignore_index,
    )


DIVERGENCES: dict[str, Callable[..., Tensor]] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "symmetric_kl": symmetric_kl,
    "generalized_jsd": generalized_jsd,
    "skew_kl": skew_kl,
    "skew_reverse_kl": skew_reverse_kl,
    "tvd": tvd,
    "logit_mse": logit_mse,
}


def divergence_kwargs(name: str, *, beta: float, skew_alpha: float) -> dict[str, Any]:
    """The paper-named parameter a divergence in :data:`DIVERGENCES` takes, if any."""
    if name == "generalized_jsd":
        return {"beta": beta}
    if name in ("skew_kl", "skew_reverse_kl"):
        return {"alpha": skew_alpha}
    if name not in DIVERGENCES:
        raise ValueError(f"unknown divergence {name!r}; choose one of {', '.join(DIVERGENCE_NAMES)}")
    return {}


# --------------------------------------------------------------------------------------------
# hard labels and the Hinton soft/hard mix
# --------------------------------------------------------------------------------------------


def cross_entropy(
    student_logits: Tensor,
    labels: Tensor,
    *,
    mask: Tensor | None = None,
    ignore_index: int = -100,
) -> Tensor:
    """Hard-label cross-entropy at T = 1, mean over valid tokens; ``(N, V)`` logits, ``(N,)`` labels."""
    student = _flat(student_logits, "student_logits")
    valid = valid_token_mask(
        student.shape[0], mask=mask, labels=labels, ignore_index=ignore_index, device=student.device
    )
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


def check_mix(teacher_given: bool, labels: Tensor | None, alpha: float, divergence: str, temperature: float) -> None:
    _check_temperature(temperature)
    _check_unit("alpha", alpha)
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; choose one of {', '.join(DIVERGENCE_NAMES)}")
    if not teacher_given and labels is None:
        raise ValueError("without a teacher the loss is cross-entropy, which needs labels")
    if teacher_given and alpha < 1.0 and labels is None:
        raise ValueError(
            f"alpha={alpha} puts weight {1 - alpha:g} on the hard-label term, which needs labels; "
            "pass labels or set alpha=1"
        )


def distill_loss(
    student_logits: Tensor,
    teacher_logits: TeacherArg | None = None,
    *,
    labels: Tensor | None = None,
    mask: Tensor | None = None,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    alpha: float = 0.5,
    beta: float = 0.5,
    skew_alpha: float = 0.1,
    ignore_index: int = -100,
    teacher_weights: Sequence[float] | None = None,
    compute_agreement: bool = False,
) -> DistillLossParts:
    """The Hinton soft/hard mix on full logits (the plain reference for the chunked path).

    ``loss = alpha * T² * D_T(student, teacher) + (1 - alpha) * CE(student, labels)`` where ``D_T``
    is ``DIVERGENCES[divergence]`` at temperature T (Hinton et al. 2015: the T² keeps the soft
    term's gradient scale independent of T). Without a teacher the loss is the cross-entropy alone.

    Args:
        student_logits: ``(N, V)`` (or ``(..., V)``).
        teacher_logits: dense ``(N, V)``, a ``TopKTeacher``, a ``TeacherEnsemble``, a list of dense
            teachers (mixed with ``teacher_weights``), or None.
        labels: ``(N,)`` hard targets, ``ignore_index`` marks tokens to skip everywhere.
        mask: ``(N,)`` optional extra validity mask.
        divergence: a key of :data:`DIVERGENCES`.
        alpha: weight of the soft term in [0, 1].
        beta, skew_alpha: the JSD's β and the skew divergences' α.
    """
    teacher = as_teacher(teacher_logits, teacher_weights)
    check_mix(teacher is not None, labels, alpha, divergence, temperature)
    student = _flat(student_logits, "student_logits")
    valid = valid_token_mask(
        student.shape[0], mask=mask, labels=labels, ignore_index=ignore_index, device=student.device
    )
    num_tokens = valid.sum()
    zero = student.new_zeros((), dtype=torch.float32)
    ce = cross_entropy(student, labels, mask=mask, ignore_index=ignore_index) if labels is not None else None
    if teacher is None:
        assert ce is not None
        return DistillLossParts(ce, zero, ce.detach(), None, num_tokens)
    fn = DIVERGENCES[divergence]
    kd = fn(
        student,
        teacher,
        temperature=temperature,
        mask=mask,
        labels=labels,
        ignore_index=ignore_index,
        **divergence_kwargs(divergence, beta=beta, skew_alpha=skew_alpha),
    )
    loss = alpha * temperature**2 * kd
    if ce is not None and alpha < 1.0:
        loss = loss + (1.0 - alpha) * ce
    agreement = None
    if compute_agreement:
        with torch.no_grad():
            flat_teacher = _select_rows(_dense_teacher_rows(teacher, student.shape[1], student.shape[0]), valid)
            same = student[valid].argmax(-1) == teacher_argmax(flat_teacher, temperature)
            agreement = same.float().sum() / num_tokens.clamp_min(1)
    return DistillLossParts(loss, kd.detach(), zero if ce is None else ce.detach(), agreement, num_tokens)
