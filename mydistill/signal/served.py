"""The signal stage against a served teacher: an OpenAI-compatible completions endpoint scores the mix.

>>> manifest = compute_served_signal("runs/mix-…/train.jsonl", "student-or-teacher-tokenizer/", "runs/signal-…",
...                                  cfg=SignalConfig(backend="openai", api_base="http://teacher:8000/v1", k=20),
...                                  max_length=512, temperature=2.0)

Each distinct example is tokenized as the distill stage tokenizes it (the student's tokenizer,
:func:`~mydistill.tokenization.tokenize_example`) and sent whole as a completions *prompt* — as
text, or as those token ids (``signal.api_prompt``) — with either ``echo: true, logprobs: k``
(OpenAI's legacy scoring; ``return_tokens_as_token_ids`` asks vLLM to name tokens by id) or vLLM's
``prompt_logprobs: k``, and ``max_tokens: 1`` (vLLM refuses 0). The server's log-probs at position
j are its next-token distribution given tokens < j, so the response positions of the example are
exactly the store's rows; the tail mass outside the top k is kept as the residual
``1 - sum(exp(top))``, so every stored distribution sums to one.

Safety, record by record and run by run:

* **Alignment.** The tokens the server read must be the student's tokens, position by position;
  a record that differs (another tokenizer, an added BOS, a merge across the prompt/response
  boundary) or that lists fewer than k log-probs is *refused*: its shard is not committed, and after
  the pass the stage stops with the count per reason and the first records by number. A shifted
  target is never trained on, and a re-run asks only for the shards still missing.
* **Identity.** The teacher is the model name the server reports plus a *probe*: its top-k
  log-probs on a fixed text, recorded in the manifest (and in ``progress.json`` while the store is
  unfinished). A re-run or a resume re-probes and refuses a store begun by another model behind the
  same URL (:class:`ProbeMismatch`).
* **Temperature.** The probe is also scored at temperature 1 and at the store's temperature: equal
  answers mean the server returns raw log-probs (vLLM's default) and the store is written at
  T = 1 (the loss re-tempers it); answers tempered by T mean the server applied T (vLLM
  ``--logprobs-mode processed_logprobs``). Anything else is an error. The manifest records both.
* **Failures.** 429/5xx/timeouts are retried with backoff honouring Retry-After (as the generate
  stage's client does); 401/403/404 and retries exhausted stop the stage; other 4xx refuse the
  record. Shards are committed atomically and listed in ``progress.json``; the manifest, written
  last, is what makes the store visible, so a crash never leaves a store a reader would take.

The client is :mod:`mydistill.signal.served_client`, the probe :mod:`mydistill.signal.served_probe`.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from mydistill import io
from mydistill.config.generation import mask_url
from mydistill.config.signal import SignalConfig
from mydistill.progress import ProgressLog
from mydistill.signal.format import FORMAT_VERSION, example_key
from mydistill.signal.served_client import CompletionsScorer, Scored, ServedTeacherError
from mydistill.signal.served_probe import check_probe, probe_teacher
from mydistill.signal.store import SignalStoreWriter, read_signal_records, write_store_manifest
from mydistill.tokenization import IGNORE_INDEX, format_prompt, format_response, tokenize_example, tokenizer_sha256

logger = logging.getLogger(__name__)

PROGRESS_NAME = "progress.json"


class RecordsRefused(ServedTeacherError):
    """Records whose served log-probs cannot be trusted (misaligned, too few, rejected); counted and named."""


def compute_served_signal(
    data_uri: str,
    tokenizer_uri: str,
    output_uri: str,
    *,
    cfg: SignalConfig,
    max_length: int,
    temperature: float,
    tokenizer: Any = None,
    vocab_size: int | None = None,
    transport: Any = None,
) -> dict[str, Any]:
    """Write the top-k store for the records at ``data_uri`` from the served teacher; returns its manifest.

    ``tokenizer_uri`` holds the student's tokenizer (and, for the vocabulary size, a ``config.json``;
    otherwise ``len(tokenizer)``). ``temperature`` is the distill loss's: the store is asked at it and
    written at whatever the server applies (1 or it). A finished store with the same inputs is
    reused once the probe shows the same model; a partial one is resumed.
    """
    from mydistill.models import load_tokenizer

    if cfg.backend != "openai":
        raise ValueError(f"compute_served_signal needs signal.backend: openai, got {cfg.backend!r}")
    if cfg.mode == "sampled":
        raise ValueError("a served teacher lists only its top-k log-probs: signal.mode must be topk")
    records = read_signal_records(data_uri)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(tokenizer_uri)
    vocab_size = vocab_size or _vocab_size(tokenizer_uri, tokenizer)
    if cfg.k > vocab_size:
        raise ValueError(f"signal.k = {cfg.k} exceeds the vocabulary ({vocab_size} tokens)")
    data_sha, tok_sha = io.records_sha256(records), tokenizer_sha256(tokenizer)

    scorer = CompletionsScorer(cfg, tokenizer=tokenizer, transport=transport)
    model = scorer.served_model()
    inputs = {
        "backend": "openai", "api_base": mask_url(scorer.api_base), "api_model": model, "data_sha256": data_sha,
        "tokenizer_sha256": tok_sha, "max_length": max_length, "format_version": FORMAT_VERSION, "k": cfg.k,
        "mode": "topk", "temperature": float(temperature), "api_prompt": cfg.api_prompt,
    }
    probe = probe_teacher(scorer, float(temperature))
    done = io.manifest_matches(output_uri, inputs)
    if done:
        check_probe(done["teacher"]["probe"], probe, where=io.join(output_uri, io.MANIFEST_NAME), tolerance=cfg.probe_tolerance)
        return done

    start = time.perf_counter()
    shards = _score_shards(
        scorer, records, tokenizer, output_uri, data_uri=data_uri, inputs=inputs, probe=probe, max_length=max_length,
        temperature=float(temperature),
    )
    writer = SignalStoreWriter(output_uri, slots=cfg.k, shard_bytes=2**62)
    writer.resume([s for s in shards if s.get("examples")])
    written = writer.close()
    seconds = time.perf_counter() - start
    logger.info(
        "teacher signal (served %s): %d examples, %d tokens, %.1f bytes/token, %.1fs",
        model, written["counts"]["examples"], written["counts"]["tokens"], written["bytes_per_token"], seconds,
    )
    applied = probe["temperature_applied"]
    if not math.isclose(applied, temperature):
        _warn_raw_logprobs(temperature)
    manifest = write_store_manifest(
        output_uri, inputs=inputs, written=written,
        teacher={"id": model, "api_base": mask_url(scorer.api_base), "model": model, "probe": probe},
        backend="openai", logprobs_mode=cfg.logprobs_mode, tokenizer_sha256=tok_sha, data_sha256=data_sha, data_uri=data_uri,
        records=len(records), vocab_size=vocab_size, k=cfg.k, slots=cfg.k, mode="topk", sampled_tokens=0,
        temperature=applied,  # what the stored log-probs are at
        requested_temperature=float(temperature), max_length=max_length, seconds=seconds,
    )
    io.remove(io.join(output_uri, PROGRESS_NAME))
    return manifest


def _score_shards(
    scorer: CompletionsScorer, records: list[dict[str, Any]], tokenizer: Any, output_uri: str, *,
    data_uri: str, inputs: dict[str, Any], probe: dict[str, Any], max_length: int, temperature: float,
) -> list[dict[str, Any]]:
    """Score the distinct examples shard by shard and commit each shard whose records all align; returns
    the store's shards in order. Shards an interrupted run committed are kept; after the pass, any
    refused record raises :class:`RecordsRefused`."""
    cfg = scorer.cfg
    unique: dict[bytes, tuple[int, Any]] = {}  # key -> (first record number, tokenized example)
    for number, r in enumerate(records, start=1):
        key = example_key(r["prompt"], r["response"])
        if key not in unique:
            unique[key] = (number, tokenize_example(tokenizer, r["prompt"], r["response"], max_length))
    items = list(unique.items())
    shards = [items[i : i + cfg.api_shard_size] for i in range(0, len(items), cfg.api_shard_size)]

    progress_uri = io.join(output_uri, PROGRESS_NAME)
    inputs_sha = io.sha256_of(inputs)
    committed = _committed_before(output_uri, inputs_sha, probe, cfg, len(shards))
    has_template = bool(getattr(tokenizer, "chat_template", None))
    refused: list[tuple[int, str, str]] = []  # (record number, prompt head, reason)
    order: list[dict[str, Any]] = []
    report = ProgressLog("signal", len(items), logger, unit="examples",
                         start=sum(len(shard) for number, shard in enumerate(shards) if number in committed))
    for number, shard in enumerate(shards):
        if number in committed:
            order.append(committed[number])
            continue
        rows, bad = _score_shard(scorer, records, shard, tokenizer, add_special_tokens=not has_template, temperature=temperature)
        refused += bad
        report(len(shard))
        if bad:  # a shard with a refused record is not committed: nothing shifted is ever stored
            continue
        entry = _commit_shard(output_uri, number, rows, cfg.k)
        committed[number] = entry
        order.append(entry)
        io.write_json(progress_uri, {"inputs_sha256": inputs_sha, "probe": probe, "shard_size": cfg.api_shard_size,
                                     "shards": {str(n): s for n, s in sorted(committed.items())}})
    if refused:
        raise _records_refused(data_uri, refused, examples=len(items), committed=len(committed), shards=len(shards))
    return order


def _committed_before(
    output_uri: str, inputs_sha: str, probe: dict[str, Any], cfg: SignalConfig, shards: int
) -> dict[int, dict[str, Any]]:
    """The shards an interrupted run for the same inputs committed, by number, once the probe shows the
    same teacher (:class:`~mydistill.signal.served_probe.ProbeMismatch` otherwise)."""
    progress_uri = io.join(output_uri, PROGRESS_NAME)
    progress = io.read_json(progress_uri) if io.exists(progress_uri) else None
    if not (progress and progress.get("inputs_sha256") == inputs_sha and progress.get("shard_size") == cfg.api_shard_size):
        return {}
    check_probe(progress["probe"], probe, where=progress_uri, tolerance=cfg.probe_tolerance)
    committed = {int(n): s for n, s in progress["shards"].items()}
    logger.info("teacher signal: resuming %s, %d of %d shards already committed", output_uri, len(committed), shards)
    return committed


def _score_shard(
    scorer: CompletionsScorer,
    records: list[dict[str, Any]],
    shard: list[tuple[bytes, tuple[int, Any]]],
    tokenizer: Any,
    *,
    add_special_tokens: bool,
    temperature: float,
) -> tuple[list[tuple[bytes, Any]], list[tuple[int, str, str]]]:
    """The store's rows for one shard of ``(key, (first record number, example))``, and its refused records."""
    prompts = [_prompt_of(records[first - 1], ex, tokenizer, scorer.cfg) for _, (first, ex) in shard]
    answers = scorer.score(prompts, add_special_tokens=add_special_tokens, temperature=temperature)
    rows, refused = [], []
    for (key, (first, ex)), answer in zip(shard, answers, strict=True):
        result = answer if isinstance(answer, str) else served_rows(answer, ex.input_ids, ex.labels, scorer.cfg.k)
        if isinstance(result, str):
            refused.append((first, records[first - 1]["prompt"][:40], result))
        else:
            rows.append((key, result))
    return rows, refused


