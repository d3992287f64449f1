"""The teacher side of a training batch, read from one or several stores instead of a live teacher.

:class:`StoreTeacher` is what the distill stage builds when a store is configured: it checks every
store against the run (tokenizer, training data, vocabulary), then turns the examples of a batch
into one :class:`~mydistill.losses.teacher_signal.TopKTeacher` ``(B, T, K)`` aligned with the batch's
shifted labels, ready for ``DistillObjective(..., teacher=...)`` (:meth:`StoreTeacher.signal` gives it as a batch signal). Several stores are mixed per
token with :func:`~mydistill.signal.combine.combine_topk`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mydistill import io
from mydistill.losses.batch_signal import BatchSignal
from mydistill.losses.teacher_signal import TopKTeacher, normalized_weights
from mydistill.signal.combine import combine_topk
from mydistill.signal.format import example_key
from mydistill.signal.store import SignalStore, StoreMismatch
from mydistill.tokenization import IGNORE_INDEX, shift_labels, tokenizer_sha256


class StoreTeacher:
    """Teacher signal for batches of ``records`` (the training data, in the order the trainer indexes it).

    Args:
        uris: one store, or several (several teachers) to mix per token.
        records: the training records ``{prompt, response, ...}``; batch indices refer to them.
        tokenizer: the student's tokenizer (must be the one the stores were computed with).
        vocab_size: the student's output vocabulary.
        weights: one per store (``distill.loss.teacher_weights``); None: equal.
        temperature: the loss temperature T. A store computed at temperature 1 is tempered by the loss
            like a dense teacher (its tail under the even-spread assumption); one computed at T is
            handed to the loss so that the loss's tempering gives back exactly the stored
            distribution (exact tail mass, and unbiased for a sampled store).
        divergence: the loss divergence; a sampled store is unbiased only for ``forward_kl``.
    """

    def __init__(
        self,
        uris: Sequence[str],
        *,
        records: Sequence[dict[str, Any]],
        tokenizer: Any,
        vocab_size: int,
        weights: Sequence[float] | None = None,
        temperature: float = 1.0,
        divergence: str = "forward_kl",
    ) -> None:
        if not uris:
            raise ValueError("StoreTeacher needs at least one store URI")
        self.stores = [SignalStore(uri) for uri in uris]
        tok_sha = tokenizer_sha256(tokenizer)
        data_sha = io.records_sha256(records)
        for store in self.stores:
            store.check_matches(tokenizer_sha256=tok_sha, data_sha256=data_sha, vocab_size=vocab_size)
            if not (math.isclose(store.temperature, 1.0) or math.isclose(store.temperature, temperature)):
                raise StoreMismatch(
                    f"{store.uri}: the store holds the teacher at temperature {store.temperature} but "
                    f"distill.loss.temperature is {temperature}; use a store computed at the loss temperature "
                    "(signal.temperature empty) or at 1"
                )
            if store.mode == "sampled" and divergence != "forward_kl":
                raise StoreMismatch(
                    f"{store.uri}: a sampled store estimates the teacher without bias only for forward_kl "
                    f"(the loss is linear in p there), and distill.loss.divergence is {divergence!r}; use "
                    "forward_kl, or a store made with signal.mode: topk"
                )
        try:
            self.weights = normalized_weights(weights, len(self.stores))
        except ValueError as e:
            raise ValueError(f"distill.loss.teacher_weights: {e} (one weight per teacher-signal store)") from None
        self.vocab_size = vocab_size
        self.temperature = temperature
        self.keys = [example_key(r["prompt"], r["response"]) for r in records]

    @property
    def manifests(self) -> list[dict[str, Any]]:
        return [s.manifest for s in self.stores]

    def _one_store(self, store: SignalStore, indices: Sequence[int], labels: Tensor) -> TopKTeacher:
        b, t = labels.shape
        k = store.slots
        ids = np.broadcast_to(np.arange(k, dtype=np.int64), (b, t, k)).copy()  # distinct filler ids
        log_probs = np.full((b, t, k), -np.log(k), dtype=np.float32)
        residual = np.zeros((b, t), dtype=np.float32)
        valid = (labels != IGNORE_INDEX).cpu().numpy()
        for row, index in enumerate(indices):
            positions = np.flatnonzero(valid[row])
            try:
                entry = store.get(self.keys[index])
            except KeyError:
                raise StoreMismatch(
                    f"{store.uri}: holds no signal for training record {index + 1}; the store was made for other data"
                ) from None
            n = len(positions)
            if entry.tokens < n:
                raise StoreMismatch(
                    f"{store.uri}: record {index + 1} has {entry.tokens} stored response tokens but the batch has "
                    f"{n}; the store was computed with max_length={store.max_length}, use at most that in distill"
                )
            ids[row, positions] = entry.token_ids[:n]
            log_probs[row, positions] = entry.log_probs[:n]
            residual[row, positions] = entry.residual[:n]
        device = labels.device
        teacher = TopKTeacher(
            token_ids=torch.from_numpy(ids).to(device),
            log_probs=torch.from_numpy(log_probs).to(device),
            residual=torch.from_numpy(residual).to(device),
        )
        if math.isclose(store.temperature, 1.0) or math.isclose(self.temperature, 1.0):
            return teacher
        return pretempered(teacher, self.temperature, self.vocab_size)

    def batch_topk(self, indices: Sequence[int], labels: Tensor) -> TopKTeacher:
        """The teacher for a batch: ``(B, T, K)`` aligned with ``labels`` ``(B, T)`` (already shifted).

        ``indices`` are the batch rows' positions in ``records``. Positions whose label is ignored
        get a harmless filler (they never reach the loss).
        """
        teachers = [self._one_store(store, indices, labels) for store in self.stores]
        if len(teachers) == 1:
            return teachers[0]
        return combine_topk(teachers, self.weights, temperature=self.temperature, vocab_size=self.vocab_size)

    def signal(self, batch: dict[str, Tensor], indices: Sequence[int] | None = None, *, hidden_states: bool = False) -> BatchSignal:
        """The training side's one call (:class:`~mydistill.training.teachers.SignalSource`): the stored
        top-k teacher for ``batch``, whose rows are the training records at ``indices``."""
        if indices is None:
            raise ValueError("a teacher-signal store needs the batch's example indices")
        return BatchSignal(teacher=self.batch_topk(list(indices), shift_labels(batch["labels"])), origin="store")


def pretempered(teacher: TopKTeacher, temperature: float, vocab_size: int) -> TopKTeacher:
    """A teacher stored at ``temperature`` T, encoded so that the loss's tempering at T returns it unchanged.

    The loss computes listed ``log_probs / T`` and a tail ``log r / T + (1 - 1/T) log(V - K)``, then
    renormalises. Feeding ``T * log p_T`` and ``log r = T log R_T - (T - 1) log(V - K)`` gives back
    ``log p_T`` and ``log R_T``. Each row is shifted by ``-log r`` (the renormalisation removes a
    common shift) so the residual is 1 and never falls under the loss's 1e-12 floor; a row with no
    residual (a sampled store) is shifted up by 30 T, leaving that floor ~e^-30 of a listed token.
    """
    k = teacher.k
    log_probs = teacher.log_probs * temperature
    residual = teacher.residual_mass()
    if k >= vocab_size:
        return TopKTeacher(teacher.token_ids, log_probs, torch.zeros_like(residual))
    has_tail = residual > 0
    log_r = temperature * residual.clamp_min(1e-45).log() - (temperature - 1.0) * math.log(vocab_size - k)
    # rows without a tail (sampled stores) are shifted up instead, so the loss's floor tail stays negligible
    shift = torch.where(has_tail, -log_r, torch.full_like(log_r, 30.0 * temperature))
    return TopKTeacher(
        teacher.token_ids,
        log_probs + shift.unsqueeze(-1),
        torch.where(has_tail, torch.ones_like(residual), torch.zeros_like(residual)),
    )
