"""The teacher's signal as one type: what every distillation loss compares the student against.

A :class:`TeacherSignal` is one of four variants, all frozen dataclasses:

* :class:`DenseLogits` -- ``logits (N, V)``;
* :class:`HiddenHead` -- the teacher's final ``hidden (N, H_t)`` states and its head ``weight (V, H_t)``
  (and ``bias (V,)``): its logits are computed rows at a time, so the chunked path never holds
  ``(N, V)`` of them;
* :class:`TopKTeacher` -- a sparse distribution: per position the top-k ``token_ids (N, k)``, their
  ``log_probs (N, k)`` and the ``residual (N,)`` mass left over (what a teacher-signal store keeps);
* :class:`TeacherEnsemble` -- dense members (logits or hidden + head) mixed as
  ``p = sum_k w_k softmax(t_k / T)``.

Every variant answers the same question for any subset of its rows (:meth:`TeacherSignal.rows`):
its log-probabilities over *categories* at temperature T (:meth:`~TeacherSignal.category_log_probs`).
For a dense teacher the categories are the V tokens; for a top-k teacher they are the k listed
tokens plus, when k < V, one "tail" category holding everything else (the student is aggregated
onto the same categories, :func:`mydistill.losses.table.student_category_log_probs`), so each
divergence is computed on a proper pair of distributions. The plain path asks once for all valid
rows; the chunked path asks per chunk, writing into a reused ``(chunk, V)`` buffer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

# Smallest tail mass we keep for a top-k teacher with k < V: a residual of exactly zero would make
# reverse-type divergences infinite as soon as the student puts any mass outside the top-k.
MIN_RESIDUAL = 1e-12

Rows = Tensor | slice


def upcast(x: Tensor) -> Tensor:
    """fp32 for half/bfloat16/fp32 inputs; fp64 stays fp64 (tests use it for tight checks)."""
    return x if x.dtype == torch.float64 else x.float()


def work_dtype(x: Tensor) -> torch.dtype:
    """The dtype vocabulary-sized math runs in for inputs like ``x``: fp32, or fp64 for fp64."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


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


def _check_positions(which: str, rows: int, n_tokens: int) -> None:
    if rows != n_tokens:
        raise ValueError(f"{which} has {rows} positions but the student has {n_tokens}; they must align token by token")


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


def linear_into(x: Tensor, weight: Tensor, bias: Tensor | None, out: Tensor) -> Tensor:
    """``out[:] = x @ weight.T + bias``: the matmul in the weight's dtype (fp32 accumulation), ``out`` fp32."""
    if x.dtype == weight.dtype == out.dtype:
        torch.mm(x, weight.t(), out=out)
    else:
        out.copy_(x.to(weight.dtype) @ weight.t())  # a (rows, V) low-precision temporary, one chunk at most
    if bias is not None:
        out.add_(bias)
    return out


class TeacherSignal:
    """Base of the four variants (see the module docstring); a loss accepts any of them."""

    def checked(self, n_tokens: int, vocab: int, which: str = "the teacher") -> TeacherSignal:
        """Flattened to ``(N, ...)``, detached (the teacher is a constant) and checked against N and V."""
        raise NotImplementedError

    def rows(self, index: Rows) -> TeacherSignal:
        """The same signal for a subset of (flattened) positions: boolean mask, index tensor or slice."""
        raise NotImplementedError

    def category_log_probs(self, temperature: float, vocab: int, out: Tensor | None = None) -> Tensor:
        """Teacher log-probs over the categories at ``temperature``, fp32: ``(n, V)`` or ``(n, k [+ 1])``.

        ``out`` (dense variants only): a ``(n, V)`` buffer to write into instead of allocating.
        """
        raise NotImplementedError

    def category_ids(self) -> Tensor | None:
        """``(n, k)`` token ids of the listed categories; None when the categories are the V tokens."""
        return None

    def top1(self, category_log_probs: Tensor) -> Tensor:
        """The teacher's most likely token per row, given its :meth:`category_log_probs`."""
        return category_log_probs.argmax(dim=-1)

    def scaled_logits(self, temperature: float, out: Tensor | None = None) -> Tensor:
        """Raw logits / T ``(n, V)``, fp32 (what ``logit_mse`` compares); one dense teacher only."""
        raise ValueError("logit_mse compares raw logits, so it needs one dense teacher, not a top-k or ensemble one")


class _Dense(TeacherSignal):
    """Shared by the two dense variants: log-probs are the log-softmax of ``logits / T``."""

    def _logits_into(self, out: Tensor | None) -> Tensor:
        raise NotImplementedError

    def scaled_logits(self, temperature: float, out: Tensor | None = None) -> Tensor:
        x = self._logits_into(out)
        return x if temperature == 1.0 else x.mul_(1.0 / temperature)

    def category_log_probs(self, temperature: float, vocab: int, out: Tensor | None = None) -> Tensor:
        x = self.scaled_logits(temperature, out)
        return x.sub_(torch.logsumexp(x, dim=-1, keepdim=True))