def _commit_shard(output_uri: str, number: int, rows: list[tuple[bytes, Any]], k: int) -> dict[str, Any]:
    """Write shard ``number`` of the store (shards keep their numbers whatever order they are made in)."""
    shard_writer = SignalStoreWriter(output_uri, slots=k, shard_bytes=2**62, first_shard=number)
    for key, (ids, lps, res) in rows:
        shard_writer.add(key, ids, lps, res)
    return shard_writer.flush() or _empty_shard(number)


def _warn_raw_logprobs(temperature: float) -> None:
    logger.warning(
        "the server returns raw log-probs (temperature 1), the loss runs at %g: the store is written at 1 and the "
        "loss re-tempers its tail under the even-spread assumption; for a store exact at %g start vLLM with "
        "--logprobs-mode processed_logprobs", temperature, temperature,
    )


def _records_refused(data_uri: str, refused: list[tuple[int, str, str]], *, examples: int, committed: int, shards: int) -> RecordsRefused:
    reasons = Counter(reason.split(":", 1)[0] for _, _, reason in refused)
    named = "; ".join(f"record {n} ({head!r}): {reason}" for n, head, reason in refused[:5])
    return RecordsRefused(
        f"{data_uri}: the served teacher's log-probs for {len(refused)} of {examples} distinct examples cannot be "
        f"stored ({', '.join(f'{c} {r}' for r, c in reasons.most_common())}), e.g. {named}. Nothing shifted was "
        f"stored; {committed} of {shards} shards are committed and a re-run asks only for the rest. "
        "Misaligned records: send token ids (signal.api_prompt: token_ids) or serve the student's tokenizer; "
        "too few log-probs: raise the server's --max-logprobs or lower signal.k."
    )


