"""The chunked, fused distillation loss: from hidden states to loss and gradients, V-sized work per chunk.

The plain path (:mod:`mydistill.losses.divergences`) needs the student's ``(N, V)`` logits, the
teacher's, their softmaxes and the logits' gradient, all in fp32: at V = 128k and N = 16k tokens
that is ~8 GiB per tensor. Here the student's output projection is fused into the loss, Liger-style:

* the student gives its final hidden states ``(N, H)`` and head ``(V, H)`` (and bias), fp32 or bf16;
* the teacher is any :class:`~mydistill.losses.teacher_signal.TeacherSignal`; given as hidden states + head
  its logits are never materialised either;
* tokens are processed ``chunk_size`` valid rows at a time; per chunk the logits are computed in
  an fp32 buffer, the loss and its gradient w.r.t. the logits are evaluated (the divergence's
  table row, its gradient by autograd on the chunk, or its hand-fused form), and the gradient is
  pushed straight through the projection into ``d hidden`` and ``d weight`` (and ``d bias``);
* the gradients are accumulated in the inputs' own dtypes: a bf16 head's gradient is summed in
  place in bf16 (each chunk's matmul accumulates in fp32), so no fp32 ``(V, H)`` copy of the head
  and no ``(N, V)`` fp32 tensor exists at any point;
* the custom :class:`torch.autograd.Function` therefore does all the work in forward; its backward
  only scales the stored gradients by the incoming one.

Peak extra memory is a few ``(chunk_size, V)`` fp32 buffers (three for forward KL, reused across
chunks, so the allocator is not hit per chunk; the autograd-derived divergences take a few
chunk-sized temporaries more) plus the gradients the caller gets anyway. Tokens marked invalid
(``labels == ignore_index`` / ``mask`` false) never reach the vocabulary projection.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from mydistill.losses.divergences import DistillLossParts, check_mix, valid_token_mask
from mydistill.losses.teacher_signal import TeacherSignal, as_signal, linear_into, work_dtype
from mydistill.losses.table import DistillMix, lookup, rows_and_grad, softmax_lse_

_FUSED = {"enabled": True}


@contextlib.contextmanager
def hand_fused(enabled: bool) -> Iterator[None]:
    """Turn the table's hand-fused forms off (``False``: autograd for every divergence), for tests and benchmarks."""
    saved, _FUSED["enabled"] = _FUSED["enabled"], enabled
    try:
        yield
    finally:
        _FUSED["enabled"] = saved


def auto_chunk_size(n_rows: int, weight: Tensor) -> int:
    """Rows per chunk chosen from the shapes: the ``(chunk, V)`` fp32 work buffers (three to six)
    together about the size of the head ``(V, H)`` in its own dtype, so the loss's extra memory stays
    near that of the head's gradient, which every path holds anyway. A power of two in [16, 4096]
    (H = 4096 in bf16 gives 512), and no more than the rows there are."""
    budget = weight.shape[1] * weight.element_size() // 16
    return max(1, min(n_rows, 1 << max(4, min(12, budget.bit_length() - 1))))


@dataclass
class _Plan:
    """Everything the chunk loop needs besides the three differentiable inputs."""

    labels: Tensor | None  # (N,) int64
    rows: Tensor | None  # (n_valid,) indices of valid rows, None when all N are valid
    n_valid: int
    teacher: TeacherSignal | None  # checked: flattened (N, ...), detached
    mix: DistillMix
    kd_scale: float  # loss = kd_scale * mean(kd) + ce_scale * mean(ce)
    ce_scale: float
    chunk_size: int
    compute_agreement: bool

    def chunks(self) -> Iterator[slice | Tensor]:
        for start in range(0, self.n_valid, self.chunk_size):
            stop = min(start + self.chunk_size, self.n_valid)
            yield slice(start, stop) if self.rows is None else self.rows[start:stop]


class _Workspace:
    """(rows, V) buffers allocated once and reused for every chunk."""

    def __init__(self, rows: int, vocab: int, like: Tensor, dtype: torch.dtype) -> None:
        self.rows, self.vocab, self.like, self.dtype = rows, vocab, like, dtype
        self._buffers: dict[str, Tensor] = {}

    def get(self, name: str, rows: int) -> Tensor:
        if name not in self._buffers:
            self._buffers[name] = self.like.new_empty(self.rows, self.vocab, dtype=self.dtype)
        return self._buffers[name][:rows]


