"""The on-disk format of a teacher-signal store: one block per example, shards, a per-shard index.

Per response token the store keeps ``K`` slots ``(token id, teacher log-prob)`` plus the teacher's
probability mass outside them (the *residual*). ``K = k`` for a top-k store and ``k + m`` for a
sampled (unbiased) one, see :mod:`mydistill.signal.sampling`. One example's tokens form a *block*::

    block = neglog_residual   float16 x T              -log(residual), +inf for residual 0
          | logprob_codes     uint8   x T*K            sqrt-companded -log p, 255 = zero mass
          | rice_remainders   ceil(T*K*b / 8) bytes    low b bits of each id gap, bit-packed
          | rice_unary        the rest                 high bits of each id gap, unary coded

Why these choices (bytes per token at k = 64 are the budget, see docs/teacher_signal.md):

* **Ids as Rice-coded gaps.** Within a token the K ids are sorted ascending (a top-k teacher's
  slots have no meaningful order; the loss accepts any) and stored as gaps
  ``g_0 = id_0, g_i = id_i - id_{i-1} - 1``. A Rice code with parameter b writes ``g >> b`` in
  unary and ``g & (2^b - 1)`` in b bits: close to the entropy of K ids drawn from V, about
  ``log2(V / K) + 1.5`` bits per id, against 16 or 32 for plain integers. The two parts are kept
  in separate streams so decoding is vectorised numpy (no bit-by-bit Python loop). ``b`` is
  chosen per block to minimise its size.
* **Log-probs as 8-bit sqrt-companded codes.** ``code = round(sqrt(-log p) / step)`` with
  ``step = sqrt(40) / 254``: the error in ``log p`` is at most ``0.025 * sqrt(-log p)`` nats, so the
  grid is finest where the mass is (under 1 % relative error for p > 0.85, 2.4 % at p = 0.4) and
  the absolute error in probability, ``p * |error in log p|``, never exceeds 0.011 (a uniform grid
  over the same range would allow 0.08). Log-probs below -40 are clamped to -40.
* **Residual as float16 of -log(residual)**, so a residual of 1e-30 keeps three digits.

The index of a shard is a numpy structured array (``INDEX_DTYPE``), one row per example, sorted
by key; a reader keeps the indexes in memory (~40 bytes per unique example) and reads blocks by
range (a memory map locally, ranged GETs on object stores).
"""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np

FORMAT_NAME = "mydistill-teacher-signal"
FORMAT_VERSION = 1

# log-prob codes
ZERO_MASS_CODE = 255
MAX_NEGLOG = 40.0
_CODE_MAX = 254
_STEP = math.sqrt(MAX_NEGLOG) / _CODE_MAX

INDEX_DTYPE = np.dtype(
    [
        ("key_hi", "<u8"),  # first 8 bytes of the example key (big-endian), the sort key
        ("key_lo", "<u8"),  # next 8 bytes
        ("offset", "<u8"),  # byte offset of the block in the shard
        ("nbytes", "<u4"),  # block size in bytes
        ("tokens", "<u4"),  # response tokens in the block (T)
        ("rice_b", "u1"),  # Rice parameter of the block's id gaps
    ]
)


class StoreFormatError(ValueError):
    """A store's bytes or manifest do not follow this format; the message names the file."""


# ----------------------------------------------------------------------------------------------
# keys


def example_key(prompt: str, response: str) -> bytes:
    """The 16-byte key of one training example: sha256 of its text, so upsampled copies share it.

    JSON-encoding the pair keeps ``("ab", "c")`` and ``("a", "bc")`` apart.
    """
    return hashlib.sha256(json.dumps([prompt, response], ensure_ascii=False).encode()).digest()[:16]


def key_parts(key: bytes) -> tuple[int, int]:
    """A 16-byte key as the (hi, lo) unsigned 64-bit pair stored in the index."""
    return int.from_bytes(key[:8], "big"), int.from_bytes(key[8:16], "big")


# ----------------------------------------------------------------------------------------------
# log-probs


def encode_log_probs(log_probs: np.ndarray) -> np.ndarray:
    """``uint8`` codes of log-probabilities (any shape); ``-inf`` (zero mass) gets :data:`ZERO_MASS_CODE`."""
    lp = np.asarray(log_probs, dtype=np.float64)
    zero = ~np.isfinite(lp) & (lp < 0)
    neg = np.clip(-np.nan_to_num(lp, neginf=-MAX_NEGLOG), 0.0, MAX_NEGLOG)
    codes = np.rint(np.sqrt(neg) / _STEP).astype(np.uint8)
    codes[zero] = ZERO_MASS_CODE
    return codes


def decode_log_probs(codes: np.ndarray) -> np.ndarray:
    """float32 log-probabilities of :func:`encode_log_probs` codes (``-inf`` for zero mass)."""
    table = -((np.arange(256, dtype=np.float64) * _STEP) ** 2)
    table[ZERO_MASS_CODE] = -np.inf
    return table.astype(np.float32)[codes]


# ----------------------------------------------------------------------------------------------
# Rice coding of non-negative integers