@dataclass(frozen=True)
class DenseLogits(_Dense):
    """A dense teacher given as logits ``(..., V)``."""

    logits: Tensor

    def checked(self, n_tokens: int, vocab: int, which: str = "the teacher") -> DenseLogits:
        if self.logits.dim() < 2:
            raise ValueError(f"{which}'s logits must have shape (N, V) or (..., V), got {tuple(self.logits.shape)}")
        flat = self.logits.detach().reshape(-1, self.logits.shape[-1])
        check_vocab(vocab, flat.shape[-1], which=which)
        _check_positions(f"{which}'s logits", flat.shape[0], n_tokens)
        return DenseLogits(flat)

    def rows(self, index: Rows) -> DenseLogits:
        return DenseLogits(self.logits[index])

    def _logits_into(self, out: Tensor | None) -> Tensor:
        if out is None:
            return upcast(self.logits).clone()  # a copy: the caller scales it in place
        return out.copy_(self.logits)


@dataclass(frozen=True)
class HiddenHead(_Dense):
    """A dense teacher given as final hidden states ``(..., H_t)`` and head ``(V, H_t)`` (+ bias ``(V,)``)."""

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None = None

    def checked(self, n_tokens: int, vocab: int, which: str = "the teacher") -> HiddenHead:
        check_vocab(vocab, self.weight.shape[0], which=which)
        flat = self.hidden.detach().reshape(-1, self.hidden.shape[-1])
        _check_positions(f"{which}'s hidden states", flat.shape[0], n_tokens)
        if self.weight.dim() != 2 or self.weight.shape[1] != flat.shape[1]:
            raise ValueError(
                f"{which}'s head weight is {tuple(self.weight.shape)} but its hidden states have width {flat.shape[1]}"
            )
        bias = None if self.bias is None else self.bias.detach()
        return HiddenHead(flat, self.weight.detach(), bias)

    def rows(self, index: Rows) -> HiddenHead:
        return HiddenHead(self.hidden[index], self.weight, self.bias)

    def _logits_into(self, out: Tensor | None) -> Tensor:
        if out is None:
            out = self.hidden.new_empty(self.hidden.shape[0], self.weight.shape[0], dtype=work_dtype(self.weight))
        return linear_into(self.hidden, self.weight, self.bias, out)


@dataclass(frozen=True)
class TopKTeacher(TeacherSignal):
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
        residual = None if self.residual is None else self.residual.reshape(-1)
        return TopKTeacher(self.token_ids.reshape(-1, self.k), self.log_probs.reshape(-1, self.k), residual)

    def checked(self, n_tokens: int, vocab: int, which: str = "the top-k teacher") -> TopKTeacher:
        flat = self.flatten()
        _check_positions(which, flat.token_ids.shape[0], n_tokens)
        if flat.k > vocab:
            raise ValueError(f"{which} lists k={flat.k} tokens but the student vocabulary has {vocab}")
        residual = None if flat.residual is None else flat.residual.detach()
        return TopKTeacher(flat.token_ids, flat.log_probs.detach(), residual)

    def rows(self, index: Rows) -> TopKTeacher:
        residual = None if self.residual is None else self.residual[index]
        return TopKTeacher(self.token_ids[index], self.log_probs[index], residual)

    def residual_mass(self) -> Tensor:
        if self.residual is not None:
            return upcast(self.residual)
        return (-torch.expm1(torch.logsumexp(upcast(self.log_probs), dim=-1))).clamp_min(0.0)

    def category_log_probs(self, temperature: float, vocab: int, out: Tensor | None = None) -> Tensor:
        """The k listed tokens in ``token_ids`` order, then (only when ``k < vocab``) the tail.

        Rows are renormalised, so a cache whose stored masses do not add up to exactly one is still
        a proper distribution. ``out`` is ignored: these are ``(n, k + 1)``, small.
        """
        if self.k > vocab:
            raise ValueError(f"TopKTeacher has k={self.k} tokens per position but the vocabulary has only {vocab}")
        scaled = upcast(self.log_probs) / temperature
        if self.k < vocab:
            n_tail = vocab - self.k
            log_r = self.residual_mass().clamp_min(MIN_RESIDUAL).log()
            tail = log_r / temperature + (1.0 - 1.0 / temperature) * math.log(n_tail)
            scaled = torch.cat([scaled, tail.unsqueeze(-1)], dim=-1)
        return scaled - torch.logsumexp(scaled, dim=-1, keepdim=True)

    def category_ids(self) -> Tensor:
        return self.token_ids.long()

    def top1(self, category_log_probs: Tensor) -> Tensor:
        return self.argmax_ids()

    def argmax_ids(self) -> Tensor:
        """The teacher's most likely token per position: ``(N,)``."""
        return self.token_ids.gather(-1, self.log_probs.argmax(dim=-1, keepdim=True)).squeeze(-1)