class _Grads:
    """d hidden, d weight, d bias, accumulated chunk by chunk in the inputs' own dtypes."""

    def __init__(self, hidden: Tensor, weight: Tensor, bias: Tensor | None, needs: tuple[bool, ...]) -> None:
        self.hidden = torch.zeros_like(hidden) if needs[0] else None
        # in place in the head's dtype (as Liger): a bf16 head gets no fp32 (V, H) accumulator
        self.weight = torch.zeros_like(weight) if needs[1] else None
        self.bias = torch.zeros(weight.shape[0], dtype=work_dtype(weight), device=weight.device) if needs[2] else None
        self.bias_dtype = None if bias is None else bias.dtype

    def push(self, grad: Tensor, h_c: Tensor, weight: Tensor, sel: slice | Tensor) -> None:
        """Add one chunk's ``d loss / d logits (c, V)`` through the projection."""
        low = grad.to(weight.dtype)  # a no-op for an fp32 head; one (c, V) bf16 copy otherwise
        if self.hidden is not None:
            g_h = (low @ weight).to(self.hidden.dtype)
            if isinstance(sel, slice):
                self.hidden[sel] = g_h
            else:
                self.hidden.index_copy_(0, sel, g_h)
        if self.weight is not None:
            self.weight.addmm_(low.t(), h_c.to(weight.dtype))
        if self.bias is not None:
            self.bias.add_(grad.sum(0))

    def as_tuple(self) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        bias = None if self.bias is None or self.bias_dtype is None else self.bias.to(self.bias_dtype)
        return self.hidden, self.weight, bias


def _kd_chunk(z: Tensor, teacher: TeacherSignal, mix: DistillMix, ws: _Workspace) -> tuple[Tensor, Tensor, Tensor]:
    """Divergence rows ``(c,)``, their gradient w.r.t. ``z = s / T`` and the teacher's top-1; ``z`` is overwritten."""
    entry, (c, vocab) = mix.entry, z.shape
    ids = teacher.category_ids()
    dense_out = ws.get("b", c) if ids is None else None  # a top-k teacher's categories are (c, k + 1): small
    if entry.on_logits:
        target = teacher.scaled_logits(mix.temperature, dense_out)
    else:
        target = teacher.category_log_probs(mix.temperature, vocab, dense_out)
    top = teacher.top1(target)  # before a fused form overwrites target
    if entry.fused is not None and ids is None and _FUSED["enabled"]:
        rows, grad = entry.fused(z, target, ws.get("s", c))
    else:
        rows, grad = rows_and_grad(entry, z, target, ids, mix.param, out=ws.get("s", c))
    return rows, grad, top


def _chunk_loss(logits: Tensor, sel: slice | Tensor, plan: _Plan, ws: _Workspace, stats: Tensor) -> Tensor | None:
    """Add one chunk's [kd_sum, ce_sum, agree_sum] to ``stats``; return ``d loss / d logits`` or None.

    ``logits`` (a workspace buffer) is overwritten.
    """
    c = logits.shape[0]
    teacher = None if plan.teacher is None else plan.teacher.rows(sel)
    student_top = logits.argmax(dim=-1) if plan.compute_agreement and teacher is not None else None
    grad: Tensor | None = None
    ce_w, kd_w = plan.ce_scale / plan.n_valid, plan.kd_scale / plan.n_valid
    if plan.labels is not None:
        labels_c = plan.labels[sel].unsqueeze(-1)
        soft = ws.get("s", c)
        stats[1] += (softmax_lse_(logits, soft) - logits.gather(-1, labels_c)).sum()
        if ce_w != 0.0:
            # d CE / d s = softmax - onehot; the KD term below reuses "s", so then it needs a copy
            grad = torch.mul(soft, ce_w, out=ws.get("g", c)) if teacher is not None else soft.mul_(ce_w)
            grad.scatter_add_(-1, labels_c, torch.full_like(labels_c, -ce_w, dtype=grad.dtype))
    if teacher is None:
        return grad
    inv_t = 1.0 / plan.mix.temperature
    rows, grad_z, teacher_top = _kd_chunk(logits.mul_(inv_t) if inv_t != 1.0 else logits, teacher, plan.mix, ws)
    stats[0] += rows.sum()
    if student_top is not None:
        stats[2] += (student_top == teacher_top).sum()
    if kd_w != 0.0:  # d/ds = (1 / T) d/dz
        grad = grad_z.mul_(kd_w * inv_t) if grad is None else grad.add_(grad_z, alpha=kd_w * inv_t)
    return grad