def best_rice_parameter(values: np.ndarray) -> int:
    """The b in [0, 31] that makes the Rice code of ``values`` shortest."""
    v = values.astype(np.uint64)
    n = v.size
    if n == 0:
        return 0
    best_b, best_bits = 0, None
    mean = float(v.mean())
    center = max(0, int(math.log2(mean + 1)))
    for b in range(max(0, center - 2), min(31, center + 2) + 1):
        bits = n * (b + 1) + int((v >> np.uint64(b)).sum())
        if best_bits is None or bits < best_bits:
            best_b, best_bits = b, bits
    return best_b


def rice_encode(values: np.ndarray, b: int) -> tuple[bytes, bytes]:
    """(remainder stream, unary stream) of the Rice code of non-negative integers with parameter b."""
    v = values.astype(np.int64).ravel()
    q = v >> b
    if b:
        shifts = np.arange(b - 1, -1, -1, dtype=np.int64)
        rem_bits = ((v[:, None] >> shifts) & 1).astype(np.uint8).ravel()
        remainders = np.packbits(rem_bits).tobytes()
    else:
        remainders = b""
    # q ones then a zero per value: the zeros sit at cumsum(q + 1) - 1
    unary_bits = np.ones(int(q.sum()) + v.size, dtype=np.uint8)
    unary_bits[np.cumsum(q + 1) - 1] = 0
    return remainders, np.packbits(unary_bits).tobytes()


def rice_decode(remainders: bytes | np.ndarray, unary: bytes | np.ndarray, n: int, b: int) -> np.ndarray:
    """The ``n`` integers (int64) of :func:`rice_encode` streams."""
    unary_bits = np.unpackbits(np.frombuffer(unary, dtype=np.uint8))
    ends = np.flatnonzero(unary_bits == 0)[:n]
    if ends.size != n:
        raise StoreFormatError(f"corrupt block: the id stream holds {ends.size} values, expected {n}")
    q = np.diff(ends, prepend=-1) - 1
    values = q.astype(np.int64) << b
    if b:
        rem_bits = np.unpackbits(np.frombuffer(remainders, dtype=np.uint8))[: n * b].reshape(n, b)
        values |= rem_bits.astype(np.int64) @ (1 << np.arange(b - 1, -1, -1, dtype=np.int64))
    return values


# ----------------------------------------------------------------------------------------------
# blocks


def encode_block(token_ids: np.ndarray, log_probs: np.ndarray, residual: np.ndarray) -> tuple[bytes, int]:
    """One example's signal as a block; returns (bytes, rice parameter b).

    Args:
        token_ids: ``(T, K)`` distinct ids per row, any order.
        log_probs: ``(T, K)`` the teacher's log-probs of those ids (``-inf``: zero mass).
        residual: ``(T,)`` probability mass outside the K slots.
    """
    ids = np.asarray(token_ids, dtype=np.int64)
    if ids.ndim != 2 or np.shape(log_probs) != ids.shape or np.shape(residual) != ids.shape[:1]:
        raise ValueError(
            f"encode_block needs ids (T, K), log_probs (T, K), residual (T,); got {ids.shape}, "
            f"{np.shape(log_probs)}, {np.shape(residual)}"
        )
    order = np.argsort(ids, axis=1, kind="stable")
    ids = np.take_along_axis(ids, order, axis=1)
    lps = np.take_along_axis(np.asarray(log_probs, dtype=np.float64), order, axis=1)
    gaps = np.diff(ids, axis=1, prepend=-1) - 1
    if ids.size and (gaps.min() < 0 or ids.min() < 0):
        raise ValueError("encode_block: token ids must be non-negative and distinct within each position")
    b = best_rice_parameter(gaps)
    remainders, unary = rice_encode(gaps, b)
    with np.errstate(divide="ignore"):
        neglog_res = (-np.log(np.clip(np.asarray(residual, dtype=np.float64), 0.0, 1.0))).astype(np.float16)
    parts = [neglog_res.astype("<f2").tobytes(), encode_log_probs(lps).tobytes(), remainders, unary]
    return b"".join(parts), b


def decode_block(block: bytes | np.ndarray, tokens: int, k: int, b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids ``(T, K)`` int64, log-probs ``(T, K)`` float32, residual ``(T,)`` float32) of a block."""
    buf = np.frombuffer(block, dtype=np.uint8)
    n = tokens * k
    res_end = 2 * tokens
    codes_end = res_end + n
    rem_end = codes_end + (n * b + 7) // 8
    if buf.size < rem_end:
        raise StoreFormatError(f"corrupt block: {buf.size} bytes, expected at least {rem_end} for {tokens} tokens")
    neglog_res = buf[:res_end].view("<f2").astype(np.float32)
    residual = np.exp(-neglog_res)
    log_probs = decode_log_probs(buf[res_end:codes_end]).reshape(tokens, k)
    gaps = rice_decode(buf[codes_end:rem_end], buf[rem_end:], n, b).reshape(tokens, k)
    ids = np.cumsum(gaps + 1, axis=1) - 1
    return ids, log_probs, residual.astype(np.float32)
