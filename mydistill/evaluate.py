"""The evaluate stage: task metric, perplexity, agreement with the teacher, sizes.

Every model is scored on the same held-out labelled data:

- ``exact_match``: greedy answer (whitespace-stripped) equals the reference;
- ``perplexity``: exp of the mean next-token cross-entropy on the reference responses;
- ``kl_to_teacher`` / ``top1_agreement``: mean KL(teacher ‖ model) and the share of response
  positions where both pick the same token, teacher-forced on the references;
- ``parameters``.

``teacher_retained`` is a model's exact match as a fraction of the teacher's.

A student distilled step-by-step answers behind its label prefix (``prompt_prefix`` in its
checkpoint's manifest); each model is prompted with its own prefix ('' for the others), and the
teacher-forced metrics score the same response tokens for every model.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import torch
import torch.nn.functional as F

from mydistill import io
from mydistill.models import count_parameters, load_model, load_tokenizer
from mydistill.tokenization import (
    IGNORE_INDEX, TokenizedExample, collate, prompt_prefix_of, shift_labels, tokenize_example, with_prefix,
)

METRICS_FILE = "metrics.json"
SAMPLES_FILE = "samples.jsonl"
PLOT_FILE = "comparison.png"


def normalise_answer(text: str) -> str:
    return " ".join(text.strip().split())


def generate_answers(model: Any, tokenizer: Any, prompts: list[str], *, max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy answers through the batched Hugging Face generation backend."""
    from mydistill.generation.base import GenerationRequest, Sampling
    from mydistill.generation.hf import HFBackend

    backend = HFBackend(model=model, tokenizer=tokenizer, batch_size=batch_size, device=str(model.device))
    requests = [GenerationRequest(prompt=backend.prepare(str(i), p)) for i, p in enumerate(prompts)]
    completions = backend.generate(requests, Sampling(max_new_tokens=max_new_tokens))
    return [c[0].text for c in completions]


@torch.no_grad()
def response_logits(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at response positions (M, V) and their target tokens (M,)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = shift_labels(batch["labels"])
    mask = labels != IGNORE_INDEX
    return logits[mask].float(), labels[mask]


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
    models: dict[str, Any], teacher_name: str | None, tokenizer: Any, records: list[dict[str, Any]], max_length: int = 128,
    prompt_prefixes: dict[str, str] | None = None,
) -> dict[str, dict[str, float]]:
    prefixes = {name: (prompt_prefixes or {}).get(name, "") for name in models}
    examples = {
        prefix: [tokenize_example(tokenizer, with_prefix(prefix, r["prompt"]), r["response"], max_length) for r in records]
        for prefix in sorted(set(prefixes.values()))
    }
    if len(examples) > 1:
        _same_responses(examples)
    sums: dict[str, dict[str, float]] = {name: {"nll": 0.0, "kl": 0.0, "agree": 0.0} for name in models}
    count = 0
    for start in range(0, len(records), 64):
        batches = {prefix: collate(rows[start : start + 64], tokenizer.pad_token_id) for prefix, rows in examples.items()}
        outputs = {}
        for name, model in models.items():
            batch = batches[prefixes[name]]
            outputs[name] = response_logits(model, {k: v.to(model.device) for k, v in batch.items()})
        targets = next(iter(outputs.values()))[1].cpu()
        count += targets.numel()
        teacher_logp = F.log_softmax(outputs[teacher_name][0].cpu(), -1) if teacher_name else None
        for name, (logits, labels) in outputs.items():
            logp = F.log_softmax(logits.cpu(), -1)
            sums[name]["nll"] += F.nll_loss(logp, labels.cpu(), reduction="sum").item()
            if teacher_logp is not None:
                sums[name]["kl"] += (teacher_logp.exp() * (teacher_logp - logp)).sum().item()
                sums[name]["agree"] += (teacher_logp.argmax(-1) == logp.argmax(-1)).sum().item()
    out = {}
    for name, s in sums.items():
        metrics = {"perplexity": float(torch.exp(torch.tensor(s["nll"] / max(count, 1))))}
        if teacher_name and name != teacher_name:
            metrics["kl_to_teacher"] = s["kl"] / max(count, 1)
            metrics["top1_agreement"] = s["agree"] / max(count, 1)
        out[name] = metrics
    return out


def comparison_figure(report: dict[str, Any]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["models"])
    scores = [report["models"][n]["exact_match"] for n in names]
    fig, ax = plt.subplots(figsize=(5, 3), dpi=100)
    bars = ax.bar(names, scores, color=["#4c72b0", "#55a868", "#c44e52", "#8172b2"][: len(names)])
    ax.bar_label(bars, labels=[f"{s:.1%}" for s in scores])
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("exact match")
    ax.set_title("held-out task accuracy")
    fig.tight_layout()
    return fig


