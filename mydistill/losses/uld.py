"""Universal Logit Distillation: a logit loss between models whose vocabularies differ.

Boizard et al. 2024, "Towards Cross-Tokenizer Distillation: the Universal Logit Distillation Loss
for LLMs" (arXiv 2402.12030), §3. The Wasserstein-1 distance between the teacher's and the
student's next-token distributions needs a cost between the two vocabularies, which does not
exist; with a uniform cost between any two different tokens it is bounded above by a quantity that
depends only on the *sorted* probabilities, and the paper minimises that bound:

    ULD(p, q) = Σ_i | p_(i) - q_(i) |                                            (paper, Eq. 6)

where ``p_(1) >= p_(2) >= ...`` are the teacher's probabilities sorted in decreasing order, ``q_(i)``
the student's, and the shorter vocabulary is padded with zeros. It compares the *shapes* of the
distributions (how confident, how spread), not which token is which: the student learns that from
the cross-entropy term the paper adds, ``L = CE + λ ULD``.

It is 0 for identical distributions, invariant to permuting either vocabulary, and in [0, 2].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mydistill.losses.teacher_signal import upcast


def uld_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    mask: Tensor | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
) -> Tensor:
    """Mean over valid positions of ``Σ_i |sort(p_t)_i - sort(p_s)_i|`` (arXiv 2402.12030, Eq. 6).

    Args:
        student_logits: ``(N, V_s)`` the student's logits at N aligned response positions.
        teacher_logits: ``(N, V_t)`` the teacher's at the same positions; ``V_t`` may differ from ``V_s``.
        mask: ``(N,)`` bool, positions that count; None: all.
        temperature: both distributions are ``softmax(logits / temperature)``.
        top_k: compare only the ``top_k`` largest probabilities of each (the rest is little mass);
            None compares everything (the shorter side padded with zeros).

    Returns a scalar; 0 when there is no valid position. Gradients flow to ``student_logits`` only.
    """
    if student_logits.dim() != 2 or teacher_logits.dim() != 2:
        raise ValueError(
            f"uld_loss needs (N, V_s) and (N, V_t) logits, got {tuple(student_logits.shape)} and "
            f"{tuple(teacher_logits.shape)}"
        )
    if student_logits.shape[0] != teacher_logits.shape[0]:
        raise ValueError(
            f"student has {student_logits.shape[0]} positions, teacher {teacher_logits.shape[0]}; align the "
            "response positions first (mydistill.training.cross_tokenizer.aligned_response_rows)"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if mask is not None:
        student_logits, teacher_logits = student_logits[mask.bool()], teacher_logits[mask.bool()]
    n = student_logits.shape[0]
    if n == 0:
        return student_logits.sum() * 0.0
    q = torch.softmax(upcast(student_logits) / temperature, dim=-1)
    with torch.no_grad():
        p = torch.softmax(upcast(teacher_logits) / temperature, dim=-1)
    width = max(q.shape[-1], p.shape[-1])
    if top_k is not None:
        width = min(width, top_k)
        q_sorted = q.topk(min(width, q.shape[-1]), dim=-1).values
        p_sorted = p.topk(min(width, p.shape[-1]), dim=-1).values
    else:
        q_sorted = q.sort(dim=-1, descending=True).values
        p_sorted = p.sort(dim=-1, descending=True).values
    q_sorted = F.pad(q_sorted, (0, width - q_sorted.shape[-1]))
    p_sorted = F.pad(p_sorted, (0, width - p_sorted.shape[-1]))
    return (q_sorted - p_sorted).abs().sum(-1).sum() / n
