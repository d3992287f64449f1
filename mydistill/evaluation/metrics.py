"""Text metrics: how well a model's answer matches the reference, one small pure function each.

Each takes ``(answer, reference)`` strings and returns a score in [0, 1]; :func:`score_answers`
picks them by name (``evaluate.metrics``) and averages over a dataset.

- ``exact``: equal after :func:`normalise_text` (case, whitespace, trailing punctuation);
- ``contains``: the reference appears in the answer as a whole word / number
  ("The capital of Syria is Damascus." contains "Damascus"; "120" does not contain "12");
- ``extract``: an answer pulled out first (``evaluate.extract``: ``last_number``,
  ``after_answer`` or a regular expression, group 1 if it has one), then ``exact``;
- ``rouge_l``: ROUGE-L F1 over words (rouge-score, stemming off);
- ``chrf``: chrF (sacrebleu), divided by 100.

The model-graded ``judge`` metric lives in :mod:`mydistill.evaluation.judge`; the teacher-forced ones
(perplexity, KL, top-1 agreement, calibration) in :mod:`mydistill.evaluation.scoring`.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Sequence

# the names `evaluate.metrics` accepts live with the config that validates them
from mydistill.config.evaluation import EXTRACT_PRESETS, METRIC_NAMES, TEXT_METRICS  # noqa: F401
# the report kept `exact_match` as the name of exact match before metrics were configurable
REPORT_KEYS = {"exact": "exact_match"}

_TRAILING = string.punctuation + "“”‘’"
_NUMBER = re.compile(r"-?\d+(?:[.,]\d+)*")
_AFTER_ANSWER = re.compile(r"answer\s*(?:is)?\s*[:：]?\s*(.+)", re.IGNORECASE | re.DOTALL)


def report_key(metric: str) -> str:
    """The key a metric is stored under in the evaluation report."""
    return REPORT_KEYS.get(metric, metric)


def normalise_text(text: str) -> str:
    """Lower case, single spaces, no surrounding quotes or trailing punctuation: ``" Paris. "`` → ``paris``."""
    return " ".join(text.split()).lower().strip(_TRAILING + " ")


def exact(answer: str, reference: str) -> float:
    return float(normalise_text(answer) == normalise_text(reference))


def contains(answer: str, reference: str) -> float:
    """1 when the normalised reference occurs in the normalised answer, not inside a longer word or number."""
    ref = normalise_text(reference)
    if not ref:
        return 0.0
    # (?<![\w.]) / (?![\w]|\.\d): "12" is not in "120" nor "1.12", but is in "is 12."
    pattern = rf"(?<![\w.]){re.escape(ref)}(?!\w|[.,]\d)"
    return float(re.search(pattern, normalise_text(answer)) is not None)


def compile_extract(pattern: str) -> Callable[[str], str | None]:
    """The extractor ``evaluate.extract`` names: a preset or a regular expression (raises re.error)."""
    if pattern == "last_number":
        return lambda text: (_NUMBER.findall(text) or [None])[-1]
    if pattern == "after_answer":
        def after_answer(text: str) -> str | None:
            match = _AFTER_ANSWER.search(text)
            return match.group(1).strip().splitlines()[0] if match else None
        return after_answer
    regex = re.compile(pattern, re.IGNORECASE)

    def by_regex(text: str) -> str | None:
        match = regex.search(text)
        if not match:
            return None
        return match.group(1) if regex.groups else match.group(0)
    return by_regex


def extract(answer: str, reference: str, pattern: str = "last_number") -> float:
    """Exact match of the extracted answer; the reference is extracted the same way when it holds a match
    (so ``"12"`` and ``"The answer is 12."`` both give ``12``)."""
    pull = compile_extract(pattern)
    got = pull(answer)
    if got is None:
        return 0.0
    want = pull(reference)
    return exact(got, want if want is not None else reference)


def rouge_l(answer: str, reference: str) -> float:
    """ROUGE-L F1 between the word sequences (rouge-score's tokenizer: lower case, alphanumeric words)."""
    scorer = _rouge_scorer()
    return float(scorer.score(reference, answer)["rougeL"].fmeasure)


def chrf(answer: str, reference: str) -> float:
    """chrF (character n-gram F-score, β=2) from sacrebleu, on a 0–1 scale."""
    try:
        from sacrebleu.metrics import CHRF
    except ImportError:
        raise ImportError("the chrf metric needs sacrebleu: pip install sacrebleu") from None
    return float(CHRF().sentence_score(answer, [reference]).score) / 100.0


_SCORER = None


def _rouge_scorer():
    global _SCORER
    if _SCORER is None:
        try:
            from rouge_score import rouge_scorer
        except ImportError:
            raise ImportError("the rouge_l metric needs rouge-score: pip install rouge-score") from None
        _SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return _SCORER


def answer_agreement(answer: str, other: str) -> float:
    """How alike two models' answers are: 1 when equal after normalisation (even if both are
    empty or wordless, where ROUGE has nothing to count), else ROUGE-L F1."""
    return 1.0 if normalise_text(answer) == normalise_text(other) else rouge_l(answer, other)


def text_metric(name: str, *, extract_pattern: str = "last_number") -> Callable[[str, str], float]:
    """The ``(answer, reference) -> score`` function for a text metric name."""
    if name == "extract":
        pull = extract_pattern
        return lambda answer, reference: extract(answer, reference, pull)
    functions = {"exact": exact, "contains": contains, "rouge_l": rouge_l, "chrf": chrf}
    if name not in functions:
        raise ValueError(f"unknown text metric {name!r}; expected one of {', '.join(TEXT_METRICS)}")
    return functions[name]


def score_answers(
    metrics: Sequence[str], answers: Sequence[str], references: Sequence[str], *, extract_pattern: str = "last_number",
) -> dict[str, list[float]]:
    """Per-example scores for each text metric in ``metrics`` (others are skipped)."""
    out = {}
    for name in metrics:
        if name in TEXT_METRICS:
            fn = text_metric(name, extract_pattern=extract_pattern)
            out[name] = [fn(a, r) for a, r in zip(answers, references, strict=True)]
    return out


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def expected_calibration_error(confidences: Sequence[float], correct: Sequence[bool], bins: int = 10) -> float:
    """ECE: Σ_b (|b|/N) · |accuracy(b) − mean confidence(b)| over equal-width confidence bins
    (Guo et al. 2017, eq. 3). 0 for an empty input."""
    n = len(confidences)
    if n == 0:
        return 0.0
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        idx = [i for i, c in enumerate(confidences) if (lo < c <= hi) or (b == 0 and c == 0)]
        if idx:
            acc = sum(bool(correct[i]) for i in idx) / len(idx)
            conf = sum(confidences[i] for i in idx) / len(idx)
            total += len(idx) / n * abs(acc - conf)
    return total
