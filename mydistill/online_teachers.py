"""Several frozen online teachers in the distill stage (``distill.extra_teachers``).

The main ``teacher`` (the one that generates) comes first, then the extra teachers. Every teacher
runs on every batch; the objective mixes their distributions per token with
``distill.loss.teacher_weights``, ``p = sum_k w_k softmax(t_k / T)`` (the loss library's ensemble
teacher, chunked from each teacher's hidden states and head). All must share the student's
tokenizer, so that one token id means one string for every model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mydistill.cross_tokenizer import TokenizerMismatch, check_tokenizers_agree
from mydistill.models import load_tokenizer
from mydistill.signal.source import online_signal


@dataclass
class OnlineTeachers:
    """Frozen teacher models, the main one first; :meth:`signal` gives the objective's keyword arguments."""

    models: list[Any]

    def signal(self, batch: dict[str, torch.Tensor], hidden_states: bool = False) -> dict[str, Any]:
        """Each teacher's final hidden states and head, as lists in teacher order; with ``hidden_states``
        also the main teacher's per-layer states (layer-wise distillation follows the main teacher)."""
        signals = [online_signal(m, batch, hidden_states=hidden_states and i == 0) for i, m in enumerate(self.models)]
        out: dict[str, Any] = {
            "teacher_hidden": [s["teacher_hidden"] for s in signals],
            "teacher_head_weight": [s["teacher_head_weight"] for s in signals],
        }
        if hidden_states:
            out["teacher_hidden_states"] = signals[0]["teacher_hidden_states"]
        return out


def load_extra_teachers(uris: Sequence[str], student_tokenizer: Any, *, load: Callable[[str], Any]) -> list[Any]:
    """Load ``distill.extra_teachers`` frozen, after checking every tokenizer against the student's.

    All tokenizers are checked before any model is loaded; a disagreement raises
    :class:`~mydistill.cross_tokenizer.TokenizerMismatch` naming the teacher (its index and URI).
    ``load`` loads one teacher (the trainer's own loader, which may shard it with ZeRO-3).
    """
    for i, uri in enumerate(uris):
        try:
            check_tokenizers_agree(load_tokenizer(uri), student_tokenizer, method="none")
        except TokenizerMismatch as e:
            raise TokenizerMismatch(
                f"distill.extra_teachers[{i}] ({uri}): {e} (distill.extra_teachers must all share the student's "
                "tokenizer; cross-tokenizer methods apply to the main teacher only)"
            ) from None
    return [load(uri) for uri in uris]


__all__ = ["OnlineTeachers", "load_extra_teachers"]
