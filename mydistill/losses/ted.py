"""TED stage 1: train the teacher filters on the task with the teacher frozen.

TED (Liang et al., "Less is More: Task-aware Layer-wise Distillation for Language Model
Compression", ICML 2023, arXiv 2210.01351) learns in two stages. Stage 1 puts a filter on each
distilled teacher layer and a task head on each filter, and trains filters and heads on the task
loss while the teacher stays frozen, so that a filtered layer keeps what the task needs. Stage 2
freezes the teacher filters and trains the student (and its own filters) to match them; that is
:class:`~mydistill.losses.hidden.HiddenStateDistiller` with ``projection="ted"``.

Our adaptation to causal-LM distillation: the task is next-token prediction on the response tokens,
and the per-layer task head is the teacher's own frozen output path behind a learned linear map
back to its width. For the pair whose teacher layer is ``l``::

    logits_l = lm_head(final_norm(g_l(f_l(h_l))))      f_l: H_t -> filter_size (the teacher filter)
                                                        g_l: filter_size -> H_t (stage 1 only)
    L_1 = mean over pairs of CE(logits_l, next token), over response tokens

Only ``f_l`` and ``g_l`` get gradients; ``g_l`` is discarded afterwards and ``f_l`` is frozen.
``g_l`` starts as ``f_l``'s transpose, so with orthogonal filters at least as wide as the
teacher the round trip starts as the identity and stage 1 starts from the teacher reading its
own layer ``l`` (the "logit lens"); narrower filters start from a projection.

Memory: logits are computed only for the response rows, ``chunk_size`` rows at a time, and each
chunk's logits are recomputed in the backward pass instead of kept (activation checkpointing),
so the extra memory is one ``(chunk_size, V)`` fp32 block plus its gradient, whatever the batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mydistill.losses.hidden import HiddenStateDistiller


@dataclass
class TeacherFilterFit:
    """What stage 1 did: the filters' task cross-entropy (mean over pairs) at each step."""

    history: list[float] = field(default_factory=list)

    @property
    def ce_start(self) -> float:
        """Cross-entropy on the first batch, before any update."""
        return self.history[0]

    @property
    def ce_end(self) -> float:
        """Cross-entropy on the last batch (before its update)."""
        return self.history[-1]


def _head_ce_sum(
    filtered: Tensor, targets: Tensor, back_map: nn.Module, final_norm: nn.Module, head_weight: Tensor,
    head_bias: Tensor | None,
) -> Tensor:
    hidden = final_norm(back_map(filtered))
    logits = F.linear(hidden.to(head_weight.dtype), head_weight, head_bias).float()
    return F.cross_entropy(logits, targets, reduction="sum")


def filter_task_loss(
    hidden: Tensor,
    labels: Tensor,
    teacher_filter: nn.Module,
    back_map: nn.Module,
    final_norm: nn.Module,
    head_weight: Tensor,
    head_bias: Tensor | None = None,
    *,
    ignore_index: int = -100,
    chunk_size: int = 1024,
) -> tuple[Tensor, Tensor]:
    """Next-token cross-entropy of the teacher's head read through one filter and its map back.

    Args:
        hidden: ``(N, H_t)`` one teacher layer's states; position i predicts ``labels[i]`` (already shifted).
        labels: ``(N,)`` target ids; ``ignore_index`` marks rows that count for nothing (prompt, padding).
        teacher_filter: ``f_l`` (H_t -> filter_size); back_map: ``g_l`` (filter_size -> H_t).
        final_norm: the teacher's frozen final norm; head_weight ``(V, H_t)`` / head_bias ``(V,)`` its head.
        chunk_size: rows projected to the vocabulary at a time (each chunk recomputed in backward).

    Returns:
        ``(ce_sum, num_valid)``: the summed cross-entropy over valid rows (fp32) and their count;
        divide, guarding zero, for the mean.
    """
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1)
    valid = flat_labels != ignore_index
    # only the response rows ever reach the head: the (N, V) logits of a whole batch never exist
    rows, targets = flat_hidden[valid], flat_labels[valid]
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    filtered = teacher_filter(rows.to(teacher_filter.weight.dtype))
    for start in range(0, rows.shape[0], chunk_size):
        args = (filtered[start : start + chunk_size], targets[start : start + chunk_size], back_map, final_norm,
                head_weight, head_bias)
        if torch.is_grad_enabled() and filtered.requires_grad:
            total = total + checkpoint(_head_ce_sum, *args, use_reentrant=False)
        else:
            total = total + _head_ce_sum(*args)
    return total, valid.sum()


def final_norm_of(teacher: Any) -> nn.Module:
    """The teacher's final norm (applied before its head): ``model.norm`` (Llama, Qwen, Mistral, ...)."""
    body = teacher.model
    for name in ("norm", "final_layernorm", "ln_f"):
        norm = getattr(body, name, None)
        if isinstance(norm, nn.Module):
            return norm
    raise ValueError(
        f"cannot find the final norm of the teacher ({type(teacher).__name__}): TED stage 1 looks for "
        "teacher.model.norm, .final_layernorm or .ln_f"
    )


