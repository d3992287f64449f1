"""From dense teacher logits to the sparse signal a store keeps: top-k, or top-k plus an unbiased sample.

**Top-k** keeps the k most likely tokens and the mass left over. It is biased: the student is
taught nothing about *which* tail tokens the residual belongs to (the loss spreads it evenly), and
the bias does not shrink with more data (Anshumann et al., "Sparse Logit Sampling: Accelerating
Knowledge Distillation in LLMs", ACL 2025, arXiv 2503.16870, §3).

**Sampled** keeps the top ``k`` exactly and spends ``m`` more slots on the tail, as in that
paper's random-sampling KD: ``m`` tokens are drawn with replacement from the teacher's tail
distribution ``p_j / R`` (``R`` the residual), and each drawn token gets the importance-weighted
estimate ``p̂_j = R * c_j / m`` (``c_j`` its count), every other tail token ``p̂_j = 0``. So
``E[p̂_j] = p_j`` for every token of the vocabulary, and the listed masses sum to exactly one:
the forward-KL / cross-entropy gradient ``q - p̂`` equals the dense one in expectation. Slots left
free by repeated draws hold the next most likely tail tokens with ``p̂ = 0`` (their estimate), so
every position has exactly ``k + m`` distinct ids. The stored residual is 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

MODES = ("topk", "sampled")


@dataclass
class SparseSignal:
    """``token_ids`` ``(N, K)`` int64, ``log_probs`` ``(N, K)`` float32 (``-inf``: zero mass), ``residual`` ``(N,)``."""

    token_ids: Tensor
    log_probs: Tensor
    residual: Tensor


@torch.no_grad()
def sparsify(
    logits: Tensor,
    k: int,
    *,
    mode: str = "topk",
    sampled_tokens: int = 0,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> SparseSignal:
    """The signal a store keeps for dense ``(N, V)`` teacher logits.

    Args:
        logits: ``(N, V)`` teacher logits at the positions to store.
        k: exact top tokens kept per position.
        mode: ``"topk"`` or ``"sampled"`` (k exact + ``sampled_tokens`` importance-sampled tail slots).
        temperature: the stored distribution is ``softmax(logits / temperature)``.
        generator: for ``"sampled"``; the draws are reproducible given it.
    """
    if mode not in MODES:
        raise ValueError(f"unknown signal mode {mode!r}; expected one of {MODES}")
    log_p = torch.log_softmax(logits.float() / temperature, dim=-1)
    vocab = log_p.shape[-1]
    k = min(k, vocab)
    top_lp, top_ids = log_p.topk(k, dim=-1)
    # 1 - sum(p_top) as -expm1(logsumexp): exact when the residual is tiny
    residual = (-torch.expm1(torch.logsumexp(top_lp, dim=-1))).clamp_min(0.0)
    m = min(sampled_tokens, vocab - k) if mode == "sampled" else 0
    if m <= 0:
        return SparseSignal(top_ids, top_lp, residual)

    tail_p = log_p.exp().scatter(-1, top_ids, 0.0)
    empty = tail_p.sum(-1, keepdim=True) <= 0
    # a row with no tail mass samples anything: every estimate is R * c / m = 0 there anyway
    weights = torch.where(empty, torch.ones_like(tail_p).scatter(-1, top_ids, 0.0), tail_p)
    draws = torch.multinomial(weights, m, replacement=True, generator=generator)
    counts = torch.zeros_like(tail_p).scatter_add_(-1, draws, torch.ones_like(draws, dtype=tail_p.dtype))
    # the m slots: drawn tokens first (by count), then the most likely undrawn tail tokens (estimate 0)
    score = counts * 2.0 + tail_p.clamp_max(1.0)
    score.scatter_(-1, top_ids, -1.0)
    _, slot_ids = score.topk(m, dim=-1)
    estimate = residual.unsqueeze(-1) * counts.gather(-1, slot_ids) / m
    slot_lp = torch.where(estimate > 0, estimate.log(), torch.full_like(estimate, -torch.inf))
    return SparseSignal(
        torch.cat([top_ids, slot_ids], dim=-1),
        torch.cat([top_lp, slot_lp], dim=-1),
        torch.zeros_like(residual),
    )
