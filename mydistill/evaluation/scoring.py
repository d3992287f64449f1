"""How one model is scored on the evaluation set: its greedy answers, and the teacher-forced metrics on
the reference responses (perplexity, first-token calibration, KL / top-1 agreement with the teacher).

The evaluate stage (:mod:`mydistill.evaluation.evaluate`) runs these for every model and builds the report.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F

from mydistill.evaluation.metrics import expected_calibration_error, mean
from mydistill.models import response_logits, response_logits_and_starts  # noqa: F401 (imported from here too)
from mydistill.tokenization import IGNORE_INDEX, TokenizedExample, collate, tokenize_example, with_prefix

# the teacher-forced batch: logits are (B, T, V) floats per model, and V is ~50k-150k for real models
FORCED_BATCH = 16


def normalise_answer(text: str) -> str:
    return " ".join(text.strip().split())


def generate_answers(
    model: Any, tokenizer: Any, prompts: list[str], *, max_new_tokens: int, batch_size: int, label: str = "answers",
    part: tuple[int, int] | None = None,
) -> list[str]:
    """Greedy answers through the batched Hugging Face generation backend (progress reported as it goes;
    ``part``: (index, count) when these answers are one part of a stage, e.g. one of the models evaluated)."""
    from mydistill.generation.base import GenerationRequest, Sampling
    from mydistill.generation.hf import HFBackend
    from mydistill.progress import ProgressLog

    backend = HFBackend(model=model, tokenizer=tokenizer, batch_size=batch_size, device=str(model.device))
    requests = [GenerationRequest(prompt=backend.prepare(str(i), p)) for i, p in enumerate(prompts)]
    progress = ProgressLog(f"evaluate: {label}", len(requests), logging.getLogger("mydistill.evaluation.evaluate"), unit="answers", part=part)
    completions = backend.generate(requests, Sampling(max_new_tokens=max_new_tokens), progress)
    return [c[0].text for c in completions]


def _same_responses(examples: dict[str, list[TokenizedExample]]) -> None:
    """Cut each example's response to the shortest among the prompt variants (a longer prompt may
    leave less room under ``max_length``), so that every model is scored on the same tokens."""
    variants = list(examples.values())
    for i in range(len(variants[0])):
        keep = min(sum(label != IGNORE_INDEX for label in v[i].labels) for v in variants)
        for v in variants:
            prompt_len = len(v[i].labels) - sum(label != IGNORE_INDEX for label in v[i].labels)
            v[i] = TokenizedExample(v[i].input_ids[: prompt_len + keep], v[i].labels[: prompt_len + keep])


@torch.no_grad()
def teacher_forced_metrics(
    models: dict[str, Any], teacher_name: str | None, tokenizer: Any, records: list[dict[str, Any]], max_length: int = 512,
    prompt_prefixes: dict[str, str] | None = None,
) -> dict[str, dict[str, float]]:
    """Perplexity and first-token calibration for ``models`` (which share ``tokenizer``), and KL /
    top-1 agreement with ``teacher_name`` when it is among them."""
    prefixes = {name: (prompt_prefixes or {}).get(name, "") for name in models}
    examples = {
        prefix: [tokenize_example(tokenizer, with_prefix(prefix, r["prompt"]), r["response"], max_length) for r in records]
        for prefix in sorted(set(prefixes.values()))
    }
    if len(examples) > 1:
        _same_responses(examples)
    sums: dict[str, dict[str, float]] = {name: {"nll": 0.0, "kl": 0.0, "agree": 0.0} for name in models}
    first: dict[str, tuple[list[float], list[bool]]] = {name: ([], []) for name in models}
    count = 0
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in range(0, len(records), FORCED_BATCH):
        batches = {prefix: collate(rows[start : start + FORCED_BATCH], pad) for prefix, rows in examples.items()}
        outputs = {}
        for name, model in models.items():
            batch = batches[prefixes[name]]
            outputs[name] = response_logits_and_starts(model, {k: v.to(model.device) for k, v in batch.items()})
        targets = next(iter(outputs.values()))[1].cpu()
        count += targets.numel()
        teacher_logp = F.log_softmax(outputs[teacher_name][0].cpu(), -1) if teacher_name else None
        for name, (logits, labels, starts) in outputs.items():
            logp = F.log_softmax(logits.cpu(), -1)
            labels = labels.cpu()
            sums[name]["nll"] += F.nll_loss(logp, labels, reduction="sum").item()
            rows = starts[starts >= 0].cpu()
            top_p, top_id = logp[rows].exp().max(-1)
            first[name][0].extend(top_p.tolist())
            first[name][1].extend((top_id == labels[rows]).tolist())
            if teacher_logp is not None:
                sums[name]["kl"] += (teacher_logp.exp() * (teacher_logp - logp)).sum().item()
                sums[name]["agree"] += (teacher_logp.argmax(-1) == logp.argmax(-1)).sum().item()
            del logp  # (M, V) fp32 per model: free before the next one
    out = {}
    for name, s in sums.items():
        confidences, correct = first[name]
        metrics = {
            "perplexity": float(torch.exp(torch.tensor(s["nll"] / max(count, 1)))),
            "calibration_ece": expected_calibration_error(confidences, correct),
            "first_token_accuracy": mean([float(c) for c in correct]),
        }
        if teacher_name and name != teacher_name:
            metrics["kl_to_teacher"] = s["kl"] / max(count, 1)
            metrics["top1_agreement"] = s["agree"] / max(count, 1)
        out[name] = metrics
    return out