# ----------------------------------------------------------------------------------------------
# alignment: the server's answer for one example -> the store's rows


def served_rows(
    scored: Scored, input_ids: Sequence[int], labels: Sequence[int], k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | str:
    """(ids (T, k), log-probs (T, k), residual (T,)) for the response tokens of one example, or why not.

    ``input_ids`` / ``labels`` are the student's tokenization (labels ``IGNORE_INDEX`` on the prompt).
    The server must have read exactly ``input_ids`` (then at most the one generated token).
    """
    n = len(input_ids)
    if scored.token_ids is not None:
        read = scored.token_ids
        if len(read) < n or len(read) > n + 1 or list(read[:n]) != list(input_ids):
            first = next((i for i, (a, b) in enumerate(zip(read, input_ids)) if a != b), min(len(read), n))
            return (
                f"misaligned: the server read {len(read)} tokens, the student's tokenizer makes {n}; first difference at "
                f"position {first} (server {read[first] if first < len(read) else None}, student "
                f"{input_ids[first] if first < n else None})"
            )
    if len(scored.positions) < n:
        return f"misaligned: log-probs for {len(scored.positions)} positions, the example has {n} tokens"
    rows = [j for j in range(1, n) if labels[j] != IGNORE_INDEX]  # the row predicting token j
    ids = np.zeros((len(rows), k), dtype=np.int64)
    lps = np.zeros((len(rows), k), dtype=np.float64)
    for r, j in enumerate(rows):
        entry = scored.positions[j]
        if not entry:
            return f"no log-probs at position {j}"
        if scored.token_ids is None and input_ids[j] not in entry:
            # without the ids the server read, its own token (always listed by vLLM) is the check
            return f"misaligned: position {j} does not list the student's token {input_ids[j]}"
        if len(entry) < k:
            return f"fewer than k log-probs: {len(entry)} at position {j}, k = {k}"
        top = sorted(entry.items(), key=lambda kv: -kv[1])[:k]
        ids[r] = [t for t, _ in top]
        lps[r] = [v for _, v in top]
    # the tail mass outside the k listed: 1 - sum(p), as -expm1(logsumexp) for precision when it is tiny
    peak = lps.max(axis=1, keepdims=True) if len(rows) else np.zeros((0, 1))
    total = peak[:, 0] + np.log(np.exp(lps - peak).sum(axis=1)) if len(rows) else np.zeros(0)
    residual = np.clip(-np.expm1(np.minimum(total, 0.0)), 0.0, 1.0)
    return ids, lps.astype(np.float32), residual.astype(np.float32)

def _prompt_of(record: dict[str, Any], ex: Any, tokenizer: Any, cfg: SignalConfig) -> str | list[int]:
    if cfg.api_prompt == "token_ids":
        return list(ex.input_ids)
    # the whole text; a truncated example is checked on its first len(input_ids) tokens
    return format_prompt(tokenizer, record["prompt"]) + format_response(tokenizer, record["prompt"], record["response"])


def _empty_shard(number: int) -> dict[str, Any]:
    return {"number": number, "examples": 0, "tokens": 0, "bytes": 0}


def _vocab_size(tokenizer_uri: str, tokenizer: Any) -> int:
    config_uri = io.join(tokenizer_uri, "config.json")
    if io.exists(config_uri):
        config = io.read_json(config_uri)
        size = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
        if size:
            return int(size)
    return len(tokenizer)
