"""The evaluate stage: answer metrics, perplexity, agreement with the teacher, calibration, sizes.

Every model (teacher, student, baseline) answers the held-out prompts greedily, each through its
own tokenizer, and is scored on:

- the answer metrics named in ``evaluate.metrics`` (:mod:`mydistill.evaluation.metrics`: ``exact`` — stored
  as ``exact_match`` —, ``contains``, ``extract``, ``rouge_l``, ``chrf``; ``judge`` from
  :mod:`mydistill.evaluation.judge`), overall and per category when eval rows carry one;
- ``perplexity``: exp of the mean next-token cross-entropy on the reference responses;
- ``kl_to_teacher`` / ``top1_agreement``: mean KL(teacher ‖ model) and the share of response
  positions where both pick the same token, teacher-forced on the references: only for a model
  whose vocabulary is the teacher's (ids mean the same strings);
- ``text_agreement``: ROUGE-L between the model's answer and the teacher's, for every model, so
  that models with another tokenizer are compared too;
- ``calibration_ece``: expected calibration error of the first answer token (confidence = the
  top token's probability, correct = it is the reference's first token), with
  ``first_token_accuracy``;
- ``answer_words`` and ``length_vs_teacher`` (mean answer length over the teacher's: a student
  that pads its answers shows > 1);
- ``parameters``.

``teacher_retained`` is a model's ``gate_metric`` score as a fraction of the teacher's; a teacher
scoring 0 leaves it undefined (None, with ``retained_undefined`` saying why), never 0.

Every score comes with its interval at ``confidence`` (:mod:`mydistill.evaluation.uncertainty`):
``<metric>_low`` / ``<metric>_high`` beside each answer metric (Wilson for rates, the bootstrap
over questions for graded scores), ``teacher_retained_low`` / ``_high`` (the paired bootstrap over
the same questions), the same per category, and ``comparisons["student_vs_baseline"]``: the
paired difference on the gate metric. ``question_scores`` keeps each model's gate-metric score
per question (with the questions' ids), so the registry can compare a student with the champion
on the same questions.

A student distilled step-by-step answers behind its label prefix (``prompt_prefix`` in its
checkpoint's manifest); each model is prompted with its own prefix ('' for the others), and the
teacher-forced metrics score the same response tokens for every model sharing a tokenizer.

How one model is scored (answers, teacher-forced metrics) is :mod:`mydistill.evaluation.scoring`; this module
runs it for every model and builds, writes and tabulates the report.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

from mydistill import io
from mydistill.config import DataConfig, EvaluateConfig
from mydistill.evaluation import scoring, uncertainty
from mydistill.evaluation.report import (  # noqa: F401 (the report's drawing and text are imported from here too)
    category_figure,
    category_lines,
    comparison_figure,
    comparison_lines,
    loss_curves_figure,
    summary_table,
    with_interval,
)
from mydistill.evaluation.metrics import TEXT_METRICS, answer_agreement, mean, report_key, score_answers
from mydistill.fingerprint import fingerprint
from mydistill.models import count_parameters, load_model, load_tokenizer
from mydistill.tokenization import prompt_prefix_of, tokenizer_sha256, with_prefix

METRICS_FILE = "metrics.json"
SAMPLES_FILE = "samples.jsonl"
PLOT_FILE = "comparison.png"
CATEGORY_PLOT_FILE = "category_retention.png"


def retention(score: float, teacher_score: float, metric: str) -> tuple[float | None, str | None]:
    """``score / teacher_score`` and None, or None and why when the teacher scores 0 (a ratio to
    nothing is undefined, not 0%)."""
    if teacher_score > 0:
        return score / teacher_score, None
    return None, f"the teacher scores 0 on {metric}, so the share of its score a student keeps is undefined"


JudgeFn = Callable[[Sequence[str], Sequence[str], Sequence[str], Sequence[str] | None], list[float]]


def evaluate_models(
    model_uris: dict[str, str],
    eval_uri: str,
    output_uri: str,
    cfg: EvaluateConfig | None = None,
    *,
    fields: DataConfig | None = None,
    teacher_name: str | None = "teacher",
    gate_metric: str = "exact",
    confidence: float = 0.95,
    judge: JudgeFn | None = None,
    judge_id: str | None = None,
    device: str = "cpu",
    dtypes: dict[str, str] | None = None,
    answer_cache_uri: str | None = None,
) -> dict[str, Any]:
    """Score every model in ``model_uris`` on ``eval_uri`` as the config's ``evaluate`` section says
    (``cfg``: metrics, extract pattern, answer length, batch size, samples logged; default its
    defaults), reading the eval records' fields named by ``fields`` (the ``data`` section); write
    metrics, samples and a plot.

    ``judge(prompts, answers, references, teacher_answers)`` grades answers for the ``judge``
    metric (:func:`mydistill.evaluation.judge.make_judge`); ``judge_id`` names it in the cache key. Returns
    the report (also ``metrics.json`` under ``output_uri``). Skipped when ``output_uri`` already
    holds a report for the same models, data and metrics. ``dtypes``: each model's load precision
    by name (``teacher.dtype`` / ``student.dtype``; missing: fp32). ``confidence``: the level of
    every interval in the report (``registry.confidence``). ``answer_cache_uri``: a folder keeping each
    model's greedy answers by what makes them (the model's fingerprint, its load precision, the
    prompts, answer length and batch size), so a teacher evaluated run after run on the same
    questions generates its answers once.
    """
    cfg, fields = cfg or EvaluateConfig(), fields or DataConfig()
    metrics, extract_pattern = cfg.metrics, cfg.extract
    max_new_tokens, batch_size, num_samples = cfg.max_new_tokens, cfg.batch_size, cfg.num_samples
    prompt_field, answer_field, category_field = fields.prompt_field, fields.answer_field, fields.category_field
    _check_metrics(metrics, gate_metric, judge)
    records = _read_eval_set(eval_uri, prompt_field, answer_field)
    prefixes = {name: prompt_prefix_of(uri) for name, uri in model_uris.items()}
    inputs = _identity(model_uris, records, prefixes, cfg, gate_metric=gate_metric, confidence=confidence, judge_id=judge_id)
    done = io.manifest_matches(output_uri, inputs)
    if done:
        return io.read_json(io.join(output_uri, METRICS_FILE))

    prompts = [r[prompt_field] for r in records]
    references = [io.text_field(r, answer_field, f"{eval_uri}: record {i + 1}", numbers=True) for i, r in enumerate(records)]
    tokenizers = {name: load_tokenizer(uri) for name, uri in model_uris.items()}
    models = {name: load_model(uri, device=device, dtype=(dtypes or {}).get(name)).eval() for name, uri in model_uris.items()}
    made_by = {name: {"model": fingerprint(uri, kind="model")["sha256"], "dtype": (dtypes or {}).get(name)}
               for name, uri in model_uris.items()} if answer_cache_uri else None
    answers = _generate_answers(models, tokenizers, prompts, prefixes, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                cache_uri=answer_cache_uri, made_by=made_by)
    teacher = teacher_name if teacher_name in models else None
    scores = _answer_scores(metrics, prompts, answers, references, teacher=teacher, judge=judge, extract_pattern=extract_pattern)
    forced = _teacher_forced_by_tokenizer(models, tokenizers, teacher, prompts, references, prefixes)

    report: dict[str, Any] = {
        "num_examples": len(records), "metrics": [report_key(m) for m in metrics], "gate_metric": gate_metric,
        "confidence": confidence, "models": _model_metrics(models, scores, forced, answers, confidence),
    }
    if any(prefixes.values()):
        report["prompt_prefixes"] = {name: prefix for name, prefix in prefixes.items() if prefix}
    if teacher:
        _compare_with_teacher(report, teacher, answers, gate_metric, scores, confidence)
    if "student" in scores and "baseline" in scores:
        report["comparisons"] = {"student_vs_baseline": _difference(scores["student"], scores["baseline"], gate_metric, confidence)}
    report["question_scores"] = {
        "metric": report_key(gate_metric), "ids": [question_id(p) for p in prompts],
        "models": {name: per_metric[gate_metric] for name, per_metric in scores.items()},
    }
    if judge is not None and hasattr(judge, "summary"):
        report["judge"] = judge.summary()  # requests, cache hits and counted failures
    categories = [r.get(category_field) if category_field else None for r in records]
    if any(c is not None for c in categories):
        report["by_category"] = _by_category(categories, scores, teacher, gate_metric, confidence)
    samples = [
        {"prompt": p, "reference": ref, **({"category": categories[i]} if categories[i] is not None else {}),
         **{name: answers[name][i] for name in models}}
        for i, (p, ref) in enumerate(zip(prompts, references, strict=True))
    ]
    report["samples"] = samples[:num_samples]
    _write_report(output_uri, report, samples, inputs)
    return report


def _identity(
    model_uris: dict[str, str], records: list[dict[str, Any]], prefixes: dict[str, str | None], cfg: EvaluateConfig, *,
    gate_metric: str, confidence: float, judge_id: str | None,
) -> dict[str, Any]:
    """What an evaluation is of: the models' inputs, the eval set's content and the settings that change a score."""
    metrics = cfg.metrics
    return {
        "models": {name: (io.read_manifest(uri) or {}).get("inputs_sha256", uri) for name, uri in model_uris.items()},
        "eval_sha256": io.records_sha256(records),
        "max_new_tokens": cfg.max_new_tokens,
        "metrics": list(metrics), "gate_metric": gate_metric, "confidence": confidence,
        **({"extract": cfg.extract} if "extract" in metrics else {}),
        **({"judge": judge_id} if "judge" in metrics else {}),
        **({"prompt_prefixes": prefixes} if any(prefixes.values()) else {}),
    }


def _generate_answers(
    models: dict[str, Any], tokenizers: dict[str, Any], prompts: list[str], prefixes: dict[str, str | None], *,
    max_new_tokens: int, batch_size: int, cache_uri: str | None = None, made_by: dict[str, Any] | None = None,
) -> dict[str, list[str]]:
    """Every model's answers, each behind its own prompt prefix (one progress bar across models);
    with ``cache_uri``, answers generated before by the same model (``made_by[name]``: its
    fingerprint and precision) for the same prompts and settings are read back instead."""
    answers = {}
    for i, (name, model) in enumerate(models.items()):
        prompted = [with_prefix(prefixes[name], p) for p in prompts]
        cached = None
        if cache_uri and made_by:
            key = io.sha256_of({**made_by[name], "prompts": prompted, "max_new_tokens": max_new_tokens, "batch_size": batch_size})
            cached = io.join(cache_uri, f"{key[:24]}.json")
            if io.exists(cached):
                answers[name] = io.read_json(cached)["answers"]
                continue
        answers[name] = scoring.generate_answers(
            model, tokenizers[name], prompted, max_new_tokens=max_new_tokens, batch_size=batch_size, label=name,
            part=(i, len(models)),
        )
        if cached:
            io.write_json(cached, {**made_by[name], "answers": answers[name]})  # type: ignore[index]
    return answers


def _check_metrics(metrics: Sequence[str], gate_metric: str, judge: JudgeFn | None) -> None:
    unknown = [m for m in metrics if m not in (*TEXT_METRICS, "judge")]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; expected some of {', '.join((*TEXT_METRICS, 'judge'))}")
    if gate_metric not in metrics:
        raise ValueError(f"gate metric {gate_metric!r} is not among the computed metrics {list(metrics)}")
    if "judge" in metrics and judge is None:
        raise ValueError("the judge metric needs a judge (evaluate.judge: base_url and model)")


def _read_eval_set(eval_uri: str, prompt_field: str, answer_field: str) -> list[dict[str, Any]]:
    records = io.read_records(eval_uri)
    if not records:
        raise io.DataError(f"{eval_uri}: evaluation set is empty")
    for i, r in enumerate(records):
        for name in (prompt_field, answer_field):
            if name not in r:
                raise io.DataError(f"{eval_uri}: record {i + 1} has no {name!r} field")
    return records


def _answer_scores(
    metrics: Sequence[str], prompts: list[str], answers: dict[str, list[str]], references: list[str], *,
    teacher: str | None, judge: JudgeFn | None, extract_pattern: str,
) -> dict[str, dict[str, list[float]]]:
    """Per model, per answer metric, the score of every answer (the judge sees the teacher's answer too)."""
    scores = {name: score_answers(metrics, answers[name], references, extract_pattern=extract_pattern) for name in answers}
    if "judge" in metrics:
        assert judge is not None
        for name in answers:
            scores[name]["judge"] = judge(prompts, answers[name], references, answers[teacher] if teacher else None)
    return scores


def _teacher_forced_by_tokenizer(
    models: dict[str, Any], tokenizers: dict[str, Any], teacher: str | None, prompts: list[str], references: list[str],
    prefixes: dict[str, str],
) -> dict[str, dict[str, float]]:
    """:func:`mydistill.evaluation.scoring.teacher_forced_metrics` within each group of models sharing a tokenizer:
    ids fed to a model must be its own; KL / top-1 agreement only where the teacher is in the same group."""
    groups: dict[str, list[str]] = {}
    for name, tok in tokenizers.items():
        groups.setdefault(tokenizer_sha256(tok), []).append(name)
    forced_records = [{"prompt": p, "response": a} for p, a in zip(prompts, references, strict=True)]
    forced: dict[str, dict[str, float]] = {}
    for names in groups.values():
        forced.update(scoring.teacher_forced_metrics(
            {n: models[n] for n in names}, teacher if teacher in names else None, tokenizers[names[0]], forced_records,
            prompt_prefixes=prefixes,
        ))
    return forced


def question_id(prompt: str) -> str:
    """A question's identity across evaluations: the first 16 hex digits of its prompt's sha256
    (what pairs a student's answers with the champion's, whatever order the eval set is in)."""
    import hashlib

    return hashlib.sha256(prompt.encode()).hexdigest()[:16]


def _with_intervals(per_metric: dict[str, list[float]], confidence: float) -> dict[str, float]:
    """``{key: mean, key_low: …, key_high: …}`` for each answer metric's per-question scores."""
    out: dict[str, float] = {}
    for k, v in per_metric.items():
        interval = uncertainty.mean_interval(v, confidence)
        out.update({report_key(k): mean(v), f"{report_key(k)}_low": interval.low, f"{report_key(k)}_high": interval.high})
    return out


def _retained(scores: list[float], teacher_scores: list[float], confidence: float) -> dict[str, float | None]:
    """The share of the teacher's score kept, with its paired interval; None when the teacher scores 0."""
    interval = uncertainty.ratio_interval(scores, teacher_scores, confidence)
    if interval is None:
        return {"teacher_retained": None}
    return {"teacher_retained": interval.value, "teacher_retained_low": interval.low, "teacher_retained_high": interval.high}


def _difference(scores: dict[str, list[float]], other: dict[str, list[float]], metric: str, confidence: float) -> dict[str, Any]:
    interval = uncertainty.difference_interval(scores[metric], other[metric], confidence)
    return {"metric": report_key(metric), "difference": interval.value, "low": interval.low, "high": interval.high,
            "confidence": confidence}


def _model_metrics(
    models: dict[str, Any], scores: dict[str, dict[str, list[float]]], forced: dict[str, dict[str, float]],
    answers: dict[str, list[str]], confidence: float,
) -> dict[str, dict[str, Any]]:
    """Each model's row of the report: mean answer scores with intervals, parameters, answer length, teacher-forced metrics."""
    rows = {}
    words = {name: [len(a.split()) for a in answers[name]] for name in models}
    for name, model in models.items():
        m: dict[str, Any] = _with_intervals(scores[name], confidence)
        m.update(parameters=count_parameters(model), answer_words=mean(words[name]), **forced[name])
        rows[name] = m
    return rows


def _compare_with_teacher(
    report: dict[str, Any], teacher: str, answers: dict[str, list[str]], gate_metric: str,
    scores: dict[str, dict[str, list[float]]], confidence: float,
) -> None:
    """Add to every other model's row how it compares with the teacher's (share of its score with
    its paired interval, size, agreement)."""
    gate_key = report_key(gate_metric)
    t = report["models"][teacher]
    for name, m in report["models"].items():
        if name == teacher:
            continue
        _, why = retention(m[gate_key], t[gate_key], gate_metric)
        m.update(_retained(scores[name][gate_metric], scores[teacher][gate_metric], confidence))
        if why:
            report["retained_undefined"] = why
        m["parameters_vs_teacher"] = m["parameters"] / t["parameters"]
        m["text_agreement"] = mean([answer_agreement(a, b) for a, b in zip(answers[name], answers[teacher], strict=True)])
        m["length_vs_teacher"] = m["answer_words"] / t["answer_words"] if t["answer_words"] else None
        if "kl_to_teacher" not in m:
            m["tokenizer"] = "differs from the teacher's: text-level agreement only"


def _write_report(output_uri: str, report: dict[str, Any], samples: list[dict[str, Any]], inputs: dict[str, Any]) -> None:
    """The plots, the samples, the report, then the manifest that makes them a finished output."""
    plots = {PLOT_FILE: comparison_figure(report), CATEGORY_PLOT_FILE: category_figure(report)}
    pngs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, fig in plots.items():
            if fig is None:
                continue
            fig.savefig(os.path.join(tmp, name))
            with open(os.path.join(tmp, name), "rb") as f:
                pngs[name] = f.read()
    for name, png in pngs.items():
        with io.atomic_open(io.join(output_uri, name), "wb") as f:
            f.write(png)
    io.write_records(io.join(output_uri, SAMPLES_FILE), samples)
    io.write_json(io.join(output_uri, METRICS_FILE), report)
    io.write_manifest(output_uri, stage="evaluate", inputs=inputs, files=[METRICS_FILE, SAMPLES_FILE, *pngs])


def _by_category(
    categories: Sequence[Any], scores: dict[str, dict[str, list[float]]], teacher: str | None = None,
    gate_metric: str = "exact", confidence: float = 0.95,
) -> dict[str, Any]:
    """``{category: {"count": n, model: {metric: mean, metric_low, metric_high, teacher_retained…}}}``
    for rows that carry a category; the share of the teacher's gate-metric score each model keeps
    in the category, with its paired interval over the category's questions."""
    out: dict[str, Any] = {}
    for category in sorted({str(c) for c in categories if c is not None}):
        rows = [i for i, c in enumerate(categories) if c is not None and str(c) == category]
        out[category] = {"count": len(rows)}
        for name, per_metric in scores.items():
            picked = {k: [v[i] for i in rows] for k, v in per_metric.items()}
            cell: dict[str, Any] = _with_intervals(picked, confidence)
            if teacher and name != teacher:
                cell.update(_retained(picked[gate_metric], [scores[teacher][gate_metric][i] for i in rows], confidence))
            out[category][name] = cell
    return out
