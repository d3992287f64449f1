"""The store's byte format: Rice-coded ids, companded log-probs, blocks, keys."""

import math

import numpy as np
import pytest

from mydistill.signal.format import (
    MAX_NEGLOG,
    ZERO_MASS_CODE,
    StoreFormatError,
    decode_block,
    decode_log_probs,
    encode_block,
    encode_log_probs,
    example_key,
    rice_decode,
    rice_encode,
)


@pytest.mark.parametrize("b", [0, 1, 3, 7, 12])
def test_rice_code_round_trips(b):
    rng = np.random.default_rng(b)
    values = rng.geometric(1 / (2**b + 1), size=997) - 1
    values[:3] = [0, 2**b, 5 * 2**b + 1]
    remainders, unary = rice_encode(values, b)
    assert np.array_equal(rice_decode(remainders, unary, len(values), b), values)


def test_rice_decode_of_a_truncated_stream_is_an_error():
    remainders, unary = rice_encode(np.array([40, 50, 60]), 0)
    with pytest.raises(StoreFormatError, match="corrupt block"):
        rice_decode(remainders, unary[:2], 3, 0)


def test_log_prob_codes_are_accurate_where_the_mass_is():
    lp = np.linspace(-MAX_NEGLOG, 0.0, 10001)
    back = decode_log_probs(encode_log_probs(lp)).astype(np.float64)
    step = math.sqrt(MAX_NEGLOG) / 254
    # |error in log p| <= step * sqrt(-log p) + step² / 4 (half a step in sqrt space)
    assert np.all(np.abs(back - lp) <= step * np.sqrt(-lp) + step**2)
    p = np.exp(lp)
    rel = np.abs(np.exp(back) - p) / p
    assert rel[p > 0.4].max() < 0.025 and rel[p > 0.85].max() < 0.01
    # what a divergence feels: the absolute error in probability, p * |error in log p|, stays ~1 %
    assert np.max(p * np.abs(back - lp)) < 0.011
    assert decode_log_probs(encode_log_probs(np.array([0.0])))[0] == 0.0


def test_zero_mass_and_very_small_log_probs():
    codes = encode_log_probs(np.array([-np.inf, -1e4, -MAX_NEGLOG]))
    assert codes[0] == ZERO_MASS_CODE and codes[1] == codes[2] == ZERO_MASS_CODE - 1
    back = decode_log_probs(codes)
    assert back[0] == -np.inf and back[1] == pytest.approx(-MAX_NEGLOG, rel=1e-6)


@pytest.mark.parametrize("vocab", [300, 70_000, 200_000])
def test_block_round_trip(vocab):
    rng = np.random.default_rng(vocab)
    t, k = 13, 16
    ids = np.stack([rng.choice(vocab, k, replace=False) for _ in range(t)])
    probs = rng.dirichlet(np.full(k, 0.3), size=t) * 0.97
    lp = np.log(probs)
    lp[0, 3] = -np.inf  # a zero-mass slot (sampled stores have them)
    residual = rng.uniform(0, 0.05, size=t)
    residual[1] = 0.0
    block, b = encode_block(ids, lp, residual)
    ids2, lp2, res2 = decode_block(block, t, k, b)
    order = np.argsort(ids, axis=1)
    assert np.array_equal(ids2, np.take_along_axis(ids, order, axis=1))
    lp_sorted = np.take_along_axis(lp, order, axis=1)
    assert np.array_equal(np.isinf(lp2), np.isinf(lp_sorted))
    finite = np.isfinite(lp_sorted)
    assert np.allclose(np.exp(lp2[finite]), np.exp(lp_sorted[finite]), atol=0.01)
    assert np.allclose(res2, residual, rtol=2e-3, atol=1e-8) and res2[1] == 0.0


def test_ids_cost_far_less_than_plain_integers():
    rng = np.random.default_rng(0)
    t, k, vocab = 50, 64, 32_000
    ids = np.stack([rng.choice(vocab, k, replace=False) for _ in range(t)])
    block, _ = encode_block(ids, np.full((t, k), -5.0), np.full(t, 0.1))
    id_bytes = len(block) / t - 2 - k  # minus residual and log-prob codes
    # uint16 would be 2 * k = 128 bytes; Rice needs about log2(V / k) + 1.5 = 10.5 bits per id here
    assert id_bytes < 11 * k / 8


def test_empty_block():
    block, b = encode_block(np.zeros((0, 8), np.int64), np.zeros((0, 8)), np.zeros(0))
    ids, lp, res = decode_block(block, 0, 8, b)
    assert ids.shape == (0, 8) and lp.shape == (0, 8) and res.shape == (0,)


def test_duplicate_ids_are_refused():
    with pytest.raises(ValueError, match="distinct"):
        encode_block(np.array([[3, 3]]), np.array([[-1.0, -2.0]]), np.array([0.1]))


def test_example_key_is_content_based_and_unambiguous():
    assert example_key("ab", "c") == example_key("ab", "c")
    assert example_key("ab", "c") != example_key("a", "bc")
    assert len(example_key("p", "r")) == 16
