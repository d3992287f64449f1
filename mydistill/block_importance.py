"""Which teacher blocks a cut student keeps, chosen by measurement (``student.init.layers: auto``).

Each block's importance is its *Block Influence* (ShortGPT: Men et al. 2024, "ShortGPT: Layers in
Large Language Models are More Redundant Than You Expect", arXiv:2403.03853, eq. 1):

    BI_i = 1 − E_{x,t} [ cos(h_in_{i,t}, h_out_{i,t}) ]

the expected cosine distance between the hidden state a block receives and the one it passes on,
over the tokens of some prompts. A block that barely turns the residual stream (BI near 0) can be
removed with little loss; ShortGPT removes the blocks with the lowest BI, and so does
:func:`choose_layers`. The prompts are the run's own (the teacher's prompt pool), so the measure is
of the blocks that matter for this task.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch


@torch.no_grad()
def block_influence(
    model: Any, tokenizer: Any, texts: Sequence[str], *, batch_size: int = 8, max_length: int = 128,
) -> list[float]:
    """BI of every block of a Llama/Qwen/Mistral-style decoder (``model.model.layers``), averaged
    over the non-padding tokens of ``texts``. Returns one float per block, in block order.

    Hidden states are taken by forward hooks at each block's own input and output, not from
    ``output_hidden_states`` (whose last entry has the final norm applied, which would charge the
    norm to the last block).
    """
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ValueError(f"cannot measure blocks of a {type(model).__name__}: expected a decoder with model.layers")
    if not texts:
        raise ValueError("block influence needs at least one prompt to measure on")
    sums = torch.zeros(len(layers), dtype=torch.float64)
    captured: dict[int, torch.Tensor] = {}  # block -> (B, T) cosine similarity of the current batch

    def hook(index: int):
        def record(module: Any, args: tuple, kwargs: dict, output: Any) -> None:
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = output[0] if isinstance(output, (tuple, list)) else output
            # fp32: bf16 cosines of near-identical vectors round to 1 and every BI to 0
            captured[index] = torch.nn.functional.cosine_similarity(h_in.float(), h_out.float(), dim=-1)
        return record

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    model_was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    tokens = 0
    try:
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(list(texts[start : start + batch_size]), return_tensors="pt", padding=True,
                              truncation=True, max_length=max_length)
            mask = batch["attention_mask"].to(device)
            model(input_ids=batch["input_ids"].to(device), attention_mask=mask)
            valid = mask.bool()
            tokens += int(valid.sum())
            for i in range(len(layers)):
                sums[i] += (1 - captured[i][valid]).double().sum().cpu()
    finally:
        for handle in handles:
            handle.remove()
        model.train(model_was_training)
    return (sums / max(tokens, 1)).tolist()


def choose_layers(scores: Sequence[float], keep: int) -> list[int]:
    """The ``keep`` blocks with the highest influence, in block order (ShortGPT drops the lowest;
    ties go to the earlier block)."""
    if not 0 < keep <= len(scores):
        raise ValueError(f"keep must be between 1 and the {len(scores)} blocks measured (got {keep})")
    ranked = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return sorted(ranked[:keep])


def blocks_for_budget(model: Any, parameter_fraction: float) -> int:
    """How many blocks fit in ``parameter_fraction`` of ``model``'s parameters, the embeddings, final
    norm and head being kept whole (blocks of a decoder all have the same size). At least one."""
    layers = model.model.layers
    total = sum(p.numel() for p in model.parameters())
    per_block = sum(p.numel() for p in layers[0].parameters())
    outside = total - per_block * len(layers)
    fits = math.floor((parameter_fraction * total - outside) / per_block + 1e-9)  # a budget of exactly k blocks fits k
    if fits < 1:
        raise ValueError(
            f"student.init.parameter_fraction {parameter_fraction} leaves no room for a block: the embeddings and head "
            f"alone are {outside / total:.0%} of the teacher's parameters"
        )
    return min(fits, len(layers))


def influence_figure(scores: Sequence[float], kept: Sequence[int]) -> Any:
    """Bars of each teacher block's influence, the kept ones coloured."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(5, 0.25 * len(scores) + 1), 3), dpi=100)
    ax = fig.subplots()
    keep = set(kept)
    ax.bar(range(len(scores)), scores, color=["#55a868" if i in keep else "#c44e52" for i in range(len(scores))])
    ax.set_xlabel("teacher block")
    ax.set_ylabel("block influence (1 − cos)")
    ax.set_title(f"ShortGPT block influence: {len(keep)} of {len(scores)} kept (green)")
    fig.tight_layout()
    return fig
