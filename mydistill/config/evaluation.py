"""Evaluation (metrics, the judge) and the registry's quality gate."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, model_validator

from mydistill.config.section import Section


# metrics computed from an answer's text (mydistill.evaluation.metrics)
TEXT_METRICS = ("exact", "contains", "extract", "rouge_l", "chrf")
# names accepted by `evaluate.metrics`; `judge` is graded by a model (mydistill.evaluation.judge)
METRIC_NAMES = (*TEXT_METRICS, "judge")
EXTRACT_PRESETS = ("last_number", "after_answer")


class JudgeConfig(Section):
    """An OpenAI-compatible chat model that grades answers (the `judge` metric)."""

    base_url: str = Field(..., description="Base URL of the OpenAI-compatible API, e.g. http://127.0.0.1:8000/v1.")
    model: str = Field(..., description="Model name the judge requests ask for.")
    api_key_env: str = Field(
        "OPENAI_API_KEY", description="Environment variable holding the API key (never the key itself); unset: no key sent."
    )
    mode: Literal["reference", "pairwise"] = Field(
        "reference",
        description="'reference': grade each answer against the reference (1 correct / 0 not). 'pairwise': compare "
        "each model's answer with the teacher's, asked twice with the order swapped to cancel position bias "
        "(1 model better, 0.5 tie, 0 teacher better).",
    )
    timeout_s: float = Field(30.0, gt=0, description="Seconds per request.")
    max_retries: int = Field(2, ge=0, description="Retries on a 5xx or connection error (a 4xx is not retried).")
    cache_uri: str | None = Field(
        None, description="Where verdicts are cached (JSONL keyed by prompt, answers and judge). Empty: <work_dir>/judge-cache."
    )


class EvaluateConfig(Section):
    metrics: list[str] = Field(
        default_factory=lambda: ["exact", "contains"],
        description="Answer metrics computed for every model: exact (normalised case/whitespace/trailing punctuation), "
        "contains (reference as a whole word/number in the answer), extract (see `extract`, then exact), rouge_l, chrf, "
        "judge (see `judge`). Perplexity, KL / top-1 agreement with the teacher, calibration and answer length are "
        "always reported.",
    )
    extract: str = Field(
        "last_number",
        description="For the extract metric: 'last_number', 'after_answer' (text after 'Answer:'), or a regular "
        "expression (group 1 if it has one, else the whole match).",
    )
    judge: JudgeConfig | None = Field(None, description="The grading model for the judge metric.")
    max_new_tokens: int = Field(16, gt=0, description="Tokens generated per answer.")
    batch_size: int = Field(100, gt=0, description="Prompts per generation batch.")
    num_samples: int = Field(10, ge=0, description="Example generations logged per model.")
    baseline: bool = Field(
        True, description="Train a baseline student on the real data alone with the same step budget, for comparison."
    )

    @model_validator(mode="after")
    def _metrics_known(self) -> EvaluateConfig:
        unknown = [m for m in self.metrics if m not in METRIC_NAMES]
        if unknown:
            raise ValueError(f"metrics: unknown {unknown}; expected some of {', '.join(METRIC_NAMES)}")
        if not self.metrics:
            raise ValueError("metrics: give at least one, e.g. [exact, contains]")
        if len(set(self.metrics)) != len(self.metrics):
            raise ValueError(f"metrics: {self.metrics} names a metric twice")
        if self.extract not in EXTRACT_PRESETS:
            try:
                re.compile(self.extract)
            except re.error as e:
                raise ValueError(
                    f"extract: {self.extract!r} is neither {' nor '.join(EXTRACT_PRESETS)} nor a valid regular expression ({e})"
                ) from None
        if "judge" in self.metrics and self.judge is None:
            raise ValueError("metrics: judge needs the `judge` section (base_url, model) naming the grading model")
        return self


class RegisterConfig(Section):
    enabled: bool = Field(True, description="Register the student in the MLflow model registry.")
    model_name: str = Field("mydistill-student", description="Registered model name.")
    alias: str = Field("champion", description="Alias moved to the new version when it passes the gate.")
    gate_metric: str = Field(
        "exact",
        description="The evaluate.metrics entry the quality gate and '% of teacher retained' use (e.g. contains for "
        "free-text answers).",
    )
    min_teacher_retained: float = Field(
        0.8, ge=0, le=1, description="Quality gate: the student must keep at least this fraction of the teacher's score: the lower end of "
        "its paired interval at `confidence`, not only the point estimate."
    )
    beat_champion: bool = Field(
        True,
        description="Quality gate: the student must also beat the version the alias points to now by more than noise: "
        "the paired interval of the difference on the same questions lies above 0 (a champion registered without "
        "per-question scores, or on another eval set: its score must be exceeded). No such version yet: passes. "
        "Scores are gate_metric on the eval set, so keep one model name per eval set and metric.",
    )
    confidence: float = Field(
        0.95, gt=0, lt=1,
        description="Level of every interval in the evaluation report and of the gate: the lower end of the retention's "
        "interval must reach min_teacher_retained, and a gain over the champion must exclude 0 at this level.",
    )
    min_category_retained: float = Field(
        0.0, ge=0, le=1,
        description="Quality gate: every category of the eval set (data.category_field) must keep at least this share "
        "of the teacher's gate_metric score, so one collapsed skill fails the gate even when the average passes. "
        "0: not checked.",
    )
