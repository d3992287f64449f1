"""Teacher signals the losses accept besides one dense ``(N, V)`` logits tensor.

* :class:`TopKTeacher` -- a sparse teacher: per position the top-k token ids, their log-probs
  and the probability mass left over (what a teacher-signal cache stores; k = V is lossless).
* :class:`TeacherEnsemble` -- several teachers mixed as a weighted average of probabilities.

Both losses paths (plain and chunked) turn a teacher into *category* log-probs at a temperature:
for a dense teacher the categories are the V tokens; for a top-k teacher they are the k listed
tokens plus, when k < V, one "tail" category holding everything else. The student distribution
is aggregated onto the same categories, so every divergence is computed on a proper pair of
distributions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

# Smallest tail mass we keep for a top-k teacher with k < V: a residual of exactly zero would make
# reverse-type divergences infinite as soon as the student puts any mass outside the top-k.
MIN_RESIDUAL = 1e-12


def upcast(x: Tensor) -> Tensor:
    """fp32 for half/bfloat16/fp32 inputs; fp64 stays fp64 (tests use it for tight checks)."""
    return x if x.dtype == torch.float64 else x.float()


class VocabSizeMismatch(ValueError):
    """A teacher's output vocabulary is not the student's."""


def check_vocab(student_vocab: int, teacher_vocab: int, *, which: str = "the teacher") -> None:
    """Raise :class:`VocabSizeMismatch` unless ``teacher_vocab == student_vocab``."""
    if teacher_vocab != student_vocab:
        raise VocabSizeMismatch(
            f"{which} has a vocabulary of {teacher_vocab} tokens but the student has {student_vocab}; "
            "logit distillation compares distributions token id by token id, so every teacher must "
            "share the student's vocabulary (same tokenizer and the same output-head size; pad or "
            "slice the head so both have the same V)."
        )


@dataclass(frozen=True)
class TopKTeacher:
    """A sparse teacher distribution: the k most likely tokens per position and the rest's mass.

    Attributes:
        token_ids: ``(..., k)`` int64, distinct token ids per position (any order).
        log_probs: ``(..., k)`` the teacher's log-probabilities of those tokens at temperature 1.
        residual: ``(...,)`` probability mass outside the top-k; ``None`` computes it as
            ``1 - sum(exp(log_probs))``.

    Tempering a truncated distribution needs an assumption about how the residual is spread; we
    take the maximum-entropy one (evenly over the ``V - k`` unlisted tokens), so the tail category's
    mass at temperature T is proportional to ``(V - k) * (residual / (V - k)) ** (1 / T)``. At
    ``T = 1`` no assumption is made, and with ``k = V`` the result equals the dense teacher exactly.
    """

    token_ids: Tensor
    log_probs: Tensor
    residual: Tensor | None = None

    def __post_init__(self) -> None:
        if self.token_ids.shape != self.log_probs.shape:
            raise ValueError(
                f"TopKTeacher: token_ids {tuple(self.token_ids.shape)} and log_probs "
                f"{tuple(self.log_probs.shape)} must have the same shape (..., k)"
            )
        if self.token_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"TopKTeacher: token_ids must be int64 (or int32), got {self.token_ids.dtype}")
        if self.residual is not None and self.residual.shape != self.token_ids.shape[:-1]:
            raise ValueError(
                f"TopKTeacher: residual {tuple(self.residual.shape)} must have shape "
                f"{tuple(self.token_ids.shape[:-1])} (one mass per position)"
            )

    @classmethod
    def from_logits(cls, logits: Tensor, k: int) -> TopKTeacher:
        """Keep the top-``k`` of dense ``(..., V)`` teacher logits (what a cache would store)."""
        log_probs = torch.log_softmax(upcast(logits), dim=-1)
        top, ids = log_probs.topk(min(k, logits.shape[-1]), dim=-1)
        # 1 - sum(p_top) computed as -expm1(logsumexp) keeps precision when the residual is tiny
        residual = (-torch.expm1(torch.logsumexp(top, dim=-1))).clamp_min(0.0)
        return cls(token_ids=ids, log_probs=top, residual=residual)

    @property
    def k(self) -> int:
        return self.token_ids.shape[-1]

    def flatten(self) -> TopKTeacher:
        """View with all leading dimensions folded into one: ``(N, k)``."""
        return TopKTeacher(
            self.token_ids.reshape(-1, self.k),
            self.log_probs.reshape(-1, self.k),
            None if self.residual is None else self.residual.reshape(-1),
        )

    def rows(self, index: Tensor | slice) -> TopKTeacher:
        """Select positions of a flattened teacher (boolean mask, index tensor or slice)."""
        return TopKTeacher(
            self.token_ids[index],
            self.log_probs[index],
            None if self.residual is None else self.residual[index],
        )

    def residual_mass(self) -> Tensor:
        if self.residual is not None:
            return upcast(self.residual)
        return (-torch.expm1(torch.logsumexp(upcast(self.log_probs), dim=-1))).clamp_min(0.0)

    def category_log_probs(self, temperature: float, vocab_size: int) -> Tensor:
        """Teacher log-probs over the categories at ``temperature``: ``(N, k)`` or ``(N, k + 1)``.

        The first k columns are the listed tokens in ``token_ids`` order; the extra last column,
        present only when ``k < vocab_size``, is the tail. Rows are renormalised, so a cache whose
        stored masses do not add up to exactly one is still a proper distribution.
        """
        if self.k > vocab_size:
            raise ValueError(f"TopKTeacher has k={self.k} tokens per position but the vocabulary has only {vocab_size}")
        scaled = upcast(self.log_probs) / temperature
        if self.k < vocab_size:
            n_tail = vocab_size - self.k
            log_r = self.residual_mass().clamp_min(MIN_RESIDUAL).log()
            tail = log_r / temperature + (1.0 - 1.0 / temperature) * math.log(n_tail)
            scaled = torch.cat([scaled, tail.unsqueeze(-1)], dim=-1)
        return scaled - torch.logsumexp(scaled, dim=-1, keepdim=True)

    def argmax_ids(self) -> Tensor:
        """The teacher's most likely token per position: ``(N,)``."""
        return self.token_ids.gather(-1, self.log_probs.argmax(dim=-1, keepdim=True)).squeeze(-1)


