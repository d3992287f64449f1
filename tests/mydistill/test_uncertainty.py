"""Intervals for scores (mydistill.evaluation.uncertainty): Wilson against published values, the bootstrap against
the normal approximation, the paired comparisons on constructed cases whose answer is known."""

from __future__ import annotations

import math
import random

import pytest

from mydistill.evaluation.uncertainty import (
    difference_interval, mean_interval, ratio_interval, wilson_interval, z_value,
)


@pytest.mark.parametrize(
    "successes,n,low,high",
    [
        # Newcombe (1998), Statistics in Medicine 17:857, Table I, method 3 (Wilson, no continuity correction)
        (81, 263, 0.2553, 0.3662),
        (15, 148, 0.0624, 0.1605),
        (0, 20, 0.0, 0.1611),
        (1, 29, 0.0061, 0.1718),
        # the ends: 0/n starts at 0 and n/n ends at 1, yet neither is a point (Wald's would be)
        (0, 10, 0.0, 0.2775),
        (10, 10, 0.7225, 1.0),
    ],
)
def test_wilson_matches_published_values(successes, n, low, high):
    interval = wilson_interval(successes, n)
    assert (round(interval.low, 4), round(interval.high, 4)) == (low, high)
    assert interval.value == successes / n and interval.method == "wilson"


def test_wilson_narrows_with_more_questions_and_widens_with_confidence():
    small, large = wilson_interval(9, 24), wilson_interval(75, 200)
    assert large.high - large.low < small.high - small.low
    # the example: 9 of 24 is 37.5%, and its interval spans about 21% to 57%
    assert small.low == pytest.approx(0.212, abs=0.005) and small.high == pytest.approx(0.573, abs=0.005)
    wider = wilson_interval(9, 24, confidence=0.99)
    assert wider.low < small.low and wider.high > small.high
    assert z_value(0.95) == pytest.approx(1.959964, abs=1e-6)


def test_no_questions_and_bad_inputs():
    assert (wilson_interval(0, 0).low, wilson_interval(0, 0).high) == (0.0, 1.0)
    with pytest.raises(ValueError, match="successes must lie in 0..n"):
        wilson_interval(5, 4)
    with pytest.raises(ValueError, match="confidence must lie strictly between 0 and 1"):
        wilson_interval(1, 4, confidence=1.0)
    with pytest.raises(ValueError, match="same questions: got 3 and 2"):
        difference_interval([1, 0, 1], [1, 0])


def test_rates_get_wilson_and_graded_scores_the_bootstrap():
    assert mean_interval([1, 0, 1, 1]).method == "wilson"
    rng = random.Random(1)
    graded = [rng.random() for _ in range(400)]
    interval = mean_interval(graded)
    assert interval.method == "bootstrap"
    # a large sample: the percentile bootstrap agrees with mean ± 1.96 s/√n to within a few percent
    n, mean = len(graded), sum(graded) / len(graded)
    sd = math.sqrt(sum((x - mean) ** 2 for x in graded) / (n - 1))
    half = 1.96 * sd / math.sqrt(n)
    assert interval.low == pytest.approx(mean - half, abs=0.1 * half)
    assert interval.high == pytest.approx(mean + half, abs=0.1 * half)


def test_the_bootstrap_is_deterministic_and_seeded():
    rng = random.Random(2)
    scores = [rng.random() for _ in range(50)]
    assert mean_interval(scores) == mean_interval(scores)
    assert mean_interval(scores, seed=1) != mean_interval(scores, seed=2)


def test_retention_is_paired_over_the_same_questions():
    rng = random.Random(3)
    teacher = [float(rng.random() < 0.7) for _ in range(200)]
    # a student that answers exactly what the teacher answers keeps 100%, with no doubt at all,
    # although each model's own rate is uncertain by several points
    same = ratio_interval(teacher, teacher)
    assert (same.value, same.low, same.high) == (1.0, 1.0, 1.0)
    # one that misses a tenth of what the teacher gets: ~90%, the interval around it
    student = [t if i % 10 else 0.0 for i, t in enumerate(teacher)]
    kept = ratio_interval(student, teacher)
    assert kept.low < kept.value < kept.high and 0.8 < kept.low and kept.high < 0.97
    assert ratio_interval([0.0, 1.0], [0.0, 0.0]) is None  # a share of nothing is undefined


def test_a_clear_gain_excludes_zero_and_a_gain_within_the_noise_does_not():
    rng = random.Random(4)
    champion = [float(rng.random() < 0.5) for _ in range(200)]
    # a clear gain: right on 30 more questions, wrong on none it had right
    flipped = [i for i, c in enumerate(champion) if c == 0][:30]
    clear = [1.0 if i in flipped else c for i, c in enumerate(champion)]
    assert difference_interval(clear, champion).above(0)
    # within the noise: two more questions right overall, but 10 gained and 8 lost
    wrong = [i for i, c in enumerate(champion) if c == 0][:10]
    right = [i for i, c in enumerate(champion) if c == 1][:8]
    noisy = [1.0 if i in wrong else 0.0 if i in right else c for i, c in enumerate(champion)]
    gain = difference_interval(noisy, champion)
    assert gain.value == pytest.approx(2 / 200) and gain.low < 0 < gain.high and not gain.above(0)