def _run_chunks(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, plan: _Plan, needs: tuple[bool, ...]
) -> tuple[Tensor, Tensor, _Grads]:
    """(loss, stats [kd_sum, ce_sum, agree_sum, n_valid], gradients) over all chunks."""
    dtype = work_dtype(hidden)  # all vocabulary-sized math in fp32 (fp64 inputs stay fp64, for tight tests)
    stats = torch.zeros(4, dtype=dtype, device=hidden.device)
    stats[3] = plan.n_valid
    grads = _Grads(hidden, weight, bias, needs)
    if plan.n_valid == 0:
        return stats.new_zeros(()), stats, grads
    ws = _Workspace(min(plan.chunk_size, plan.n_valid), weight.shape[0], hidden, dtype)
    with torch.autocast(hidden.device.type, enabled=False):
        for sel in plan.chunks():
            h_c = hidden[sel]
            logits = linear_into(h_c, weight, bias, ws.get("a", h_c.shape[0]))
            grad = _chunk_loss(logits, sel, plan, ws, stats)
            if grad is not None and any(needs):
                grads.push(grad, h_c, weight, sel)
    return stats[0] * plan.kd_scale / plan.n_valid + stats[1] * plan.ce_scale / plan.n_valid, stats, grads


class FusedLinearDistillFunction(torch.autograd.Function):
    """Loss and gradients in one pass over token chunks; backward only scales the stored gradients."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, plan: _Plan) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        loss, stats, grads = _run_chunks(hidden, weight, bias, plan, tuple(ctx.needs_input_grad[:3]))
        ctx.save_for_backward(*grads.as_tuple())
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: Tensor, _grad_stats: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        grads = list(ctx.saved_tensors)
        # the loss is usually the graph's root (grad 1): skip a full V x H copy of the weight gradient
        if grad_loss is not None and bool(grad_loss.ne(1.0)):
            grads = [None if g is None else g * grad_loss.to(g.dtype) for g in grads]
        return grads[0], grads[1], grads[2], None


def _plan(
    hidden: Tensor,
    weight: Tensor,
    teacher: Any,
    labels: Tensor | None,
    mask: Tensor | None,
    mix: DistillMix,
    chunk_size: int | None,
    compute_agreement: bool,
    kd_only: bool,
) -> _Plan:
    """Check the inputs and fix the chunking; ``kd_only``: the divergence alone (no T², no CE)."""
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"student_weight must be (V, H) with H = {hidden.shape[1]}, got {tuple(weight.shape)}")
    if chunk_size is not None and chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive number of tokens (or None: from the shapes), got {chunk_size}")
    signal = as_signal(teacher)
    if kd_only and signal is None:
        raise ValueError(f"the {mix.divergence} divergence needs a teacher")
    check_mix(signal, labels, replace(mix, alpha=1.0) if kd_only else mix)
    n_tokens = hidden.shape[0]
    if signal is not None:
        signal = signal.checked(n_tokens, weight.shape[0])
    valid = valid_token_mask(n_tokens, mask, labels, mix.ignore_index, hidden.device)
    n_valid = int(valid.sum())
    if signal is None:
        kd_scale, ce_scale = 0.0, 1.0
    elif kd_only:
        kd_scale, ce_scale = 1.0, 0.0
    else:
        kd_scale, ce_scale = mix.alpha * mix.temperature**2, 1.0 - mix.alpha if labels is not None else 0.0
    return _Plan(
        labels=None if labels is None or kd_only else labels.reshape(-1).to(device=hidden.device, dtype=torch.long),
        rows=None if n_valid == n_tokens else valid.nonzero().squeeze(-1),
        n_valid=n_valid,
        teacher=signal,
        mix=mix,
        kd_scale=kd_scale,
        ce_scale=ce_scale,
        chunk_size=chunk_size or auto_chunk_size(max(n_valid, 1), weight),
        compute_agreement=compute_agreement and signal is not None,
    )


def _apply(hidden: Tensor, weight: Tensor, bias: Tensor | None, plan: _Plan) -> DistillLossParts:
    differentiable = [t for t in (hidden, weight, bias) if t is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in differentiable):
        loss, stats = FusedLinearDistillFunction.apply(hidden, weight, bias, plan)
    else:
        loss, stats, _ = _run_chunks(hidden, weight, bias, plan, (False, False, False))
    n = stats[3].clamp_min(1)
    agreement = stats[2] / n if plan.compute_agreement else None
    return DistillLossParts(loss, kd=stats[0] / n, ce=stats[1] / n, teacher_agreement=agreement, num_tokens=stats[3].long())


def chunked_distill_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher: Any = None,
    *,
    labels: Tensor | None = None,
    mask: Tensor | None = None,
    mix: DistillMix = DistillMix(),
    student_bias: Tensor | None = None,
    chunk_size: int | None = None,
    compute_agreement: bool = False,
) -> DistillLossParts:
    """The Hinton soft/hard mix of :func:`~mydistill.losses.divergences.distill_loss`, fused and chunked.

    ``loss = alpha * T² * D_T + (1 - alpha) * CE`` with the student's logits ``hidden @ weight.T + bias``
    computed ``chunk_size`` valid tokens at a time; without a teacher, ``loss = CE``.

    Args:
        student_hidden: ``(N, H)`` (or ``(..., H)``) final hidden states, fp32 or bf16; position i
            predicts ``labels[i]``.
        student_weight: ``(V, H)`` output projection (lm head); its gradient keeps its dtype.
        teacher: any :class:`TeacherSignal` (``HiddenHead`` keeps the teacher's logits chunked too),
            ``(N, V)`` logits, a list of them (equal-weight ensemble), or None.
        labels: ``(N,)`` hard targets; ``mix.ignore_index`` marks tokens to skip everywhere.
        mask: ``(N,)`` optional extra validity mask.
        mix: divergence, temperature, alpha and the divergence's parameter (:class:`DistillMix`).
        student_bias: ``(V,)`` or None.
        chunk_size: valid tokens per chunk; None chooses it from the shapes (:func:`auto_chunk_size`).
        compute_agreement: also count student/teacher top-1 agreement (two argmax passes per chunk).

    The teacher is a constant: no gradient flows to its logits, hidden states or head.
    """
    hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
    plan = _plan(hidden, student_weight, teacher, labels, mask, mix, chunk_size, compute_agreement, kd_only=False)
    return _apply(hidden, student_weight, student_bias, plan)


def chunked_divergence(
    name: str,
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher: Any,
    *,
    student_bias: Tensor | None = None,
    labels: Tensor | None = None,
    mask: Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    **param: float,
) -> Tensor:
    """``DIVERGENCES[name]`` (mean over valid tokens, no T²) from hidden states, chunked and fused.

    ``param`` is the divergence's own keyword under its paper's name (``beta=``, ``alpha=``), as in
    :func:`~mydistill.losses.divergences.generalized_jsd` and :func:`~mydistill.losses.divergences.skew_kl`.
    """
    row = lookup(name)
    if set(param) - {row.param}:
        raise TypeError(f"{name} takes {row.param or 'no parameter'}, got {sorted(param)}")
    fields = {"beta": "beta", "alpha": "skew_alpha"}
    mix = DistillMix(name, temperature, 1.0, **{fields[key]: value for key, value in param.items()})
    hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
    plan = _plan(hidden, student_weight, teacher, labels, mask, mix, chunk_size, False, kd_only=True)
    return _apply(hidden, student_weight, student_bias, plan).loss


def chunked_cross_entropy(
    student_hidden: Tensor,
    student_weight: Tensor,
    labels: Tensor,
    student_bias: Tensor | None = None,
    *,
    mask: Tensor | None = None,
    ignore_index: int = -100,
    chunk_size: int | None = None,
) -> Tensor:
    """Hard-label cross-entropy from hidden states without materialising ``(N, V)`` logits."""
    mix = DistillMix(ignore_index=ignore_index)
    parts = chunked_distill_loss(
        student_hidden, student_weight, labels=labels, mask=mask, mix=mix, student_bias=student_bias, chunk_size=chunk_size
    )
    return parts.loss