def loss_curves_figure(histories: dict[str, list[dict[str, float]]]) -> Any:
    """Training and validation loss per stage, from checkpoint manifests' ``history`` rows.

    ``histories`` maps a stage (``distill``, ``finetune``, ``baseline``) to its rows
    (``{"step": s, "loss": …, "val_loss": …}``). Stage 2 continues stage 1 on one step axis
    (a dotted line marks the switch); the baseline, trained from scratch on the real data alone,
    is drawn dashed from step 0. Training losses differ in kind (KD + CE in stage 1, CE after),
    so the validation panel (CE on held-out real data, the same for every stage) is the one to
    compare.
    """
    # a Figure outside pyplot: nothing to close, freed with its last reference
    from matplotlib.figure import Figure

    colors = {"distill": "#4c72b0", "finetune": "#55a868", "baseline": "#c44e52"}
    fig = Figure(figsize=(9, 3.2), dpi=100)
    ax_train, ax_val = fig.subplots(1, 2)
    offset = 0
    for stage, rows in histories.items():
        if not rows:
            continue
        chained = stage in ("distill", "finetune")
        start = offset if chained else 0
        style = {"color": colors.get(stage), "linestyle": "-" if chained else "--", "label": stage}
        train = [(start + r["step"], r["loss"]) for r in rows if "loss" in r]
        val = [(start + r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
        if train:  # markers where there are few points, so a short stage still shows
            ax_train.plot(*zip(*train, strict=True), marker="o" if len(train) < 20 else None, markersize=3, **style)
        if val:
            ax_val.plot(*zip(*val, strict=True), marker="o", markersize=3, **style)
        if chained:
            if offset:
                for ax in (ax_train, ax_val):
                    ax.axvline(offset, color="grey", linestyle=":", linewidth=1)
            offset = start + int(rows[-1]["step"])
    for ax, title in ((ax_train, "training loss"), (ax_val, "validation loss (held-out real data)")):
        ax.set_title(title)
        ax.set_xlabel("step")
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def evaluate_models(
    model_uris: dict[str, str],
    eval_uri: str,
    output_uri: str,
    *,
    teacher_name: str | None = "teacher",
    answer_field: str = "answer",
    prompt_field: str = "prompt",
    max_new_tokens: int = 16,
    batch_size: int = 100,
    num_samples: int = 10,
    device: str = "cpu",
) -> dict[str, Any]:
    """Score every model in ``model_uris`` on ``eval_uri``; write metrics, samples and a plot.

    Returns the report (also ``metrics.json`` under ``output_uri``). Skipped when ``output_uri``
    already holds a report for the same models and data.
    """
    records = io.read_records(eval_uri)
    if not records:
        raise io.DataError(f"{eval_uri}: evaluation set is empty")
    for i, r in enumerate(records):
        for name in (prompt_field, answer_field):
            if name not in r:
                raise io.DataError(f"{eval_uri}: record {i + 1} has no {name!r} field")
    prefixes = {name: prompt_prefix_of(uri) for name, uri in model_uris.items()}
    inputs = {
        "models": {name: (io.read_manifest(uri) or {}).get("inputs_sha256", uri) for name, uri in model_uris.items()},
        "eval_sha256": io.records_sha256(records),
        "max_new_tokens": max_new_tokens,
        **({"prompt_prefixes": prefixes} if any(prefixes.values()) else {}),
    }
    done = io.manifest_matches(output_uri, inputs)
    if done:
        return io.read_json(io.join(output_uri, METRICS_FILE))

    prompts = [r[prompt_field] for r in records]
    references = [str(r[answer_field]) for r in records]
    tokenizer = load_tokenizer(next(iter(model_uris.values())))
    models = {name: load_model(uri, device=device).eval() for name, uri in model_uris.items()}
    answers = {
        name: generate_answers(
            model, tokenizer, [with_prefix(prefixes[name], p) for p in prompts], max_new_tokens=max_new_tokens,
            batch_size=batch_size,
        )
        for name, model in models.items()
    }
    forced = teacher_forced_metrics(
        models, teacher_name if teacher_name in models else None, tokenizer,
        [{"prompt": p, "response": a} for p, a in zip(prompts, references, strict=True)], prompt_prefixes=prefixes,
    )
    report: dict[str, Any] = {"num_examples": len(records), "models": {}}
    if any(prefixes.values()):
        report["prompt_prefixes"] = {name: prefix for name, prefix in prefixes.items() if prefix}
    for name, model in models.items():
        correct = sum(normalise_answer(a) == normalise_answer(ref) for a, ref in zip(answers[name], references, strict=True))
        report["models"][name] = {
            "exact_match": correct / len(records),
            "parameters": count_parameters(model),
            **forced[name],
        }
    if teacher_name in report["models"]:
        teacher_score = report["models"][teacher_name]["exact_match"]
        teacher_params = report["models"][teacher_name]["parameters"]
        for name, m in report["models"].items():
            if name != teacher_name:
                m["teacher_retained"] = m["exact_match"] / teacher_score if teacher_score else 0.0
                m["parameters_vs_teacher"] = m["parameters"] / teacher_params
    samples = [
        {"prompt": p, "reference": ref, **{name: answers[name][i] for name in models}}
        for i, (p, ref) in enumerate(zip(prompts, references, strict=True))
    ]
    report["samples"] = samples[:num_samples]

    with tempfile.TemporaryDirectory() as tmp:
        fig = comparison_figure(report)
        fig.savefig(os.path.join(tmp, PLOT_FILE))
        with open(os.path.join(tmp, PLOT_FILE), "rb") as f:
            png = f.read()
    with io.atomic_open(io.join(output_uri, PLOT_FILE), "wb") as f:
        f.write(png)
    io.write_records(io.join(output_uri, SAMPLES_FILE), samples)
    io.write_json(io.join(output_uri, METRICS_FILE), report)
    io.write_manifest(output_uri, stage="evaluate", inputs=inputs, files=[METRICS_FILE, SAMPLES_FILE, PLOT_FILE])
    return report
