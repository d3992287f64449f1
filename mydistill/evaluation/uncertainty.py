"""How sure a score is: 95% intervals for answer metrics, retention and paired comparisons.

On 24 questions one answer moves a rate by 4 points, so a score without its interval says little.
Every function here takes per-question scores (one float per eval question, the same questions in
the same order for every model) and returns an :class:`Interval`:

- :func:`wilson_interval`: a rate (scores all 0 or 1): Wilson's score interval (Wilson 1927;
  Brown, Cai & DasGupta 2001 recommend it over the normal "Wald" interval, which collapses to a
  point at 0/n and n/n);
- :func:`mean_interval`: Wilson for a rate, else the percentile bootstrap over questions
  (Efron & Tibshirani 1993, ch. 13) for graded scores (ROUGE-L, chrF, a pairwise judge);
- :func:`ratio_interval`: the share of one model's score another keeps (retention), by the
  *paired* bootstrap: each resample draws questions, and both means are taken over the same draw,
  so what the two models have in common (easy and hard questions) cancels;
- :func:`difference_interval`: student minus champion (or baseline) on the same questions, paired
  the same way; a gain is more than noise when the interval lies above 0.

The bootstrap is seeded (numpy's PCG64), so the same scores always give the same interval.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

RESAMPLES = 2000  # enough for stable 2.5% / 97.5% percentiles; 200 questions × 2000 draws is instant
SEED = 0


@dataclass(frozen=True)
class Interval:
    """A point estimate with its two-sided interval at ``confidence`` (``low <= value <= high``
    for the means; a ratio's bootstrap percentiles may sit off-centre)."""

    value: float
    low: float
    high: float
    confidence: float
    method: str  # "wilson", "bootstrap", "paired bootstrap"

    def above(self, threshold: float) -> bool:
        """The whole interval lies above ``threshold`` (more than noise)."""
        return self.low > threshold

    def as_dict(self) -> dict[str, float | str]:
        return {"value": self.value, "low": self.low, "high": self.high, "confidence": self.confidence, "method": self.method}


def z_value(confidence: float) -> float:
    """The two-sided normal quantile: 1.96 for 0.95."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie strictly between 0 and 1 (got {confidence})")
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson_interval(successes: float, n: int, confidence: float = 0.95) -> Interval:
    """Wilson's score interval for ``successes`` out of ``n``:

    (p̂ + z²/2n ± z·√(p̂(1−p̂)/n + z²/4n²)) / (1 + z²/n)

    It never leaves [0, 1] and is not a point at 0/n or n/n (0 of 10: [0, 27.8%] at 95%).
    No questions: the rate could be anything, [0, 1] around 0.
    """
    if n <= 0:
        return Interval(0.0, 0.0, 1.0, confidence, "wilson")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must lie in 0..n (got {successes} of {n})")
    z = z_value(confidence)
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    # at 0/n the exact lower end is 0 and at n/n the upper end is 1: say so, not a rounding error away
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return Interval(p, low, high, confidence, "wilson")


def is_rate(scores: Sequence[float]) -> bool:
    """Every score is 0 or 1 (exact match, contains, a reference-mode judge)."""
    return all(s in (0, 1) for s in scores)


def _draws(n: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples, n) question indices drawn with replacement."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _percentiles(values: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def mean_interval(
    scores: Sequence[float], confidence: float = 0.95, *, resamples: int = RESAMPLES, seed: int = SEED,
) -> Interval:
    """The mean score with its interval: Wilson when every score is 0 or 1, else the percentile
    bootstrap over questions."""
    if is_rate(scores):
        return wilson_interval(sum(scores), len(scores), confidence)
    values = np.asarray(scores, dtype=float)
    means = values[_draws(len(values), resamples, seed)].mean(axis=1)
    return Interval(float(values.mean()), *_percentiles(means, confidence), confidence, "bootstrap")


def ratio_interval(
    scores: Sequence[float], reference: Sequence[float], confidence: float = 0.95, *,
    resamples: int = RESAMPLES, seed: int = SEED,
) -> Interval | None:
    """mean(scores) / mean(reference) over the same questions, with a paired bootstrap interval.

    None when the reference scores 0 in total (a share of nothing is undefined). Resamples that
    happen to draw only questions the reference misses are undefined too and left out.
    """
    a, b = _paired(scores, reference)
    if b.sum() <= 0:
        return None
    draws = _draws(len(a), resamples, seed)
    numerators, denominators = a[draws].sum(axis=1), b[draws].sum(axis=1)
    defined = denominators > 0
    ratios = numerators[defined] / denominators[defined]
    return Interval(float(a.sum() / b.sum()), *_percentiles(ratios, confidence), confidence, "paired bootstrap")


def difference_interval(
    scores: Sequence[float], other: Sequence[float], confidence: float = 0.95, *,
    resamples: int = RESAMPLES, seed: int = SEED,
) -> Interval:
    """mean(scores) − mean(other) over the same questions, with a paired bootstrap interval."""
    a, b = _paired(scores, other)
    differences = a - b
    means = differences[_draws(len(differences), resamples, seed)].mean(axis=1)
    return Interval(float(differences.mean()), *_percentiles(means, confidence), confidence, "paired bootstrap")


def _paired(a: Sequence[float], b: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    if len(a) != len(b):
        raise ValueError(f"paired scores need the same questions: got {len(a)} and {len(b)} scores")
    if not len(a):
        raise ValueError("paired scores need at least one question")
    return np.asarray(a, dtype=float), np.asarray(b, dtype=float)
