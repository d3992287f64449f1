"""Which teacher blocks a cut student keeps, chosen by measurement (``student.init.layers: auto``).

Each block's importance is its *Block Influence* (ShortGPT: Men et al. 2024, "ShortGPT: Layers in
Large Language Models are More Redundant Than You Expect", arXiv:2403.03853, eq. 1):

    BI_i = 1 − E_{x,t} [ cos(h_in_{i,t}, h_out_{i,t}) ]

the expected cosine distance between the hidden state a block receives and the one it passes on,
over the tokens of some prompts. A block that barely turns the residual stream (BI near 0) can be
removed with little loss; ShortGPT removes the blocks with the lowest BI, and so does
:func:`choose_layers`. The prompts are the run's own (the teacher's prompt pool), so the measure is
of the blocks that matter for this task.

The second criterion, :func:`skip_kl_greedy` (``student.init.importance: skip_kl``), asks what
the cut costs the teacher's output rather than how much a block turns its input: a block's score
is the KL divergence from the whole teacher's next-token distribution to that of the teacher with
the block skipped (its input passed on unchanged), over the same prompts. It is Shortened LLaMA's
one-shot criterion (Kim et al. 2024, "Shortened LLaMA: Depth Pruning for Large Language Models",
arXiv:2402.02834, which scores each skipped block by the perplexity it costs), measured against the
teacher as distillation does, and applied greedily: the block whose skipping costs least is dropped,
then every remaining block is scored again with it gone, until the student's depth is reached. Blocks
that are each cheap to drop alone may not be cheap together; the greedy rounds see that.

Either criterion can be measured on the prompts alone (``student.init.importance_on: prompts``) or on
the teacher's responses to them (``responses``): each prompt and the teacher's answer through the chat
template, measured only at the positions that predict an answer token. The prompts say what the task
asks; the responses say what answering it needs (a late block may barely change the prompt's
next-token distribution and still write the capital of Ghana).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from typing import Any

import torch


def _batches(
    tokenizer: Any, texts: Sequence[str] | None, exchanges: Sequence[tuple[str, str]] | None, batch_size: int,
    max_length: int, device: Any,
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """``(input_ids, attention_mask, answer_positions)`` per batch: of ``texts`` (the prompts as the
    teacher sees them, cut at ``max_length`` tokens; ``answer_positions`` None) or of ``exchanges``
    ((prompt, response) pairs, tokenized as training tokenizes them and kept whole, since the answer at
    their end is what is measured; ``answer_positions`` marks the positions whose next token is a
    response token)."""
    if (texts is None) == (exchanges is None):
        raise ValueError("measure blocks on prompts (texts) or on prompt-response pairs (exchanges), one of the two")
    out: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
    if texts is not None:
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(list(texts[start : start + batch_size]), return_tensors="pt", padding=True,
                              truncation=True, max_length=max_length)
            out.append((batch["input_ids"].to(device), batch["attention_mask"].to(device), None))
        return out
    from mydistill.tokenization import (
        IGNORE_INDEX,
        collate,
        shift_labels,
        tokenize_example,
    )

    assert exchanges is not None
    examples = [tokenize_example(tokenizer, prompt, response, sys.maxsize) for prompt, response in exchanges]
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size], tokenizer.pad_token_id)
        answers = (shift_labels(batch["labels"]) != IGNORE_INDEX).to(device)
        out.append((batch["input_ids"].to(device), batch["attention_mask"].to(device), answers))
    return out


@torch.no_grad()
def block_influence(
    model: Any, tokenizer: Any, texts: Sequence[str] | None = None, *, exchanges: Sequence[tuple[str, str]] | None = None,
    batch_size: int = 8, max_length: int = 128,
) -> list[float]:
    """BI of every block of a Llama/Qwen/Mistral-style decoder (``model.model.layers``), averaged
    over the non-padding tokens of ``texts``, or over the positions of ``exchanges`` ((prompt,
    response) pairs) that predict a response token. Returns one float per block, in block order.

    Hidden states are taken by forward hooks at each block's own input and output, not from
    ``output_hidden_states`` (whose last entry has the final norm applied, which would charge the
    norm to the last block).
    """
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ValueError(f"cannot measure blocks of a {type(model).__name__}: expected a decoder with model.layers")
    if not (texts or exchanges):
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
        for ids, mask, answers in _batches(tokenizer, texts, exchanges, batch_size, max_length, device):
            model(input_ids=ids, attention_mask=mask)
            valid = mask.bool() if answers is None else answers
            tokens += int(valid.sum())
            for i in range(len(layers)):
                sums[i] += (1 - captured[i][valid]).double().sum().cpu()
    finally:
        for handle in handles:
            handle.remove()
        model.train(model_was_training)
    return (sums / max(tokens, 1)).tolist()


class _Skipped(torch.nn.Module):
    """A block taken out of the forward pass: its input goes on as its output."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


