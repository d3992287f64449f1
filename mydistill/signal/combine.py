"""Several sparse teachers (several stores) mixed per token into one :class:`TopKTeacher`.

The mixture is the loss library's multi-teacher rule, ``p = Σ_i w_i softmax(t_i / T)`` (weights
from :func:`~mydistill.losses.teacher_signal.normalized_weights`, i.e. ``distill.loss.teacher_weights``),
applied to sparse teachers: each teacher's tempered distribution is its listed tokens plus its
residual spread evenly over the tokens it does not list (the same maximum-entropy assumption
:meth:`TopKTeacher.category_log_probs` makes), so a token listed by one teacher and not by another
gets the second teacher's per-token tail share. The result lists the union of the teachers' ids
per position; with every teacher lossless (k = V) it equals the dense ensemble exactly.

The combined teacher is built *at* the loss temperature and encoded so that the loss's own
tempering gives back the mixture: ``log_probs = T * log p_mix`` and a residual chosen so that the
tail category comes out as the mixture's tail mass (rows are shifted by a constant, which the
loss's row normalisation removes, so ``log_probs`` are not normalised log-probabilities: pass the
result to the loss, not to anything that reads them as probabilities).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from mydistill.losses.teacher_signal import TopKTeacher, normalized_weights


def _union_ids(all_ids: Tensor, vocab: int) -> tuple[Tensor, int]:
    """Per-row distinct ids of ``all_ids`` ``(N, S)``, width trimmed to the largest distinct count.

    Rows with fewer distinct ids are padded with the smallest ids they do not list (they then get
    their assumed tail share, so the padding is exact under the tail assumption).
    """
    n, s = all_ids.shape
    sorted_ids, _ = all_ids.sort(dim=-1)
    dup = torch.zeros_like(sorted_ids, dtype=torch.bool)
    dup[:, 1:] = sorted_ids[:, 1:] == sorted_ids[:, :-1]
    width = int((~dup).sum(-1).max()) if n else 0
    # distinct ids first (in ascending order), duplicates pushed to the end
    key = torch.where(dup, sorted_ids + vocab, sorted_ids)
    ordered, _ = key.sort(dim=-1)
    ordered = ordered[:, :width]
    pad = ordered >= vocab  # slots to fill with unlisted ids
    if bool(pad.any()):
        span = min(vocab, 2 * s + 1)  # at least s unlisted ids live below this
        used = torch.zeros(n, span, dtype=torch.bool, device=all_ids.device)
        inside = sorted_ids < span
        used.scatter_(-1, torch.where(inside, sorted_ids, 0), inside)
        used[:, 0] |= (sorted_ids == 0).any(-1)
        # free ids in ascending order: argsort of the used flag (stable) puts free ones first
        free = torch.argsort(used.to(torch.int8), dim=-1, stable=True)
        fill_rank = (pad.cumsum(-1) - 1).clamp_min(0)
        candidates = free.gather(-1, fill_rank.clamp_max(span - 1))
        ordered = torch.where(pad, candidates, ordered)
    return ordered, width


def _teacher_log_mass(teacher: TopKTeacher, union: Tensor, temperature: float, vocab: int) -> Tensor:
    """One teacher's tempered log-probability of every ``union`` id ``(N, U)``."""
    cat = teacher.category_log_probs(temperature, vocab)  # (N, k [+1])
    k = teacher.k
    listed = cat[:, :k]
    if k < vocab:
        per_tail_token = cat[:, k] - math.log(vocab - k)
    else:
        per_tail_token = torch.full_like(cat[:, 0], -math.inf)
    ids = teacher.token_ids.long()
    order = ids.argsort(dim=-1)
    sorted_ids = ids.gather(-1, order)
    pos = torch.searchsorted(sorted_ids.contiguous(), union.contiguous()).clamp_max(k - 1)
    found = sorted_ids.gather(-1, pos) == union
    values = listed.gather(-1, order.gather(-1, pos))
    return torch.where(found, values, per_tail_token.unsqueeze(-1))


def combine_topk(
    teachers: Sequence[TopKTeacher],
    weights: Sequence[float] | None,
    *,
    temperature: float,
    vocab_size: int,
) -> TopKTeacher:
    """Mix sparse teachers per position: ``p = Σ_i w_i p_i`` at ``temperature``.

    Args:
        teachers: each ``(..., k_i)``; the same leading shape for all.
        weights: one positive weight per teacher (normalised); None for equal weights.
        temperature: the loss temperature T; pass the result to a loss at the same T.
        vocab_size: the student's vocabulary V.

    Returns a :class:`TopKTeacher` ``(..., U)`` over the union of the ids (U <= Σ k_i, or V).
    """
    if not teachers:
        raise ValueError("combine_topk needs at least one teacher")
    w = normalized_weights(weights, len(teachers))
    lead = teachers[0].token_ids.shape[:-1]
    flat = [t.flatten() for t in teachers]
    for i, t in enumerate(flat):
        if t.token_ids.shape[0] != flat[0].token_ids.shape[0]:
            raise ValueError(f"teacher {i} has {t.token_ids.shape[0]} positions, teacher 0 has {flat[0].token_ids.shape[0]}")
    if len(flat) == 1:
        return teachers[0]
    n = flat[0].token_ids.shape[0]
    device = flat[0].token_ids.device
    if sum(t.k for t in flat) >= vocab_size:
        union = torch.arange(vocab_size, device=device).expand(n, vocab_size)
        width = vocab_size
    else:
        union, width = _union_ids(torch.cat([t.token_ids.long() for t in flat], dim=-1), vocab_size)
    log_mass = torch.stack(
        [_teacher_log_mass(t, union, temperature, vocab_size) + math.log(wi) for t, wi in zip(flat, w, strict=True)]
    )
    mixed = torch.logsumexp(log_mass, dim=0)  # (N, U)
    log_probs = temperature * mixed
    if width < vocab_size:
        # each teacher's tail left after the union tokens took their shares: R_i (V - U) / (V - k_i)
        tail_terms = []
        for t, wi in zip(flat, w, strict=True):
            cat = t.category_log_probs(temperature, vocab_size)
            tail_i = cat[:, t.k] if t.k < vocab_size else torch.full_like(cat[:, 0], -math.inf)
            tail_terms.append(tail_i + math.log(wi) + math.log((vocab_size - width) / (vocab_size - t.k)))
        log_tail = torch.logsumexp(torch.stack(tail_terms), dim=0)
        log_rest = math.log(vocab_size - width)
        log_r = log_rest + temperature * (log_tail - log_rest)
        # Shift each row by -log r (the loss renormalises rows, so a common shift changes nothing):
        # the residual becomes 1 and never falls under the loss's 1e-12 floor at a high T.
        shift = torch.where(torch.isfinite(log_r), -log_r, torch.zeros_like(log_r))
        log_probs = log_probs + shift.unsqueeze(-1)
        residual = torch.where(torch.isfinite(log_r), torch.ones_like(log_r), torch.zeros_like(log_r))
    else:
        residual = torch.zeros(n, device=device)
    return TopKTeacher(
        token_ids=union.reshape(*lead, width),
        log_probs=log_probs.reshape(*lead, width),
        residual=residual.reshape(lead),
    )
