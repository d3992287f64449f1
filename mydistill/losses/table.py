"""The one table of divergences: each written once, on category log-probs, for every loss path.

A :class:`Divergence` row holds the per-token math ``rows(lq, lp, param) -> (n,)``, where ``lq`` and
``lp`` are the student's and the teacher's log-probabilities over the same categories at
temperature T (the V tokens, or a top-k teacher's k tokens plus a tail; see
:mod:`mydistill.losses.teacher_signal`). The paths use it the same way:

* plain (:mod:`mydistill.losses.divergences`): ``rows`` on all valid tokens, autograd for the gradients;
* chunked (:mod:`mydistill.losses.chunked`): ``rows`` on one chunk, its gradient w.r.t. the scaled
  logits by autograd on that chunk (:func:`rows_and_grad`), pushed into the head;
* top-k: the same ``rows`` on ``k + 1`` categories, for both paths.

One row carries a hand-fused form besides: ``forward_kl`` (the default and the benchmarked case),
rows and gradient in place over the chunk's buffers (one buffer fewer than autograd needs and no
temporaries: ``benchmarks/kd_loss.py --unfused`` measures what it saves). The tests hold it equal
to autograd of the same row.

Conventions: p is the teacher, q the student; ``0 * log 0 = 0`` so a teacher with ``-inf`` logits
(p = 0) keeps forward-type divergences finite; GKD's end points ``beta in {0, 1}`` are exactly the
named KLs (as TRL's ``generalized_jsd_loss``); DistiLLM's ``alpha = 1`` is identically 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import get_args

import torch
from torch import Tensor

from mydistill.config.losses import Divergence as DivergenceName

RowsFn = Callable[[Tensor, Tensor, float], Tensor]
FusedFn = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]

DIVERGENCE_NAMES: tuple[str, ...] = get_args(DivergenceName)  # the config's list of names is the one list
AUTOGRAD_BLOCKS = 8  # row blocks per chunk for the autograd-derived gradients (see rows_and_grad)


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


def _forward_kl(lq: Tensor, lp: Tensor, _: float) -> Tensor:
    return _p_log_ratio(lp.exp(), lp, lq).sum(-1)


def _reverse_kl(lq: Tensor, lp: Tensor, _: float) -> Tensor:
    return _p_log_ratio(lq.exp(), lq, lp).sum(-1)


def _symmetric_kl(lq: Tensor, lp: Tensor, _: float) -> Tensor:
    return _forward_kl(lq, lp, 0.0) + _reverse_kl(lq, lp, 0.0)


def _generalized_jsd(lq: Tensor, lp: Tensor, beta: float) -> Tensor:
    if beta == 0.0:
        return _forward_kl(lq, lp, 0.0)
    if beta == 1.0:
        return _reverse_kl(lq, lp, 0.0)
    lm = _log_mix(lp, beta, lq, 1.0 - beta)
    return beta * _p_log_ratio(lp.exp(), lp, lm).sum(-1) + (1.0 - beta) * _p_log_ratio(lq.exp(), lq, lm).sum(-1)


def _skew_kl(lq: Tensor, lp: Tensor, alpha: float) -> Tensor:
    return _p_log_ratio(lp.exp(), lp, _log_mix(lp, alpha, lq, 1.0 - alpha)).sum(-1)


def _skew_reverse_kl(lq: Tensor, lp: Tensor, alpha: float) -> Tensor:
    return _p_log_ratio(lq.exp(), lq, _log_mix(lp, 1.0 - alpha, lq, alpha)).sum(-1)


def _tvd(lq: Tensor, lp: Tensor, _: float) -> Tensor:
    return 0.5 * (lq.exp() - lp.exp()).abs().sum(-1)


def _logit_mse(z: Tensor, t: Tensor, _: float) -> Tensor:
    # on scaled logits z = s / T and t / T, not log-probs (the row's ``on_logits``)
    return (z - t).square().mean(-1)


def softmax_lse_(x: Tensor, out: Tensor) -> Tensor:
    """Row logsumexp ``(c, 1)`` of ``x``, leaving ``softmax(x)`` in ``out``; no (c, V) temporary."""
    m = x.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    s = torch.sub(x, m, out=out).exp_().sum(dim=-1, keepdim=True)
    out.div_(s)
    return m + s.log()


def _forward_kl_fused(z: Tensor, lp: Tensor, scratch: Tensor) -> tuple[Tensor, Tensor]:
    """``forward_kl`` rows and ``d rows / d z`` for a dense teacher, in place over three ``(c, V)`` buffers.

    ``z`` (scaled student logits), ``lp`` (teacher log-probs) and ``scratch`` are overwritten; the
    gradient is returned in ``scratch``. With ``u = dD/d(log q) = -p`` the softmax Jacobian gives
    ``d/dz = u - q sum(u) = q sum(p) - p``.
    """
    lq = z.sub_(softmax_lse_(z, scratch))  # scratch holds q
    d = torch.sub(lp, lq, out=z)  # log p - log q
    p = lp.exp_()
    rows = d.mul_(p).nan_to_num_(nan=0.0, posinf=math.inf, neginf=-math.inf).sum(-1)  # 0 * log 0 = 0
    return rows, scratch.mul_(p.sum(-1, keepdim=True)).sub_(p)


@dataclass(frozen=True)
class Divergence:
    """One row of the table: a divergence's per-token math and how the loss paths call it.

    Attributes:
        name: the config's name (``distill.loss.divergence``).
        rows: ``(lq, lp, param) -> (n,)`` per-token divergence, no T².
        summary: the formula and its source (the public function's docstring).
        param: the paper's name of its one parameter (``beta``, ``alpha``), None if it has none.
        default: that parameter's default.
        on_logits: ``rows`` compares scaled logits, not log-probs (``logit_mse``: one dense teacher).
        fused: optional hand-fused ``(z, lp, scratch) -> (rows, d/dz)`` for a dense teacher.
    """

    name: str
    rows: RowsFn
    summary: str
    param: str | None = None
    default: float = 0.0
    on_logits: bool = False
    fused: FusedFn | None = None


DIVERGENCE_TABLE: dict[str, Divergence] = {
    d.name: d
    for d in (
        Divergence(
            "forward_kl",
            _forward_kl,
            "Forward KL ``KL(p || q) = sum_v p_v (log p_v - log q_v)``: the mass-covering divergence of classic "
            "KD (Hinton et al. 2015, arXiv 1503.02531).",
            fused=_forward_kl_fused,
        ),
        Divergence(
            "reverse_kl",
            _reverse_kl,
            "Reverse KL ``KL(q || p) = sum_v q_v (log q_v - log p_v)``: the mode-seeking divergence MiniLLM "
            "minimises (Gu et al. 2024, arXiv 2306.08543), here per token.",
        ),
        Divergence(
            "symmetric_kl",
            _symmetric_kl,
            "Symmetric (Jeffreys) KL ``KL(p || q) + KL(q || p)``: the sum, not the mean, of the two KLs.",
        ),
        Divergence(
            "generalized_jsd",
            _generalized_jsd,
            "Generalized JSD of GKD (Agarwal et al. 2024, arXiv 2306.13649, Eq. 1): ``beta KL(p || m) + "
            "(1 - beta) KL(q || m)``, ``m = beta p + (1 - beta) q``, beta in [0, 1]. As TRL's "
            "``generalized_jsd_loss``, ``beta = 0`` is exactly forward_kl and ``beta = 1`` exactly reverse_kl "
            "(the formula itself tends to 0 at both ends); 0.5 is the symmetric JSD.",
            param="beta",
            default=0.5,
        ),
        Divergence(
            "skew_kl",
            _skew_kl,
            "alpha-skew KL of DistiLLM (Ko et al. 2024, arXiv 2402.03898, §3.1): ``KL(p || alpha p + (1 - alpha) "
            "q)``, alpha in [0, 1]; bounded where q is tiny. ``alpha = 0`` is forward_kl, 1 is identically 0; the "
            "paper uses 0.1.",
            param="alpha",
            default=0.1,
        ),
        Divergence(
            "skew_reverse_kl",
            _skew_reverse_kl,
            "alpha-skew reverse KL of DistiLLM (arXiv 2402.03898, §3.1): ``KL(q || (1 - alpha) p + alpha q)``, "
            "alpha in [0, 1]; ``alpha = 0`` is reverse_kl, 1 is identically 0.",
            param="alpha",
            default=0.1,
        ),
        Divergence(
            "tvd",
            _tvd,
            "Total variation ``0.5 sum_v |q_v - p_v|`` (in [0, 1]), as used by f-distill (Wen et al. 2023, "
            "arXiv 2307.15190); its gradient at ``q_v = p_v`` is taken as 0.",
        ),
        Divergence(
            "logit_mse",
            _logit_mse,
            "Logit matching ``mean_v ((s_v - t_v) / T)^2`` (Ba & Caruana 2014; Kim et al. 2021, arXiv 2105.08919); "
            "the mean over V keeps the scale independent of V, and the T² of the mix cancels T. One dense teacher.",
            on_logits=True,
        ),
    )
}
assert tuple(DIVERGENCE_TABLE) == DIVERGENCE_NAMES


def lookup(name: str) -> Divergence:
    if name not in DIVERGENCE_TABLE:
        raise ValueError(f"unknown divergence {name!r}; choose one of {', '.join(DIVERGENCE_NAMES)}")
    return DIVERGENCE_TABLE[name]


def check_unit(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def student_category_log_probs(z: Tensor, token_ids: Tensor | None) -> Tensor:
    """Student log-probs over the teacher's categories from scaled logits ``z = s / T``: ``(n, K)``.

    Dense (``token_ids`` None): ``log_softmax(z)`` over V. Top-k: the k listed tokens, then (when
    k < V) the tail ``log sum_{j not listed} q_j``.
    """
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    if token_ids is None:
        return z - lse
    top = z.gather(-1, token_ids) - lse
    if token_ids.shape[-1] == z.shape[-1]:
        return top
    tail = torch.logsumexp(z.scatter(-1, token_ids, float("-inf")), dim=-1, keepdim=True) - lse
    return torch.cat([top, tail], dim=-1)


def divergence_rows(divergence: Divergence, z: Tensor, teacher: Tensor, token_ids: Tensor | None, param: float) -> Tensor:
    """Per-token divergence ``(n,)`` from scaled student logits ``z (n, V)`` and the teacher's side.

    ``teacher`` is the teacher's category log-probs, or its scaled logits for an ``on_logits`` row.
    """
    lq = z if divergence.on_logits else student_category_log_probs(z, token_ids)
    return divergence.rows(lq, teacher, param)


def rows_and_grad(
    divergence: Divergence, z: Tensor, teacher: Tensor, token_ids: Tensor | None, param: float, out: Tensor
) -> tuple[Tensor, Tensor]:
    """:func:`divergence_rows` of one chunk and its gradient w.r.t. ``z`` (written into ``out``), by autograd.

    Autograd keeps ten or so ``z``-sized intermediates; running it on blocks of an eighth of the rows
    keeps them near one chunk buffer in all, whatever the divergence.
    """
    rows = z.new_empty(z.shape[0])
    block = -(-z.shape[0] // AUTOGRAD_BLOCKS)
    for start in range(0, z.shape[0], block):
        sel = slice(start, start + block)
        ids = None if token_ids is None else token_ids[sel]
        with torch.enable_grad():
            leaf = z[sel].detach().requires_grad_()
            block_rows = divergence_rows(divergence, leaf, teacher[sel], ids, param)
            if block_rows.requires_grad:
                (grad,) = torch.autograd.grad(block_rows.sum(), leaf)
                out[sel].copy_(grad)
            else:  # e.g. skew with alpha = 1: identically 0
                out[sel].zero_()
        rows[sel] = block_rows.detach()
    return rows, out


@dataclass(frozen=True)
class DistillMix:
    """The Hinton soft/hard mix's own parameters: ``alpha * T² * D_T + (1 - alpha) * CE``.

    Attributes:
        divergence: a key of :data:`DIVERGENCE_TABLE`.
        temperature: T > 0 of the soft term.
        alpha: weight of the soft term in [0, 1]; the hard-label CE gets ``1 - alpha``.
        beta: ``generalized_jsd``'s beta in [0, 1].
        skew_alpha: ``skew_kl`` / ``skew_reverse_kl``'s alpha in [0, 1].
        ignore_index: label value marking tokens that count for no term.
    """

    divergence: str = "forward_kl"
    temperature: float = 1.0
    alpha: float = 0.5
    beta: float = 0.5
    skew_alpha: float = 0.1
    ignore_index: int = -100

    def __post_init__(self) -> None:
        lookup(self.divergence)
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        for name in ("alpha", "beta", "skew_alpha"):
            check_unit(name, getattr(self, name))

    @classmethod
    def from_config(cls, cfg: object) -> DistillMix:
        """From a :class:`~mydistill.config.losses.LossConfig` (or anything with the same fields)."""
        return cls(**{name: getattr(cfg, name) for name in cls.__dataclass_fields__})

    @property
    def entry(self) -> Divergence:
        return DIVERGENCE_TABLE[self.divergence]

    @property
    def param(self) -> float:
        """The value of this divergence's parameter (0 for those without one)."""
        return {"beta": self.beta, "alpha": self.skew_alpha}.get(self.entry.param or "", 0.0)