@dataclass(frozen=True)
class TeacherEnsemble(TeacherSignal):
    """Several dense teachers mixed as ``p = sum_k w_k softmax(t_k / T)`` (weights normalised).

    Attributes:
        members: one dense teacher each: a logits tensor ``(..., V)``, :class:`DenseLogits` or
            :class:`HiddenHead`; all must share the student's V.
        weights: one positive weight per teacher, ``None`` for equal weights.
    """

    members: Sequence[Tensor | DenseLogits | HiddenHead]
    weights: Sequence[float] | None = None

    def __post_init__(self) -> None:
        if len(self.members) == 0:
            raise ValueError("TeacherEnsemble needs at least one teacher")
        members = tuple(DenseLogits(m) if isinstance(m, Tensor) else m for m in self.members)
        if not all(isinstance(m, _Dense) for m in members):
            raise TypeError("a TeacherEnsemble mixes dense teachers: logits tensors, DenseLogits or HiddenHead")
        object.__setattr__(self, "members", members)
        normalized_weights(self.weights, len(members))  # validates early

    def checked(self, n_tokens: int, vocab: int, which: str = "the teacher") -> TeacherEnsemble:
        return TeacherEnsemble(
            [m.checked(n_tokens, vocab, which=f"teacher {i} of the ensemble") for i, m in enumerate(self.members)],
            self.weights,
        )

    def rows(self, index: Rows) -> TeacherEnsemble:
        return TeacherEnsemble([m.rows(index) for m in self.members], self.weights)  # type: ignore[union-attr]

    def category_log_probs(self, temperature: float, vocab: int, out: Tensor | None = None) -> Tensor:
        """``log sum_k w_k p_k``, one teacher at a time, so memory does not grow with their number."""
        acc = scratch = None
        for member, weight in zip(self.members, normalized_weights(self.weights, len(self.members)), strict=True):
            assert isinstance(member, _Dense)
            if acc is None:
                acc = member.category_log_probs(temperature, vocab, out).add_(math.log(weight))
            else:
                scratch = member.category_log_probs(temperature, vocab, scratch).add_(math.log(weight))
                torch.logaddexp(acc, scratch, out=acc)
        assert acc is not None
        return acc


def as_signal(teacher: Any) -> TeacherSignal | None:
    """Accept a :class:`TeacherSignal`, a logits tensor, or a list of dense teachers (equal weights)."""
    if teacher is None or isinstance(teacher, TeacherSignal):
        return teacher
    if isinstance(teacher, Tensor):
        return DenseLogits(teacher)
    return TeacherEnsemble(list(teacher))


def teacher_from_parts(
    *,
    logits: Tensor | Sequence[Tensor] | None = None,
    hidden: Tensor | Sequence[Tensor] | None = None,
    head_weight: Tensor | Sequence[Tensor] | None = None,
    head_bias: Tensor | Sequence[Tensor | None] | None = None,
    topk: TopKTeacher | None = None,
    weights: Sequence[float] | None = None,
) -> TeacherSignal | None:
    """One :class:`TeacherSignal` from the trainer's keyword form (lists for several teachers).

    A teacher whose weight is 0 is left out, so ``weights=[1, 0]`` is the first teacher alone, bit
    for bit. A top-k signal arrives already combined (a store mixes its teachers), so ``weights``
    does not apply to it.
    """
    given = [name for name, value in (("logits", logits), ("hidden", hidden), ("topk", topk)) if value is not None]
    if len(given) > 1:
        raise ValueError(f"give one teacher signal, got {' and '.join(f'teacher_{n}' for n in given)}")
    if head_weight is not None and hidden is None:
        raise ValueError("teacher_head_weight (the teacher's head) needs teacher_hidden, its final hidden states")
    if topk is not None or not given:
        return topk
    members: list[Tensor | DenseLogits | HiddenHead]
    if hidden is not None:
        hiddens = [hidden] if isinstance(hidden, Tensor) else list(hidden)
        heads = [] if head_weight is None else [head_weight] if isinstance(head_weight, Tensor) else list(head_weight)
        if len(heads) != len(hiddens):
            raise ValueError(
                f"got {len(hiddens)} teacher hidden-state tensors but {len(heads)} teacher head weights; "
                "give one head per teacher"
            )
        if head_bias is None:
            biases: list[Tensor | None] = [None] * len(hiddens)
        else:
            biases = [head_bias] if isinstance(head_bias, Tensor) else list(head_bias)
        members = [HiddenHead(h, w, b) for h, w, b in zip(hiddens, heads, biases, strict=True)]
    else:
        members = [logits] if isinstance(logits, Tensor) else list(logits)  # type: ignore[list-item]
    if weights is not None:
        if len(weights) != len(members):
            raise ValueError(f"got {len(weights)} teacher weights for {len(members)} teachers; give one per teacher")
        members = [m for m, w in zip(members, weights, strict=True) if w > 0]
        weights = [w for w in weights if w > 0]
    if len(members) == 1:
        return DenseLogits(members[0]) if isinstance(members[0], Tensor) else members[0]
    return TeacherEnsemble(members, weights)

