"""The chunked, fused distillation loss: from hidden states to loss and gradients, V-sized work per chunk.

The plain path (:mod:`mydistill.losses.divergences`) needs the student's ``(N, V)`` logits, the
teacher's, their softmaxes and the logits' gradient, all in fp32: at V = 128k and N = 16k tokens
that is ~8 GiB per tensor. Here the student's output projection is fused into the loss, Liger-style:

* the student gives its final hidden states ``(N, H)`` and head weight ``(V, H)`` (and bias);
* the teacher gives ``(N, V)`` logits, or its own hidden states and head (then its logits are never
  materialised either), or a sparse :class:`~mydistill.losses.teacher.TopKTeacher`, or a list of
  dense teachers mixed as an ensemble;
* tokens are processed in chunks of ``chunk_size`` valid rows; per chunk the logits are computed,
  the loss and its closed-form gradient w.r.t. the logits are evaluated, and the gradient is pushed
  straight through the projection into ``d hidden`` and ``d weight`` (and ``d bias``);
* the custom :class:`torch.autograd.Function` therefore does all the work in forward; its backward
  only scales the stored gradients by the incoming one.

Peak extra memory is three to six ``(chunk_size, V)`` fp32 work buffers (four for forward KL; one
more for JSD/skew, one more when the CE term is on; reused across chunks, so the allocator is not
hit per chunk) plus the gradients the caller gets anyway. Tokens marked
invalid (``labels == ignore_index`` / ``mask`` false) never reach the vocabulary projection.

Every divergence of :data:`~mydistill.losses.divergences.DIVERGENCES` is supported, plus the
hard-label CE term of the Hinton mix and CE alone (no teacher); the tests hold loss and gradients
equal to the plain path in fp32 to 1e-5.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from mydistill.losses.divergences import (
    DistillLossParts,
    _log_mix,
    _p_log_ratio,
    check_mix,
    valid_token_mask,
)
from mydistill.losses.teacher import TopKTeacher, check_vocab, normalized_weights

Selection = slice | Tensor


# --------------------------------------------------------------------------------------------
# teacher sources: each fills a (c, V) fp32 buffer with one chunk of teacher logits
# --------------------------------------------------------------------------------------------


def _linear_into(x: Tensor, weight: Tensor, bias: Tensor | None, out: Tensor) -> None:
    """``out[:] = x @ weight.T + bias`` in fp32 (the matmul itself runs in the weight's dtype)."""
    if x.dtype == weight.dtype == out.dtype:
        torch.mm(x, weight.t(), out=out)
    else:
        # bf16/fp16 matmul (fp32 accumulation inside), then upcast the chunk only
        out.copy_(x.to(weight.dtype) @ weight.t())
    if bias is not None:
        out.add_(bias)


class _LogitsSource:
    def __init__(self, logits: Tensor) -> None:
        self.logits = logits

    def load(self, sel: Selection, out: Tensor) -> None:
        if isinstance(sel, Tensor) and self.logits.dtype == out.dtype:
            torch.index_select(self.logits, 0, sel, out=out)
        else:
            out.copy_(self.logits[sel])


class _HeadSource:
    def __init__(self, hidden: Tensor, weight: Tensor, bias: Tensor | None) -> None:
        self.hidden, self.weight, self.bias = hidden, weight, bias

    def load(self, sel: Selection, out: Tensor) -> None:
        _linear_into(self.hidden[sel], self.weight, self.bias, out)


@dataclass
class _Plan:
    """Everything the chunk loop needs besides the three differentiable inputs."""

    labels: Tensor | None  # (N,) int64
    rows: Tensor | None  # (n_valid,) indices of valid rows, None when all N are valid
    n_valid: int
    sources: list[_LogitsSource | _HeadSource]  # empty: no dense teacher
    source_weights: list[float]
    topk: TopKTeacher | None  # flattened (N, k)
    divergence: str
    temperature: float
    beta: float
    skew_alpha: float
    kd_scale: float  # loss = kd_scale * mean(kd) + ce_scale * mean(ce)
    ce_scale: float
    chunk_size: int
    compute_agreement: bool

    @property
    def has_teacher(self) -> bool:
        return bool(self.sources) or self.topk is not None


class _Workspace:
    """(rows, V) fp32 buffers allocated once and reused for every chunk."""

    def __init__(self, rows: int, vocab: int, device: torch.device, dtype: torch.dtype) -> None:
        self.rows, self.vocab, self.device, self.dtype = rows, vocab, device, dtype
        self._buffers: dict[str, Tensor] = {}

    def get(self, name: str, rows: int) -> Tensor:
        if name not in self._buffers:
            self._buffers[name] = torch.empty(self.rows, self.vocab, dtype=self.dtype, device=self.device)
        return self._buffers[name][:rows]


def _softmax_lse(x: Tensor, out: Tensor, *, normalize: bool = True) -> Tensor:
    """Row logsumexp ``(c, 1)`` of ``x`` using ``out`` as scratch; leaves ``softmax(x)`` in ``out``.

    ``torch.logsumexp`` would allocate a fresh (c, V) temporary each call; this reuses a buffer.
    """
    m = x.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    torch.sub(x, m, out=out)
    out.exp_()
    s = out.sum(dim=-1, keepdim=True)
    if normalize:
        out.div_(s)
    return m + s.log()


def _rows_and_u(
    name: str, lq: Tensor, lp: Tensor, q: Tensor, p: Tensor, beta: float, skew_alpha: float
) -> tuple[Tensor, Tensor]:
    """Per-row divergence and ``u = dD/d(log q)`` (treating each q_c as free) in closed form.

    The gradient w.r.t. the scaled logits z is then ``u - q * sum(u)`` (softmax Jacobian), or its
    top-k/tail expansion for a sparse teacher. Derivations, with m the mixture of each divergence:
    forward KL ``u = -p``; reverse KL ``u = q (log q - log p + 1)``; JSD(β) ``u = (1-β) q (log q - log m)``;
    skew KL ``u = -(1-α) p q / m``; skew reverse KL ``u = q (log q - log m + 1) - α q² / m``;
    TVD ``u = q sign(q - p) / 2``.
    """
    if name == "generalized_jsd" and beta == 0.0:
        name = "forward_kl"
    elif name == "generalized_jsd" and beta == 1.0:
        name = "reverse_kl"
    if name == "forward_kl":
        return _p_log_ratio(p, lp, lq).sum(-1), -p
    if name == "reverse_kl":
        return _p_log_ratio(q, lq, lp).sum(-1), q * (lq - lp + 1.0)
    if name == "symmetric_kl":
        rows_f, u_f = _rows_and_u("forward_kl", lq, lp, q, p, beta, skew_alpha)
        rows_r, u_r = _rows_and_u("reverse_kl", lq, lp, q, p, beta, skew_alpha)
        return rows_f + rows_r, u_f + u_r
    if name == "generalized_jsd":
        lm = _log_mix(lp, beta, lq, 1.0 - beta)
        rows = beta * _p_log_ratio(p, lp, lm).sum(-1) + (1.0 - beta) * _p_log_ratio(q, lq, lm).sum(-1)
        return rows, (1.0 - beta) * q * (lq - lm)
    if name == "skew_kl":
        lm = _log_mix(lp, skew_alpha, lq, 1.0 - skew_alpha)
        u = torch.where(p > 0, torch.exp(lp + lq - lm), 0.0) * -(1.0 - skew_alpha)
        return _p_log_ratio(p, lp, lm).sum(-1), u
    if name == "skew_reverse_kl":
        lm = _log_mix(lp, 1.0 - skew_alpha, lq, skew_alpha)
        u = q * (lq - lm + 1.0)
        if skew_alpha > 0.0:
            u = u - torch.exp(math.log(skew_alpha) + 2.0 * lq - lm)
        return _p_log_ratio(q, lq, lm).sum(-1), u
    if name == "tvd":
        diff = q - p
        return 0.5 * diff.abs().sum(-1), 0.5 * q * diff.sign()
    raise ValueError(f"unknown divergence {name!r}")


def _load_teacher_log_probs(
    plan: _Plan, sel: Selection, ws: _Workspace, c: int
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Dense teacher log-probs at T in buffer "b", probs in "p", and the teacher's top-1 if wanted.

    An ensemble is mixed in log space, ``log sum_k w_k p_k``, one teacher at a time through the
    extra buffer "t", so memory does not grow with the number of teachers.
    """
    inv_t = 1.0 / plan.temperature
    ensemble = len(plan.sources) > 1
    lp = ws.get("b", c)
    p = ws.get("p", c)  # scratch until the end
    top = None
    for i, (source, weight) in enumerate(zip(plan.sources, plan.source_weights, strict=True)):
        target = lp if i == 0 else ws.get("t", c)
        source.load(sel, target)
        if not ensemble and plan.compute_agreement:
            top = target.argmax(dim=-1)
        if inv_t != 1.0:
            target.mul_(inv_t)
        target.sub_(_softmax_lse(target, p, normalize=False))
        if ensemble:
            target.add_(math.log(weight))
            if i > 0:
                torch.logaddexp(lp, target, out=lp)
    if ensemble and plan.compute_agreement:
        top = lp.argmax(dim=-1)
    torch.exp(lp, out=p)
    return lp, p, top


def _kd_chunk(z: Tensor, sel: Selection, plan: _Plan, ws: _Workspace, c: int) -> tuple[Tensor, Tensor, Tensor | None]:
    """Divergence rows ``(c,)``, gradient w.r.t. ``z = s / T`` (a workspace buffer) and teacher top-1.

    ``z`` holds the student's scaled logits and is overwritten.
    """
    name = plan.divergence
    scratch = ws.get("s", c)
    if name == "logit_mse":
        t = ws.get("b", c)
        plan.sources[0].load(sel, t)
        top = t.argmax(dim=-1) if plan.compute_agreement else None
        t.mul_(1.0 / plan.temperature)
        torch.sub(z, t, out=t)  # d = z - t / T
        torch.mul(t, t, out=scratch)
        rows = scratch.sum(-1) / z.shape[-1]
        torch.mul(t, 2.0 / z.shape[-1], out=scratch)
        return rows, scratch, top

    if plan.topk is not None:
        return _kd_chunk_topk(z, sel, plan, scratch)

    # dense teacher: lq in z, q in scratch, lp in "b", p in "p"
    lse = _softmax_lse(z, scratch)
    z.sub_(lse)
    lp, p, top = _load_teacher_log_probs(plan, sel, ws, c)
    rows, grad_z = _dense_rows_and_grad(name, z, lp, scratch, p, lambda: ws.get("t", c), plan.beta, plan.skew_alpha)
    return rows, grad_z, top


def _finite_or_zero_(x: Tensor) -> Tensor:
    """In place: nan -> 0 (the ``0 * log 0`` and ``0 / 0`` cases), infinities kept."""
    return x.nan_to_num_(nan=0.0, posinf=math.inf, neginf=-math.inf)


def _dense_rows_and_grad(
    name: str, lq: Tensor, lp: Tensor, q: Tensor, p: Tensor, extra: Callable[[], Tensor], beta: float, skew_alpha: float
) -> tuple[Tensor, Tensor]:
    """Per-row divergence and its gradient w.r.t. the scaled logits, in place over ``(c, V)`` buffers.

    Same math as :func:`_rows_and_u` followed by ``grad = u - q * sum(u)``, rearranged so that no
    (c, V) temporary is allocated: the four inputs are overwritten and at most one ``extra`` buffer
    is taken. Returns (rows, a buffer holding the gradient).
    """
    if name == "generalized_jsd" and beta == 0.0:
        name = "forward_kl"
    elif name == "generalized_jsd" and beta == 1.0:
        name = "reverse_kl"
    if name in ("skew_kl", "skew_reverse_kl") and skew_alpha == 1.0:
        return lq.new_zeros(lq.shape[0]), q.zero_()  # the mixture is the distribution itself

    if name == "forward_kl":
        p_sum = p.sum(-1, keepdim=True)
        rows = _finite_or_zero_(torch.sub(lp, lq, out=lp).mul_(p)).sum(-1)
        return rows, q.mul_(p_sum).sub_(p)  # u = -p

    if name == "reverse_kl":
        d = torch.sub(lq, lp, out=p)  # p is not needed: reuse its buffer
        rows = _finite_or_zero_(torch.mul(q, d, out=lq)).sum(-1)
        u_sum = rows + q.sum(-1)  # sum of u = q (d + 1)
        return rows, d.add_(1.0 - u_sum.unsqueeze(-1)).mul_(q)

    if name == "symmetric_kl":
        d = torch.sub(lp, lq, out=lp)  # log p - log q
        q_d = torch.mul(q, d, out=lq).sum(-1)
        p_d = _finite_or_zero_(torch.mul(p, d, out=lq)).sum(-1)
        rows = p_d - q_d
        u_sum = (q.sum(-1) - p.sum(-1) - q_d).unsqueeze(-1)  # u = -p + q (1 - d)
        return rows, d.neg_().add_(1.0).sub_(u_sum).mul_(q).sub_(p)

    if name == "generalized_jsd":
        log_b, log_1b = math.log(beta), math.log1p(-beta)
        lm = torch.logaddexp(lp.add_(log_b), lq.add_(log_1b), out=extra())
        rows_p = _finite_or_zero_(lp.sub_(lm).sub_(log_b).mul_(p)).sum(-1)  # p (log p - log m)
        lq.sub_(lm).sub_(log_1b)  # log q - log m
        q_lr = torch.mul(q, lq, out=lp)
        rows_q = _finite_or_zero_(q_lr).sum(-1)
        rows = beta * rows_p + (1.0 - beta) * rows_q
        # u = (1 - β) q (log q - log m); sum(u) = (1 - β) rows_q
        return rows, q_lr.sub_(q.mul_(rows_q.unsqueeze(-1))).mul_(1.0 - beta)

    if name == "skew_kl":
        a = skew_alpha
        m = torch.mul(p, a, out=extra()).add_(q, alpha=1.0 - a)
        u = _finite_or_zero_(torch.mul(p, q, out=lq).div_(m).mul_(-(1.0 - a)))  # -(1 - α) p q / m
        rows = _finite_or_zero_(lp.sub_(m.log_()).mul_(p)).sum(-1)
        u_sum = u.sum(-1, keepdim=True)
        return rows, u.sub_(q.mul_(u_sum))

    if name == "skew_reverse_kl":
        a = skew_alpha
        m = torch.mul(p, 1.0 - a, out=extra()).add_(q, alpha=a)
        sq = _finite_or_zero_(torch.mul(q, q, out=lp).div_(m).mul_(a))  # α q² / m
        lq.sub_(m.log_())  # log q - log m
        u = _finite_or_zero_(torch.mul(q, lq, out=p))
        rows = u.sum(-1)
        u.add_(q).sub_(sq)  # u = q (log q - log m + 1) - α q² / m
        u_sum = u.sum(-1, keepdim=True)
        return rows, u.sub_(q.mul_(u_sum))

    if name == "tvd":
        diff = torch.sub(q, p, out=lp)
        rows = 0.5 * torch.abs(diff, out=lq).sum(-1)
        u = diff.sign_().mul_(q).mul_(0.5)
        u_sum = u.sum(-1, keepdim=True)
        return rows, u.sub_(q.mul_(u_sum))

    raise ValueError(f"unknown divergence {name!r}")


def _kd_chunk_topk(z: Tensor, sel: Selection, plan: _Plan, scratch: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
    assert plan.topk is not None
    teacher = plan.topk.rows(sel)
    ids = teacher.token_ids.long()
    k, vocab = ids.shape[-1], z.shape[-1]
    lp = teacher.category_log_probs(plan.temperature, vocab).to(z.dtype)
    top = teacher.argmax_ids() if plan.compute_agreement else None
    lse = _softmax_lse(z, scratch, normalize=False)
    lq = z.gather(-1, ids) - lse
    if k < vocab:
        # the tail category: everything not listed; scratch becomes softmax over the tail only
        z.scatter_(-1, ids, -math.inf)
        lse_tail = _softmax_lse(z, scratch)
        lq = torch.cat([lq, lse_tail - lse], dim=-1)
    q = lq.exp()
    rows, u = _rows_and_u(plan.divergence, lq, lp, q, lp.exp(), plan.beta, plan.skew_alpha)
    u_sum = u.sum(-1, keepdim=True)
    if k < vocab:
        # a tail token j gets (q_j / q_tail) * u_tail - q_j * sum(u) = softmax_tail_j * (u_tail - q_tail * sum(u))
        scratch.mul_(u[:, k:] - q[:, k:] * u_sum)
    else:
        scratch.zero_()
    scratch.scatter_(-1, ids, u[:, :k] - q[:, :k] * u_sum)
    return rows, scratch, top


@dataclass
class _Result:
    loss: Tensor
    stats: Tensor  # [kd_sum, ce_sum, agree_sum, n_valid]
    grad_hidden: Tensor | None
    grad_weight: Tensor | None
    grad_bias: Tensor | None


def _run_chunks(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, plan: _Plan, needs: tuple[bool, bool, bool]
) -> _Result:
    need_gh, need_gw, need_gb = needs
    need_grad = any(needs)
    n_tokens, width = hidden.shape
    vocab = weight.shape[0]
    device = hidden.device
    # all vocabulary-sized math in fp32 (fp64 inputs stay fp64, for tight tests)
    work_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    stats = torch.zeros(4, dtype=work_dtype, device=device)
    stats[3] = plan.n_valid
    grad_h = torch.zeros_like(hidden) if need_gh else None
    # fp32 accumulators: a bf16 weight gradient summed over many chunks would lose bits
    grad_w = torch.zeros(vocab, width, dtype=work_dtype, device=device) if need_gw else None
    grad_b = torch.zeros(vocab, dtype=work_dtype, device=device) if need_gb else None
    if plan.n_valid == 0:
        return _Result(stats.new_zeros(()), stats, grad_h, _cast(grad_w, weight), _cast(grad_b, bias))

    inv_t = 1.0 / plan.temperature
    kd_w = plan.kd_scale / plan.n_valid
    ce_w = plan.ce_scale / plan.n_valid
    chunk = min(plan.chunk_size, plan.n_valid)
    ws = _Workspace(chunk, vocab, device, work_dtype)
    with torch.autocast(device.type, enabled=False):
        for start in range(0, plan.n_valid, chunk):
            stop = min(start + chunk, plan.n_valid)
            c = stop - start
            sel: Selection = slice(start, stop) if plan.rows is None else plan.rows[start:stop]
            h_c = hidden[sel]
            logits = ws.get("a", c)
            _linear_into(h_c, weight, bias, logits)
            # d loss / d logits for this chunk; a buffer of its own only when CE and KD both add to it
            grad: Tensor | None = None
            student_top = logits.argmax(dim=-1) if plan.compute_agreement and plan.has_teacher else None

            if plan.labels is not None:
                labels_c = plan.labels[sel].unsqueeze(-1)
                soft = ws.get("s", c)
                lse = _softmax_lse(logits, soft)
                stats[1] += (lse - logits.gather(-1, labels_c)).sum()
                if need_grad and ce_w != 0.0:
                    # d CE / d s = softmax - onehot; the KD term below reuses "s", so then it needs a copy
                    grad = torch.mul(soft, ce_w, out=ws.get("g", c)) if plan.has_teacher else soft.mul_(ce_w)
                    grad.scatter_add_(-1, labels_c, torch.full_like(labels_c, -ce_w, dtype=grad.dtype))

            if plan.has_teacher:
                if inv_t != 1.0:
                    logits.mul_(inv_t)
                rows, grad_z, teacher_top = _kd_chunk(logits, sel, plan, ws, c)
                stats[0] += rows.sum()
                if student_top is not None and teacher_top is not None:
                    stats[2] += (student_top == teacher_top).sum()
                if need_grad and kd_w != 0.0:
                    # d/ds = (1 / T) d/dz
                    if grad is None:
                        grad = grad_z.mul_(kd_w * inv_t)
                    else:
                        grad.add_(grad_z, alpha=kd_w * inv_t)

            if grad is None:
                continue
            if grad_h is not None:
                low = grad if weight.dtype == work_dtype else grad.to(weight.dtype)
                g_h = (low @ weight).to(hidden.dtype)
                if isinstance(sel, slice):
                    grad_h[sel] = g_h
                else:
                    grad_h.index_copy_(0, sel, g_h)
            if grad_w is not None:
                if weight.dtype == work_dtype:
                    grad_w.addmm_(grad.t(), h_c.to(work_dtype))
                else:
                    grad_w.add_(grad.to(weight.dtype).t() @ h_c.to(weight.dtype))
            if grad_b is not None:
                grad_b.add_(grad.sum(0))

    loss = stats[0] * kd_w + stats[1] * ce_w
    return _Result(loss, stats, grad_h, _cast(grad_w, weight), _cast(grad_b, bias))


def _cast(grad: Tensor | None, like: Tensor | None) -> Tensor | None:
    if grad is None or like is None:
        return grad
    return grad.to(like.dtype)


class FusedLinearDistillFunction(torch.autograd.Function):
    """Loss and gradients in one pass over token chunks; backward only scales the stored gradients."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, plan: _Plan) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        needs = tuple(ctx.needs_input_grad[:3])
        result = _run_chunks(hidden, weight, bias, plan, needs)  # type: ignore[arg-type]
        ctx.save_for_backward(result.grad_hidden, result.grad_weight, result.grad_bias)
        ctx.mark_non_differentiable(result.stats)
        return result.loss, result.stats

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: Tensor, _grad_stats: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        grads = list(ctx.saved_tensors)
        # the loss is usually the graph's root (grad 1): skip a full V x H copy of the weight gradient
        if grad_loss is not None and bool(grad_loss.ne(1.0)):
            grads = [None if g is None else g * grad_loss.to(g.dtype) for g in grads]
        return grads[0], grads[1], grads[2], None


def _as_list(x: Tensor | Sequence[Tensor] | None) -> list[Tensor]:
    if x is None:
        return []
    if isinstance(x, Tensor):
        return [x]
    return list(x)


def _build_plan(
    n_tokens: int,
    vocab: int,
    device: torch.device,
    *,
    labels: Tensor | None,
    mask: Tensor | None,
    teacher_logits: Tensor | Sequence[Tensor] | None,
    teacher_hidden: Tensor | Sequence[Tensor] | None,
    teacher_weight: Tensor | Sequence[Tensor] | None,
    teacher_bias: Tensor | Sequence[Tensor | None] | None,
    teacher_topk: TopKTeacher | None,
    teacher_weights: Sequence[float] | None,
    divergence: str,
    temperature: float,
    alpha: float,
    beta: float,
    skew_alpha: float,
    ignore_index: int,
    chunk_size: int,
    compute_agreement: bool,
    kd_scale: float | None,
) -> _Plan:
    given = [
        name
        for name, value in (
            ("teacher_logits", teacher_logits),
            ("teacher_hidden", teacher_hidden),
            ("teacher_topk", teacher_topk),
        )
        if value is not None
    ]
    if len(given) > 1:
        raise ValueError(f"give one teacher signal, got {' and '.join(given)}")
    if teacher_weight is not None and teacher_hidden is None:
        raise ValueError("teacher_weight (the teacher's head) needs teacher_hidden, the teacher's final hidden states")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive number of tokens, got {chunk_size}")

    sources: list[_LogitsSource | _HeadSource] = []
    for i, logits in enumerate(_as_list(teacher_logits)):
        flat = logits.reshape(-1, logits.shape[-1])
        check_vocab(
            vocab, flat.shape[-1], which="the teacher" if teacher_logits is logits else f"teacher {i} of the ensemble"
        )
        if flat.shape[0] != n_tokens:
            raise ValueError(f"teacher {i} logits have {flat.shape[0]} positions but the student has {n_tokens}")
        sources.append(_LogitsSource(flat))
    hiddens, heads = _as_list(teacher_hidden), _as_list(teacher_weight)
    if hiddens:
        if len(heads) != len(hiddens):
            raise ValueError(
                f"got {len(hiddens)} teacher hidden-state tensors but {len(heads)} teacher head weights; "
                "give one head per teacher"
            )
        if teacher_bias is None:
            biases: list[Tensor | None] = [None] * len(hiddens)
        elif isinstance(teacher_bias, Tensor):
            biases = [teacher_bias]
        else:
            biases = list(teacher_bias)
        for i, (h, w, b) in enumerate(zip(hiddens, heads, biases, strict=True)):
            check_vocab(vocab, w.shape[0], which="the teacher" if len(hiddens) == 1 else f"teacher {i} of the ensemble")
            flat = h.reshape(-1, h.shape[-1])
            if flat.shape[0] != n_tokens:
                raise ValueError(
                    f"teacher {i} hidden states have {flat.shape[0]} positions but the student has {n_tokens}"
                )
            if w.shape[1] != flat.shape[1]:
                raise ValueError(
                    f"teacher {i} head weight is {tuple(w.shape)} but its hidden states have width {flat.shape[1]}"
                )
            sources.append(_HeadSource(flat, w, b))
    topk = None
    if teacher_topk is not None:
        topk = teacher_topk.flatten()
        if topk.token_ids.shape[0] != n_tokens:
            raise ValueError(
                f"the top-k teacher has {topk.token_ids.shape[0]} positions but the student has {n_tokens}"
            )
        if topk.k > vocab:
            raise ValueError(f"the top-k teacher lists k={topk.k} tokens but the student vocabulary has {vocab}")
    has_teacher = bool(sources) or topk is not None
    check_mix(has_teacher, labels, alpha, divergence, temperature)
    if divergence == "logit_mse" and (topk is not None or len(sources) > 1):
        raise ValueError("logit_mse compares raw logits, so it needs one dense teacher, not a top-k or ensemble one")
    weights = normalized_weights(teacher_weights, len(sources)) if sources else []

    valid = valid_token_mask(n_tokens, mask=mask, labels=labels, ignore_index=ignore_index, device=device)
    n_valid = int(valid.sum())
    rows = None if n_valid == n_tokens else valid.nonzero().squeeze(-1)
    flat_labels = labels.reshape(-1).to(device=device, dtype=torch.long) if labels is not None else None
    if not has_teacher:
        scale_kd, scale_ce = 0.0, 1.0
    else:
        scale_kd = alpha * temperature**2 if kd_scale is None else kd_scale
        scale_ce = 0.0 if flat_labels is None or kd_scale is not None else 1.0 - alpha
    return _Plan(
        labels=flat_labels,
        rows=rows,
        n_valid=n_valid,
        sources=sources,
        source_weights=weights,
        topk=topk,
        divergence=divergence,
        temperature=temperature,
        beta=beta,
        skew_alpha=skew_alpha,
        kd_scale=scale_kd,
        ce_scale=scale_ce,
        chunk_size=chunk_size,
        compute_agreement=compute_agreement,
    )


def chunked_distill_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    student_bias: Tensor | None = None,
    *,
    labels: Tensor | None = None,
    mask: Tensor | None = None,
    teacher_logits: Tensor | Sequence[Tensor] | None = None,
    teacher_hidden: Tensor | Sequence[Tensor] | None = None,
    teacher_weight: Tensor | Sequence[Tensor] | None = None,
    teacher_bias: Tensor | Sequence[Tensor | None] | None = None,
    teacher_topk: TopKTeacher | None = None,
    teacher_weights: Sequence[float] | None = None,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    alpha: float = 0.5,
    beta: float = 0.5,
    skew_alpha: float = 0.1,
    ignore_index: int = -100,
    chunk_size: int = 1024,
    compute_agreement: bool = False,
    _kd_scale: float | None = None,
) -> DistillLossParts:
    """The Hinton soft/hard mix of :func:`~mydistill.losses.divergences.distill_loss`, fused and chunked.

    ``loss = alpha * T² * D_T + (1 - alpha) * CE`` with the student's logits ``hidden @ weight.T + bias``
    computed ``chunk_size`` valid tokens at a time; without a teacher, ``loss = CE``.

    Args:
        student_hidden: ``(N, H)`` (or ``(..., H)``) final hidden states; position i predicts ``labels[i]``.
        student_weight: ``(V, H)`` output projection (lm head); ``student_bias``: ``(V,)`` or None.
        labels: ``(N,)`` hard targets, ``ignore_index`` marks tokens to skip everywhere.
        mask: ``(N,)`` optional extra validity mask.
        teacher_logits: ``(N, V)``, or a list of them for an ensemble.
        teacher_hidden, teacher_weight, teacher_bias: the teacher's ``(N, H_t)`` final hidden states
            and ``(V, H_t)`` head (lists for an ensemble); its logits are then computed per chunk too.
        teacher_topk: a sparse :class:`TopKTeacher` with ``(N, k)`` ids/log-probs.
        teacher_weights: ensemble weights, one per teacher (normalised).
        divergence, temperature, alpha, beta, skew_alpha: as in ``distill_loss``.
        chunk_size: valid tokens per chunk; work memory is 3-6 buffers of chunk_size x V x 4 bytes.
        compute_agreement: also count student/teacher top-1 agreement (two argmax passes per chunk).

    The teacher is a constant: no gradient flows to its logits, hidden states or head.
    """
    hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
    if student_weight.dim() != 2 or student_weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"student_weight must be (V, H) with H = {hidden.shape[1]}, got {tuple(student_weight.shape)}")
    plan = _build_plan(
        hidden.shape[0],
        student_weight.shape[0],
        hidden.device,
        labels=labels,
        mask=mask,
        teacher_logits=teacher_logits,
        teacher_hidden=teacher_hidden,
        teacher_weight=teacher_weight,
        teacher_bias=teacher_bias,
        teacher_topk=teacher_topk,
        teacher_weights=teacher_weights,
        divergence=divergence,
        temperature=temperature,
        alpha=alpha,
        beta=beta,
        skew_alpha=skew_alpha,
        ignore_index=ignore_index,
        chunk_size=chunk_size,
        compute_agreement=compute_agreement,
        kd_scale=_kd_scale,
    )
    differentiable = [t for t in (hidden, student_weight, student_bias) if t is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in differentiable):
        loss, stats = FusedLinearDistillFunction.apply(hidden, student_weight, student_bias, plan)
    else:
        result = _run_chunks(hidden, student_weight, student_bias, plan, (False, False, False))
        loss, stats = result.loss, result.stats
    n = stats[3].clamp_min(1)
    return DistillLossParts(
        loss=loss,
        kd=stats[0] / n,
        ce=stats[1] / n,
        teacher_agreement=stats[2] / n if compute_agreement and plan.has_teacher else None,
        num_tokens=stats[3].long(),
    )