@torch.no_grad()
def skip_kl_greedy(
    model: Any, tokenizer: Any, texts: Sequence[str] | None, keep: int, *, exchanges: Sequence[tuple[str, str]] | None = None,
    batch_size: int = 8, max_length: int = 128, on_round: Any = None,
) -> tuple[list[float], list[int]]:
    """Choose ``keep`` blocks of a Llama/Qwen/Mistral-style decoder by the KL they cost when skipped
    (see the module's docstring). Returns each block's score (the mean per-token KL(teacher ‖ teacher
    with the blocks dropped so far and this one skipped), in nats, from the last round that measured
    it) and the kept blocks in order. ``on_round(dropped_block, kl)`` is called after each round.

    Costs about (n − keep) · (n + keep) / 4 forward passes over ``texts`` for n blocks (each candidate
    runs only the blocks after it). On ``texts``, positions are
    measured from the end of the tokens that every text begins with (a chat template's system
    prompt), where the prompts differ; on ``exchanges`` ((prompt, response) pairs), at the positions
    that predict a response token. The whole teacher's log-probabilities are kept (float16) for the
    measured positions only.
    """
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ValueError(f"cannot measure blocks of a {type(model).__name__}: expected a decoder with model.layers")
    if not (texts or exchanges):
        raise ValueError("skip-KL needs at least one prompt to measure on")
    if not 0 < keep <= len(layers):
        raise ValueError(f"keep must be between 1 and the {len(layers)} blocks measured (got {keep})")
    model_was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    # the tokens every prompt begins with (a chat template's system prompt) predict the same next token
    # with the same context in every prompt: measured once, they would outweigh the prompts themselves
    shared = 0
    if texts is not None and len(texts) > 1:
        encoded = [tokenizer(text, truncation=True, max_length=max_length)["input_ids"] for text in texts]
        while all(len(ids) > shared + 1 for ids in encoded) and len({ids[shared] for ids in encoded}) == 1:
            shared += 1
    body, norm, head = model.model, getattr(model.model, "norm", None), getattr(model, "lm_head", None)
    if norm is None or head is None:
        raise ValueError(f"cannot measure blocks of a {type(model).__name__}: expected model.norm and lm_head")
    batches = []
    for ids, mask, answers in _batches(tokenizer, texts, exchanges, batch_size, max_length, device):
        # position t predicts token t + 1
        measured = answers if answers is not None else mask.bool() & (mask.cumsum(dim=1) > max(shared - 1, 0))
        hidden = body(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state  # final norm applied
        batches.append((ids, mask, measured, torch.log_softmax(head(hidden[measured]).float(), dim=-1).half()))
    tokens = sum(int(m.sum()) for _, _, m, _ in batches)

    def one_round(dropped: set[int]) -> dict[int, float]:
        """The KL with each remaining block skipped besides ``dropped``. One pass of the current cut
        records every block's input; a block's candidate pass starts there and runs only the blocks
        after it (the ones before see the same input either way)."""
        kept = [i for i in range(len(layers)) if i not in dropped]
        totals = dict.fromkeys(kept, 0.0)
        originals = {i: layers[i] for i in dropped}
        inputs: dict[int, tuple[torch.Tensor, tuple, dict]] = {}  # block -> its input, other args, keywords

        def capture(index: int):
            def record(module: Any, args: tuple, kwargs: dict) -> None:
                h = args[0] if args else kwargs["hidden_states"]
                inputs[index] = (h, args[1:], {k: v for k, v in kwargs.items() if k != "hidden_states"})
            return record

        for ids, mask, measured, reference in batches:
            handles = [layers[i].register_forward_pre_hook(capture(i), with_kwargs=True) for i in kept]
            for i in dropped:
                layers[i] = _Skipped()
            try:
                body(input_ids=ids, attention_mask=mask, use_cache=False)
            finally:
                for handle in handles:
                    handle.remove()
                for i, layer in originals.items():
                    layers[i] = layer
            p_log = reference.float()
            p = p_log.exp()
            for i in kept:
                h, positional, keywords = inputs[i]
                for j in kept:
                    if j > i:
                        out = layers[j](h, *positional, **keywords)
                        h = out[0] if isinstance(out, (tuple, list)) else out
                q_log = torch.log_softmax(head(norm(h[measured])).float(), dim=-1)  # the norm is per token
                totals[i] += float((p * (p_log - q_log)).sum())
        return {i: total / max(tokens, 1) for i, total in totals.items()}

    scores = [0.0] * len(layers)
    dropped: set[int] = set()
    try:
        while len(layers) - len(dropped) > keep:
            round_scores = one_round(dropped)
            for i, kl in round_scores.items():
                scores[i] = kl
            cheapest = min(round_scores, key=lambda i: (round_scores[i], i))
            dropped.add(cheapest)
            if on_round is not None:
                on_round(cheapest, round_scores[cheapest])
    finally:
        model.train(model_was_training)
    return scores, [i for i in range(len(layers)) if i not in dropped]


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


def influence_figure(scores: Sequence[float], kept: Sequence[int], criterion: str = "block_influence") -> Any:
    """Bars of each teacher block's score, the kept ones coloured."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(5, 0.25 * len(scores) + 1), 3), dpi=100)
    ax = fig.subplots()
    keep = set(kept)
    ax.bar(range(len(scores)), scores, color=["#55a868" if i in keep else "#c44e52" for i in range(len(scores))])
    ax.set_xlabel("teacher block")
    if criterion == "skip_kl":
        ax.set_ylabel("KL to the teacher, block skipped")
        ax.set_title(f"skip-KL (greedy): {len(keep)} of {len(scores)} kept (green)")
    else:
        ax.set_ylabel("block influence (1 − cos)")
        ax.set_title(f"ShortGPT block influence: {len(keep)} of {len(scores)} kept (green)")
    fig.tight_layout()
    return fig