def _back_maps(distiller: HiddenStateDistiller) -> nn.ModuleList:
    maps = nn.ModuleList()
    for filt in distiller.teacher_filters:
        back = nn.Linear(filt.out_features, filt.in_features, device=filt.weight.device, dtype=filt.weight.dtype)
        with torch.no_grad():
            back.weight.copy_(filt.weight.T)
            back.bias.zero_()
        maps.append(back)
    return maps


def _unsharded_final_norm(teacher: Any) -> nn.Module:
    final_norm = final_norm_of(teacher)
    if any(hasattr(p, "ds_id") for p in final_norm.parameters()):
        raise ValueError(
            "TED stage 1 needs the whole teacher on each process, but this one is partitioned by ZeRO-3 "
            "(distill.teacher_sharding: zero3); train the filters with an unsharded teacher and load them with "
            "HiddenStateDistiller.load_teacher_filters"
        )
    return final_norm


def _take(batches: Iterable[dict[str, Tensor]], steps: int) -> Iterator[dict[str, Tensor]]:
    batch_iter = iter(batches)
    for step in range(steps):
        try:
            yield next(batch_iter)
        except StopIteration:
            raise ValueError(f"fit_teacher_filters got {step} batches for {steps} steps") from None


def fit_teacher_filters(
    distiller: HiddenStateDistiller,
    teacher: Any,
    batches: Iterable[dict[str, Tensor]],
    *,
    steps: int,
    lr: float = 1e-3,
    ignore_index: int = -100,
    chunk_size: int = 1024,
) -> TeacherFilterFit:
    """TED stage 1: train ``distiller``'s teacher filters on next-token CE, the teacher frozen.

    Args:
        distiller: a :class:`HiddenStateDistiller` with ``projection="ted"``; its teacher filters are
            trained in place and end frozen (``requires_grad=False``).
        teacher: the frozen causal LM (Hugging Face layout: ``.model(...)`` returning
            ``hidden_states``, ``.model.norm``, ``.lm_head``); it is only read.
        batches: at least ``steps`` batches of ``input_ids``, ``attention_mask`` and ``labels``
            ``(B, T)`` as :func:`mydistill.tokenization.collate` makes them (labels not yet shifted;
            ``ignore_index`` on prompt and padding).
        steps: optimizer steps (AdamW, constant ``lr``, no weight decay).
        chunk_size: response rows projected to the vocabulary at a time.

    Under several processes (an initialised process group) every rank should pass the same
    batches; the trained filters are then broadcast from rank 0 so that all ranks hold the same.
    """
    if distiller.projection != "ted" or not len(distiller.teacher_filters):
        raise ValueError(f"fit_teacher_filters needs a distiller with projection='ted', not {distiller.projection!r}")
    if steps <= 0:
        raise ValueError(f"steps must be positive, got {steps}")
    filters = distiller.teacher_filters
    back_maps = _back_maps(distiller)
    final_norm = _unsharded_final_norm(teacher)
    head = teacher.lm_head
    head_weight = head.weight.detach()
    head_bias = head.bias.detach() if getattr(head, "bias", None) is not None else None
    # the norm is called with gradients on (for its input); its own weights must stay out of it
    norm_flags = [(p, p.requires_grad) for p in final_norm.parameters()]
    for p, _ in norm_flags:
        p.requires_grad_(False)
    filters.requires_grad_(True)
    optimizer = torch.optim.AdamW([*filters.parameters(), *back_maps.parameters()], lr=lr, weight_decay=0.0)
    fit = TeacherFilterFit()
    layers = [t for _, t in distiller.pairs]
    try:
        for batch in _take(batches, steps):
            with torch.no_grad():
                out = teacher.model(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True
                )
            labels = batch["labels"][:, 1:]  # position i predicts token i + 1
            total: Tensor | None = None
            for filt, back, layer in zip(filters, back_maps, layers, strict=True):
                ce_sum, count = filter_task_loss(
                    out.hidden_states[layer][:, :-1], labels, filt, back, final_norm, head_weight, head_bias,
                    ignore_index=ignore_index, chunk_size=chunk_size,
                )
                term = ce_sum / count.clamp_min(1)
                total = term if total is None else total + term
            assert total is not None
            loss = total / len(layers)
            del out  # every layer's states: free them before the backward pass
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            fit.history.append(loss.item())
    finally:
        filters.requires_grad_(False)
        for p, flag in norm_flags:
            p.requires_grad_(flag)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for p in filters.parameters():
            dist.broadcast(p.data, src=0)
    return fit


__all__ = ["TeacherFilterFit", "filter_task_loss", "final_norm_of", "fit_teacher_filters"]