@dataclass(frozen=True)
class TeacherEnsemble:
    """Several dense teachers mixed as ``p = sum_k w_k softmax(t_k / T)`` (weights normalised).

    Attributes:
        logits: one ``(..., V)`` logits tensor per teacher; all must share the student's V.
        weights: one positive weight per teacher, ``None`` for equal weights.
    """

    logits: Sequence[Tensor]
    weights: Sequence[float] | None = None

    def __post_init__(self) -> None:
        if len(self.logits) == 0:
            raise ValueError("TeacherEnsemble needs at least one teacher")
        normalized_weights(self.weights, len(self.logits))  # validates early


def normalized_weights(weights: Sequence[float] | None, n_teachers: int) -> list[float]:
    """Per-teacher weights scaled to sum to one; equal weights when ``weights`` is None."""
    if weights is None:
        return [1.0 / n_teachers] * n_teachers
    weights = [float(w) for w in weights]
    if len(weights) != n_teachers:
        raise ValueError(f"got {len(weights)} teacher weights for {n_teachers} teachers; give one weight per teacher")
    if any(not math.isfinite(w) or w <= 0 for w in weights):
        raise ValueError(f"teacher weights must be positive finite numbers, got {weights}")
    total = sum(weights)
    return [w / total for w in weights]


def mixture_log_probs(teacher_logits: Sequence[Tensor], weights: Sequence[float], temperature: float) -> Tensor:
    """``log sum_k w_k softmax(t_k / T)`` for ``(N, V)`` teacher logits, in fp32 (fp64 stays): ``(N, V)``."""
    acc: Tensor | None = None
    for logits, weight in zip(teacher_logits, weights, strict=True):
        term = torch.log_softmax(upcast(logits) / temperature, dim=-1) + math.log(weight)
        acc = term if acc is None else torch.logaddexp(acc, term)
    assert acc is not None
    return acc