def chunked_divergence(
    name: str,
    student_hidden: Tensor,
    student_weight: Tensor,
    student_bias: Tensor | None = None,
    *,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    labels: Tensor | None = None,
    ignore_index: int = -100,
    chunk_size: int = 1024,
    teacher_logits: Tensor | Sequence[Tensor] | None = None,
    teacher_hidden: Tensor | Sequence[Tensor] | None = None,
    teacher_weight: Tensor | Sequence[Tensor] | None = None,
    teacher_bias: Tensor | Sequence[Tensor | None] | None = None,
    teacher_topk: TopKTeacher | None = None,
    teacher_weights: Sequence[float] | None = None,
    beta: float = 0.5,
    alpha: float = 0.1,
) -> Tensor:
    """``DIVERGENCES[name]`` (mean over valid tokens, no T²) from hidden states, chunked and fused.

    ``alpha`` is the skew divergences' α here, as in :func:`~mydistill.losses.divergences.skew_kl`.
    """
    parts = chunked_distill_loss(
        student_hidden,
        student_weight,
        student_bias,
        labels=labels,
        mask=mask,
        teacher_logits=teacher_logits,
        teacher_hidden=teacher_hidden,
        teacher_weight=teacher_weight,
        teacher_bias=teacher_bias,
        teacher_topk=teacher_topk,
        teacher_weights=teacher_weights,
        divergence=name,
        temperature=temperature,
        alpha=1.0,
        beta=beta,
        skew_alpha=alpha,
        ignore_index=ignore_index,
        chunk_size=chunk_size,
        _kd_scale=1.0,
    )
    return parts.loss


def chunked_cross_entropy(
    student_hidden: Tensor,
    student_weight: Tensor,
    labels: Tensor,
    student_bias: Tensor | None = None,
    *,
    mask: Tensor | None = None,
    ignore_index: int = -100,
    chunk_size: int = 1024,
) -> Tensor:
    """Hard-label cross-entropy from hidden states without materialising ``(N, V)`` logits."""
    return chunked_distill_loss(
        student_hidden,
        student_weight,
        student_bias,
        labels=labels,
        mask=mask,
        ignore_index=ignore_index,
        chunk_size=chunk_size,
    ).loss
