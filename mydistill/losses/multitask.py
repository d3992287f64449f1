"""Distilling step-by-step (Hsieh et al. 2023, arXiv 2305.02301, §3.2): a multi-task loss.

The student is trained on two tasks built from the same input, told apart by a task prefix:
predict the label (``[label] x -> y``) and generate the teacher's rationale (``[rationale] x -> r``).
The paper's objective is ``L = L_label + λ L_rationale``, both token-level cross-entropies; here
``L = label_weight * L_label + rationale_weight * L_rationale`` (``λ = rationale_weight``).
"""

from __future__ import annotations

from torch import Tensor

from mydistill.losses.divergences import cross_entropy


def step_by_step_loss(
    label_logits: Tensor,
    label_targets: Tensor,
    rationale_logits: Tensor,
    rationale_targets: Tensor,
    *,
    label_weight: float = 1.0,
    rationale_weight: float = 1.0,
    ignore_index: int = -100,
) -> Tensor:
    """``label_weight * CE(label) + rationale_weight * CE(rationale)``, each a mean over its valid tokens.

    Args:
        label_logits: ``(N_l, V)`` (or ``(B, T, V)``) logits of the label-task pass, already shifted.
        label_targets: ``(N_l,)`` targets, ``ignore_index`` outside the answer.
        rationale_logits: ``(N_r, V)`` logits of the rationale-task pass.
        rationale_targets: ``(N_r,)`` targets, ``ignore_index`` outside the rationale.
    """
    if label_weight < 0 or rationale_weight < 0:
        raise ValueError(
            f"step-by-step weights must be >= 0, got label_weight={label_weight}, rationale_weight={rationale_weight}"
        )
    label = cross_entropy(label_logits, label_targets, ignore_index=ignore_index)
    rationale = cross_entropy(rationale_logits, rationale_targets, ignore_index=ignore_index)
    return label_weight * label + rationale_weight * rationale
