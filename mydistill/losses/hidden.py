"""Hidden-state (layer-wise) distillation: match student layers to teacher layers.

Layer indices follow Hugging Face's ``output_hidden_states=True`` convention: ``hidden_states[0]``
is the embedding output and ``hidden_states[l]`` the output of block ``l`` (1..num_layers).

* :func:`uniform_layer_map` pairs student block i with teacher block ``i * L_t // L_s`` (the
  uniform mapping function ``g(m) = m * N / M`` of TinyBERT, Jiao et al. 2020, arXiv 1909.10351).
* :func:`kept_layer_map` pairs each block of a student cut from the teacher with the teacher block
  it was copied from (``layer_map: kept``), so the loss keeps each kept block doing what it did.
* :class:`HiddenStateDistiller` owns what the pairs need to be compared:
  - ``projection="linear"``: a learned ``W_h`` per pair mapping student width to teacher width
    (TinyBERT's hidden-state loss ``MSE(H^S W_h, H^T)``); ``"auto"`` adds it only when the widths differ
    (DistilBERT, Sanh et al. 2019, keeps equal widths and needs none);
  - ``projection="ted"``: task-aware layer-wise filters as in TED (Liang et al., ICML 2023,
    arXiv 2210.01351): a student filter and a teacher filter per pair map both layers into a
    shared ``filter_size`` space and the loss compares the filtered states. TED first trains the
    teacher filters on the task and freezes them; here the teacher filters are created frozen
    (random orthogonal projections) and trained by :func:`mydistill.losses.ted.fit_teacher_filters`
    (``distill.loss.hidden.teacher_filter_steps`` in a run), or loaded with
    :meth:`HiddenStateDistiller.load_teacher_filters`; the student filters are learned.
* :func:`hidden_mse` / :func:`hidden_cosine` are the per-pair losses (cosine as in DistilBERT's
  cosine embedding loss: ``1 - cos``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LayerMap = Literal["uniform", "kept"] | Sequence[tuple[int, int]] | Sequence[Sequence[int]]


def _flat_valid(student: Tensor, teacher: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    s = student.reshape(-1, student.shape[-1])
    t = teacher.reshape(-1, teacher.shape[-1])
    if s.shape != t.shape:
        raise ValueError(
            f"student hidden states {tuple(s.shape)} and teacher hidden states {tuple(t.shape)} must match "
            "after projection (tokens x width)"
        )
    if mask is None:
        return s.float(), t.float(), s.new_tensor(float(s.shape[0]), dtype=torch.float32)
    valid = mask.reshape(-1).to(device=s.device, dtype=torch.bool)
    if valid.numel() != s.shape[0]:
        raise ValueError(f"mask has {valid.numel()} entries for {s.shape[0]} token positions")
    return s[valid].float(), t[valid].float(), valid.sum().float()


def hidden_mse(student_hidden: Tensor, teacher_hidden: Tensor, mask: Tensor | None = None) -> Tensor:
    """``mean_h (s_h - t_h)²`` per token, mean over valid tokens.

    Args:
        student_hidden: ``(N, H)`` or ``(..., H)`` (already projected to the teacher's width).
        teacher_hidden: same shape; treated as a constant (detached).
        mask: ``(N,)`` or ``(...)`` true for tokens to count; None counts all.
    """
    s, t, n = _flat_valid(student_hidden, teacher_hidden.detach(), mask)
    return (s - t).square().mean(-1).sum() / n.clamp_min(1)


def hidden_cosine(student_hidden: Tensor, teacher_hidden: Tensor, mask: Tensor | None = None) -> Tensor:
    """``1 - cos(s, t)`` per token, mean over valid tokens; shapes as in :func:`hidden_mse`."""
    s, t, n = _flat_valid(student_hidden, teacher_hidden.detach(), mask)
    return (1.0 - F.cosine_similarity(s, t, dim=-1, eps=1e-8)).sum() / n.clamp_min(1)


HIDDEN_LOSSES = {"mse": hidden_mse, "cosine": hidden_cosine}


def uniform_layer_map(student_num_layers: int, teacher_num_layers: int) -> list[tuple[int, int]]:
    """Student block i (1..L_s) -> teacher block ``i * L_t // L_s``; the last blocks always pair."""
    if student_num_layers <= 0 or teacher_num_layers <= 0:
        raise ValueError("layer counts must be positive")
    return [(i, i * teacher_num_layers // student_num_layers) for i in range(1, student_num_layers + 1)]


def kept_layer_map(teacher_layers: Sequence[int], teacher_num_layers: int) -> list[tuple[int, int]]:
    """Student block i (1..L_s) -> the teacher block it was cut from, ``teacher_layers[i - 1] + 1``.

    ``teacher_layers`` are the 0-based teacher block indices the student kept, in order (the
    student-init manifest's ``teacher_layers``); the +1 is hidden_states' embedding entry.
    """
    if not teacher_layers:
        raise ValueError("layer_map: kept needs the teacher blocks the student was cut from; none were given")
    bad = [t for t in teacher_layers if not 0 <= t < teacher_num_layers]
    if bad:
        raise ValueError(f"layer_map: kept: teacher blocks {bad} are not in 0..{teacher_num_layers - 1}")
    return [(i, t + 1) for i, t in enumerate(teacher_layers, start=1)]


def resolve_layer_map(
    layer_map: LayerMap, student_num_layers: int, teacher_num_layers: int, teacher_layers: Sequence[int] | None = None,
) -> list[tuple[int, int]]:
    """``"uniform"``, ``"kept"`` (needs ``teacher_layers``, one per student block) or explicit
    ``[(student_layer, teacher_layer), ...]`` pairs, validated."""
    if isinstance(layer_map, str):
        if layer_map == "kept":
            if teacher_layers is None:
                raise ValueError(
                    "layer_map: kept pairs each block of a student cut from the teacher with the block it came from; "
                    "this student was not cut from the teacher (set student.init.from_teacher, or use 'uniform')"
                )
            if len(teacher_layers) != student_num_layers:
                raise ValueError(
                    f"layer_map: kept: the student has {student_num_layers} blocks but was cut from "
                    f"{len(teacher_layers)} teacher blocks {list(teacher_layers)}"
                )
            return kept_layer_map(teacher_layers, teacher_num_layers)
        if layer_map != "uniform":
            raise ValueError(
                "layer_map must be 'uniform', 'kept' or a list of [student_layer, teacher_layer] pairs, "
                f"got {layer_map!r}"
            )
        return uniform_layer_map(student_num_layers, teacher_num_layers)
    pairs: list[tuple[int, int]] = []
    for pair in layer_map:
        if len(pair) != 2:
            raise ValueError(f"layer_map entries must be [student_layer, teacher_layer] pairs, got {list(pair)}")
        s, t = int(pair[0]), int(pair[1])
        if not 0 <= s <= student_num_layers:
            raise ValueError(
                f"layer_map pair {[s, t]}: student layer must be in 0..{student_num_layers} (0 = embeddings)"
            )
        if not 0 <= t <= teacher_num_layers:
            raise ValueError(
                f"layer_map pair {[s, t]}: teacher layer must be in 0..{teacher_num_layers} (0 = embeddings)"
            )
        pairs.append((s, t))
    if not pairs:
        raise ValueError("layer_map is empty; give at least one [student_layer, teacher_layer] pair or 'uniform'")
    return pairs


class HiddenStateDistiller(nn.Module):
    """Layer-wise hidden-state loss with the learned projections or TED filters it needs.

    Args:
        student_hidden_size, teacher_hidden_size: widths H_s and H_t.
        student_num_layers, teacher_num_layers: block counts (hidden_states has num_layers + 1 entries).
        layer_map: ``"uniform"``, ``"kept"`` or explicit ``[(student_layer, teacher_layer), ...]``.
        teacher_layers: for ``"kept"``: the 0-based teacher blocks the student was cut from, in order.
        loss: ``"mse"`` or ``"cosine"``.
        projection: ``"auto"`` (linear only where widths differ), ``"linear"``, ``"none"`` or ``"ted"``.
        filter_size: width of the TED filter space (default: the teacher's width).

    ``forward(student_hidden_states, teacher_hidden_states, mask=None)`` returns the mean over
    layer pairs of the per-pair loss (a scalar).
    """

    def __init__(
        self,
        *,
        student_hidden_size: int,
        teacher_hidden_size: int,
        student_num_layers: int,
        teacher_num_layers: int,
        layer_map: LayerMap = "uniform",
        loss: Literal["mse", "cosine"] = "mse",
        projection: Literal["auto", "linear", "none", "ted"] = "auto",
        filter_size: int | None = None,
        teacher_layers: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if loss not in HIDDEN_LOSSES:
            raise ValueError(f"hidden-state loss must be one of {sorted(HIDDEN_LOSSES)}, got {loss!r}")
        if projection not in ("auto", "linear", "none", "ted"):
            raise ValueError(f"projection must be 'auto', 'linear', 'none' or 'ted', got {projection!r}")
        if projection == "none" and student_hidden_size != teacher_hidden_size:
            raise ValueError(
                f"projection='none' needs equal widths, but the student has {student_hidden_size} and the teacher "
                f"{teacher_hidden_size}; use 'auto', 'linear' or 'ted'"
            )
        self.pairs = resolve_layer_map(layer_map, student_num_layers, teacher_num_layers, teacher_layers)
        self.loss_name = loss
        self.projection = projection
        self.student_filters = nn.ModuleList()
        self.teacher_filters = nn.ModuleList()
        if projection == "ted":
            size = filter_size or teacher_hidden_size
            for _ in self.pairs:
                self.student_filters.append(nn.Linear(student_hidden_size, size))
                teacher_filter = nn.Linear(teacher_hidden_size, size)
                nn.init.orthogonal_(teacher_filter.weight)
                nn.init.zeros_(teacher_filter.bias)
                teacher_filter.requires_grad_(False)
                self.teacher_filters.append(teacher_filter)
        elif projection == "linear" or (projection == "auto" and student_hidden_size != teacher_hidden_size):
            for _ in self.pairs:
                self.student_filters.append(nn.Linear(student_hidden_size, teacher_hidden_size, bias=False))

    def load_teacher_filters(self, state_dict: Mapping[str, Tensor]) -> None:
        """Load trained TED teacher filters (stage 1 of TED) and keep them frozen."""
        self.teacher_filters.load_state_dict(state_dict)
        self.teacher_filters.requires_grad_(False)

    def forward(
        self,
        student_hidden_states: Sequence[Tensor],
        teacher_hidden_states: Sequence[Tensor],
        mask: Tensor | None = None,
    ) -> Tensor:
        """Mean over layer pairs of the hidden-state loss.

        Args:
            student_hidden_states: ``L_s + 1`` tensors of ``(B, T, H_s)`` (or ``(N, H_s)``).
            teacher_hidden_states: ``L_t + 1`` tensors of ``(B, T, H_t)``; detached here.
            mask: ``(B, T)`` (e.g. the attention mask) true for positions to count.
        """
        need_s = max(s for s, _ in self.pairs) + 1
        need_t = max(t for _, t in self.pairs) + 1
        if len(student_hidden_states) < need_s:
            raise ValueError(
                f"the layer map uses student layer {need_s - 1} but got {len(student_hidden_states)} "
                "student hidden states"
            )
        if len(teacher_hidden_states) < need_t:
            raise ValueError(
                f"the layer map uses teacher layer {need_t - 1} but got {len(teacher_hidden_states)} "
                "teacher hidden states"
            )
        loss_fn = HIDDEN_LOSSES[self.loss_name]
        total: Tensor | None = None
        for i, (s_layer, t_layer) in enumerate(self.pairs):
            student = student_hidden_states[s_layer]
            teacher = teacher_hidden_states[t_layer].detach()
            if len(self.student_filters):
                filt = self.student_filters[i]
                student = filt(student.to(filt.weight.dtype))
            if len(self.teacher_filters):
                filt = self.teacher_filters[i]
                with torch.no_grad():
                    teacher = filt(teacher.to(filt.weight.dtype))
            term = loss_fn(student, teacher, mask)
            total = term if total is None else total + term
        assert total is not None
        return total / len(self.pairs)
