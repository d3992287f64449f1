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
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import re
import statistics
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mydistill import io
from mydistill.config.generation import mask_url, strip_userinfo
from mydistill.config.signal import SignalConfig
from mydistill.generation.openai_api import (
    MAX_RETRY_AFTER_S,
    RETRYABLE_STATUS,
    APIError,
    _error_detail,
    _run_sync,
    parse_retry_after,
)
from mydistill.signal.format import FORMAT_VERSION, example_key
from mydistill.signal.store import SignalStoreWriter, write_store_manifest
from mydistill.tokenization import IGNORE_INDEX, format_prompt, format_response, tokenize_example, tokenizer_sha256

logger = logging.getLogger(__name__)

PROGRESS_NAME = "progress.json"
# Scored at the start of every run to identify the model behind the URL; short, so it fits any context.
PROBE_TEXT = "The quick brown fox: sort dbcaf, 0 1 2 3."
PROBE_POSITIONS, PROBE_TOP = 16, 8  # positions of the probe, and entries per position, kept in the manifest


class ServedTeacherError(RuntimeError):
    """The served teacher cannot make this store; the message says why and what to do."""


class ProbeMismatch(ServedTeacherError):
    """The model behind the endpoint is not the one that began (or finished) this store."""


class RecordsRefused(ServedTeacherError):
    """Records whose served log-probs cannot be trusted (misaligned, too few, rejected); counted and named."""


class _Retryable(Exception):
    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class Scored:
    """What the server said about one prompt: the ids it read (None where it named none) and, per
    position, its listed next-token log-probs ``{token id: log-prob}`` (None: position 0, or none sent)."""

    token_ids: list[int | None] | None
    positions: list[dict[int, float] | None]
    model: str


# ----------------------------------------------------------------------------------------------
# the client


class CompletionsScorer:
    """Scores prompts on an OpenAI-compatible ``/completions`` endpoint: bounded concurrency, retries.

    ``tokenizer`` (the student's) maps token strings back to ids when the server names tokens by
    text (servers without vLLM's ``return_tokens_as_token_ids``); a string several ids decode to
    maps to none, and the record using it is refused as misaligned.
    """

    def __init__(self, cfg: SignalConfig, *, model: str | None = None, tokenizer: Any = None, transport: Any = None):
        assert cfg.api_base
        self.api_base = strip_userinfo(cfg.api_base.rstrip("/"))
        self.cfg = cfg
        self.model = model or cfg.api_model
        self.transport = transport  # an httpx transport, for tests
        self.__api_key = os.environ.get(cfg.api_key_env) or None
        self._piece_ids: dict[str, int | None] | None = None
        self.tokenizer = tokenizer

    def __repr__(self) -> str:  # never show the key
        return f"CompletionsScorer(api_base={mask_url(self.api_base)!r}, model={self.model!r})"

    def _redact(self, text: str) -> str:
        return text.replace(self.__api_key, "***") if self.__api_key else text

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.__api_key:
            headers["Authorization"] = f"Bearer {self.__api_key}"
        return headers

    def served_model(self) -> str:
        """``cfg.api_model``, checked against ``GET /models``; or the one model the server lists."""
        import httpx

        url = f"{self.api_base}/models"
        try:
            # (a test's httpx.MockTransport serves sync and async clients alike)
            with httpx.Client(headers=self._headers(), timeout=self.cfg.timeout_s, transport=self.transport) as client:
                response = client.get(url)
        except httpx.TransportError as e:
            raise APIError(f"{mask_url(url)} is unreachable ({type(e).__name__}: {e}); is the teacher server running?") from None
        self._fatal(response, url)
        if response.status_code != 200:
            raise APIError(f"{mask_url(url)} answered HTTP {response.status_code} ({self._redact(_error_detail(response))})")
        names = [m.get("id") for m in (response.json().get("data") or []) if isinstance(m, dict)]
        if self.cfg.api_model:
            if names and self.cfg.api_model not in names:
                raise APIError(f"{mask_url(self.api_base)} does not serve signal.api_model {self.cfg.api_model!r}; it serves {names}")
            self.model = self.cfg.api_model
        elif len(names) == 1:
            self.model = names[0]
        else:
            raise APIError(f"{mask_url(self.api_base)} serves {names or 'no models'}; name one as signal.api_model")
        return self.model

    # ------------------------------------------------------------------------------------------

    def score(
        self, prompts: Sequence[str | list[int]], *, add_special_tokens: bool, temperature: float
    ) -> list[Scored | str]:
        """One :class:`Scored` per prompt, or the reason (a string) the server refused that prompt."""
        return _run_sync(self._score_all(list(prompts), add_special_tokens, temperature))

    async def _score_all(self, prompts: list[str | list[int]], add_special_tokens: bool, temperature: float) -> list[Any]:
        import httpx

        size = self.cfg.api_batch_size
        batches = [prompts[i : i + size] for i in range(0, len(prompts), size)]
        semaphore = asyncio.Semaphore(self.cfg.concurrency)
        limits = httpx.Limits(max_connections=self.cfg.concurrency, max_keepalive_connections=self.cfg.concurrency)
        async with httpx.AsyncClient(
            headers=self._headers(), timeout=httpx.Timeout(self.cfg.timeout_s), limits=limits, transport=self.transport
        ) as client:

            async def one(batch: list[str | list[int]]) -> list[Any]:
                async with semaphore:
                    return await self._request(client, batch, add_special_tokens, temperature)

            tasks = [asyncio.ensure_future(one(b)) for b in batches]
            try:
                results = await asyncio.gather(*tasks)
            except BaseException:
                for task in tasks:  # the first fatal error stops the shard
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise
        return [r for batch in results for r in batch]

    def _body(self, batch: list[str | list[int]], add_special_tokens: bool, temperature: float) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "prompt": batch[0] if len(batch) == 1 else batch,
            "max_tokens": 1,  # vLLM refuses 0; the one generated token is dropped
            "temperature": temperature,
            "add_special_tokens": add_special_tokens,  # vLLM extension: the client's ids decide specials
        }
        if self.cfg.logprobs_mode == "echo":
            body.update(echo=True, logprobs=self.cfg.k, return_tokens_as_token_ids=True)
        else:
            body.update(prompt_logprobs=self.cfg.k, return_token_ids=True)
        return body

    async def _request(self, client: Any, batch: list[str | list[int]], add_special_tokens: bool, temperature: float) -> list[Any]:
        import httpx
        from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential, wait_random

        backoff = wait_exponential(multiplier=self.cfg.backoff_s, max=60.0) + wait_random(0, self.cfg.backoff_s)

        def wait(state: Any) -> float:
            error = state.outcome.exception()
            if isinstance(error, _Retryable) and error.retry_after is not None:
                return min(error.retry_after, MAX_RETRY_AFTER_S)
            return backoff(state)

        url = f"{self.api_base}/completions"
        body = self._body(batch, add_special_tokens, temperature)
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.cfg.max_retries + 1),
            wait=wait,
            retry=retry_if_exception_type((_Retryable, httpx.TransportError)),
            before_sleep=lambda s: logger.warning(
                "scoring request failed (%s); retry %d/%d", self._redact(str(s.outcome.exception())),
                s.attempt_number, self.cfg.max_retries,
            ),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    response = await client.post(url, json=body)
                    return self._parse(response, url, len(batch))
        except (_Retryable, httpx.TransportError) as e:
            raise APIError(
                f"{mask_url(url)} failed after {self.cfg.max_retries + 1} attempts ({self._redact(f'{type(e).__name__}: {e}')}). "
                "Is the server running and reachable? Shards written so far are kept; re-run to resume."
            ) from None
        raise AssertionError("unreachable")  # pragma: no cover

    def _fatal(self, response: Any, url: str) -> None:
        status = response.status_code
        if status in (401, 403):
            state = "is set" if self.__api_key else "is NOT set"
            raise APIError(
                f"{mask_url(url)} refused the request with HTTP {status} ({self._redact(_error_detail(response))}). "
                f"Check the API key in the environment variable {self.cfg.api_key_env} (it {state})."
            )
        if status in (404, 405):
            raise APIError(
                f"{mask_url(url)} answered HTTP {status} ({self._redact(_error_detail(response))}). Check signal.api_base "
                f"(it should end with the API version, e.g. /v1; the server must offer /completions) and the model {self.model!r}."
            )

    def _parse(self, response: Any, url: str, n: int) -> list[Scored | str]:
        status = response.status_code
        if status in RETRYABLE_STATUS:
            raise _Retryable(f"HTTP {status}: {self._redact(_error_detail(response))}", parse_retry_after(response.headers.get("retry-after")))
        self._fatal(response, url)
        if 400 <= status < 500:  # about these prompts (too long, too many log-probs asked): refused, named
            return [f"HTTP {status}: {self._redact(_error_detail(response))}"] * n
        if status != 200:
            raise APIError(f"{mask_url(url)} answered HTTP {status} ({self._redact(_error_detail(response))})")
        try:
            data = response.json()
            choices = sorted(data["choices"], key=lambda c: c.get("index", 0))
            model = str(data.get("model") or self.model)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise _Retryable(f"malformed response ({type(e).__name__}: {e})") from None
        if len(choices) != n:
            raise ServedTeacherError(f"{mask_url(url)} answered {len(choices)} choices for {n} prompts")
        return [self._choice(c, model) for c in choices]

    def _choice(self, choice: dict[str, Any], model: str) -> Scored | str:
        if self.cfg.logprobs_mode == "prompt_logprobs":
            entries = choice.get("prompt_logprobs")
            if not isinstance(entries, list):
                return "no log-probs in the answer (prompt_logprobs missing: does the server support vLLM's prompt_logprobs?)"
            positions = [
                None if not isinstance(e, dict) else {int(t): float(v["logprob"] if isinstance(v, dict) else v) for t, v in e.items()}
                for e in entries
            ]
            ids = choice.get("prompt_token_ids")
            return Scored([int(t) for t in ids] if isinstance(ids, list) else None, positions, model)
        logprobs = choice.get("logprobs")
        if not isinstance(logprobs, dict) or not isinstance(logprobs.get("top_logprobs"), list):
            return "no log-probs in the answer (logprobs missing: does the server support echo with logprobs?)"
        tokens = [self._token_id(t) for t in logprobs.get("tokens") or []]
        positions = [
            None if not isinstance(e, dict) else {i: float(v) for t, v in e.items() if (i := self._token_id(t)) is not None}
            for e in logprobs["top_logprobs"]
        ]
        return Scored(tokens, positions, model)

    def _token_id(self, name: str) -> int | None:
        """A token named ``token_id:N`` (vLLM's return_tokens_as_token_ids) or by its text."""
        if name.startswith("token_id:"):
            return int(name.split(":", 1)[1])
        if self.tokenizer is None:
            return None
        if self._piece_ids is None:
            table: dict[str, int | None] = {}
            for i in range(len(self.tokenizer)):
                piece = self.tokenizer.decode([i])
                table[piece] = None if piece in table else i  # ambiguous text names no id
            self._piece_ids = table
        return self._piece_ids.get(name)


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


# ----------------------------------------------------------------------------------------------
# the probe


def probe_teacher(scorer: CompletionsScorer, temperature: float) -> dict[str, Any]:
    """The served teacher's fingerprint: model name and top-k log-probs on :data:`PROBE_TEXT`, and the
    temperature the server applies to the log-probs it returns (1: raw, or the requested one)."""
    raw = _probe_once(scorer, 1.0)
    applied = 1.0
    if not math.isclose(temperature, 1.0):
        tempered = _probe_once(scorer, temperature)
        applied = _applied_temperature(raw, tempered, temperature)
    positions = [
        None if p is None else sorted(([t, round(v, 5)] for t, v in p.items()), key=lambda tv: -tv[1])[:PROBE_TOP]
        for p in raw.positions[: PROBE_POSITIONS + 1]
    ]
    return {"model": raw.model, "token_ids": raw.token_ids, "top_logprobs": positions, "temperature_applied": applied}


def _probe_once(scorer: CompletionsScorer, temperature: float) -> Scored:
    (answer,) = scorer.score([PROBE_TEXT], add_special_tokens=True, temperature=temperature)
    no_logprobs = ServedTeacherError(
        f"{mask_url(scorer.api_base)} returned no log-probs for the prompt's tokens with "
        f"signal.logprobs_mode: {scorer.cfg.logprobs_mode}; the server must support "
        + ("echo with logprobs" if scorer.cfg.logprobs_mode == "echo" else "vLLM's prompt_logprobs")
        + " (try the other logprobs_mode)"
    )
    if isinstance(answer, str) and answer.startswith("no log-probs"):
        raise no_logprobs
    if isinstance(answer, str):
        hint = ""
        if answer.startswith("HTTP 4") and "logprobs" in answer:
            cap = re.search(r"max(?:imum)? allowed:? (\d+)", answer)
            hint = (
                f" The server caps log-probs per position below signal.k = {scorer.cfg.k}: start vLLM with "
                f"--max-logprobs {scorer.cfg.k} (its default is 20), or set signal.k to at most "
                f"{cap.group(1) if cap else 'its cap'}."
            )
        raise ServedTeacherError(f"{mask_url(scorer.api_base)}: the probe request was refused: {answer}.{hint}")
    listed = [p for p in answer.positions[1:] if p is not None]
    if not listed:
        raise no_logprobs
    fewest = min(len(p) for p in listed)
    if fewest < scorer.cfg.k:
        raise ServedTeacherError(
            f"{mask_url(scorer.api_base)} returned only {fewest} log-probs per position, signal.k is {scorer.cfg.k}; "
            f"raise the server's cap (vLLM: --max-logprobs {scorer.cfg.k}) or set signal.k: {fewest}"
        )
    return answer


def _applied_temperature(raw: Scored, tempered: Scored, requested: float) -> float:
    """1 if the tempered answer equals the raw one, ``requested`` if its log-prob gaps shrank by that factor."""
    ratios = []
    for a, b in zip(raw.positions[1:], tempered.positions[1:]):
        if not a or not b:
            continue
        best = max(a, key=a.get)
        for t in set(a) & set(b):
            gap_raw, gap_tempered = a[best] - a[t], b.get(best, math.nan) - b[t]
            if gap_raw > 1e-3 and gap_tempered > 1e-6:
                ratios.append(gap_raw / gap_tempered)
    if not ratios:
        return 1.0
    ratio = statistics.median(ratios)
    for candidate in (1.0, requested):
        if abs(ratio - candidate) <= 0.02 * candidate:
            return candidate
    raise ServedTeacherError(
        f"the server's log-probs at temperature {requested} relate to those at 1 as temperature {ratio:.3f}, "
        f"neither 1 (raw log-probs) nor {requested}: it processes log-probs in a way this stage cannot store"
    )


def check_probe(recorded: dict[str, Any], now: dict[str, Any], *, where: str, tolerance: float) -> None:
    """Raise :class:`ProbeMismatch` unless ``now`` is the same model as ``recorded``."""
    problems = []
    if recorded.get("model") != now.get("model"):
        problems.append(f"the server reports model {now.get('model')!r}, the store was made with {recorded.get('model')!r}")
    if recorded.get("temperature_applied") != now.get("temperature_applied"):
        problems.append(
            f"the server now applies temperature {now.get('temperature_applied')} to log-probs, "
            f"then {recorded.get('temperature_applied')}"
        )
    if recorded.get("token_ids") != now.get("token_ids"):
        problems.append("the probe text is tokenized differently")
    worst, unshared = 0.0, 0
    for a, b in zip(recorded.get("top_logprobs") or [], now.get("top_logprobs") or []):
        if not a or not b:
            continue
        b_lp = dict((t, v) for t, v in b)
        shared = [abs(v - b_lp[t]) for t, v in a if t in b_lp]
        unshared += len(shared) < len(a) // 2  # another model lists other tokens
        worst = max([worst, *shared])
    if unshared:
        problems.append(f"its top tokens on the probe text differ at {unshared} positions")
    if worst > tolerance:
        problems.append(
            f"its log-probs on the probe text moved by up to {worst:.3g} nats (tolerance signal.probe_tolerance = {tolerance})"
        )
    if problems:
        raise ProbeMismatch(
            f"{where}: the served teacher is not the model this store was "
            + ("made" if where.endswith("manifest.json") else "begun")
            + " with: "
            + "; ".join(problems)
            + ". If the model was swapped on purpose, delete the store folder (or change work_dir) to compute it anew "
            "from the new model; otherwise point signal.api_base back at the original model."
        )


# ----------------------------------------------------------------------------------------------
# the stage


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
    records = io.read_records(data_uri)
    for i, r in enumerate(records):
        if "prompt" not in r or "response" not in r:
            raise io.DataError(f"{data_uri}: record {i + 1} needs 'prompt' and 'response' fields (has {sorted(r)})")
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
    unique: dict[bytes, tuple[int, Any]] = {}  # key -> (first record number, tokenized example)
    for number, r in enumerate(records, start=1):
        key = example_key(r["prompt"], r["response"])
        if key not in unique:
            unique[key] = (number, tokenize_example(tokenizer, r["prompt"], r["response"], max_length))
    items = list(unique.items())
    shards = [items[i : i + cfg.api_shard_size] for i in range(0, len(items), cfg.api_shard_size)]

    progress_uri = io.join(output_uri, PROGRESS_NAME)
    inputs_sha = io.sha256_of(inputs)
    writer = SignalStoreWriter(output_uri, slots=cfg.k, shard_bytes=2**62)  # shards are cut by flush()
    committed: dict[int, dict[str, Any]] = {}
    progress = io.read_json(progress_uri) if io.exists(progress_uri) else None
    if progress and progress.get("inputs_sha256") == inputs_sha and progress.get("shard_size") == cfg.api_shard_size:
        check_probe(progress["probe"], probe, where=progress_uri, tolerance=cfg.probe_tolerance)
        committed = {int(n): s for n, s in progress["shards"].items()}
        logger.info("teacher signal: resuming %s, %d of %d shards already committed", output_uri, len(committed), len(shards))
    has_template = bool(getattr(tokenizer, "chat_template", None))
    refused: list[tuple[int, str, str]] = []  # (record number, prompt head, reason)
    order: list[dict[str, Any]] = []
    for number, shard in enumerate(shards):
        if number in committed:
            order.append(committed[number])
            continue
        prompts = [_prompt_of(records[first - 1], ex, tokenizer, cfg) for _, (first, ex) in shard]
        answers = scorer.score(prompts, add_special_tokens=not has_template, temperature=float(temperature))
        rows, bad = [], 0
        for (key, (first, ex)), answer in zip(shard, answers, strict=True):
            result = answer if isinstance(answer, str) else served_rows(answer, ex.input_ids, ex.labels, cfg.k)
            if isinstance(result, str):
                refused.append((first, records[first - 1]["prompt"][:40], result))
                bad += 1
            else:
                rows.append((key, result))
        if bad:  # a shard with a refused record is not committed: nothing shifted is ever stored
            continue
        shard_writer = SignalStoreWriter(output_uri, slots=cfg.k, shard_bytes=2**62, first_shard=number)
        for key, (ids, lps, res) in rows:
            shard_writer.add(key, ids, lps, res)
        entry = shard_writer.flush() or _empty_shard(number)
        committed[number] = entry
        order.append(entry)
        io.write_json(progress_uri, {"inputs_sha256": inputs_sha, "probe": probe, "shard_size": cfg.api_shard_size,
                                     "shards": {str(n): s for n, s in sorted(committed.items())}})
    if refused:
        reasons = Counter(reason.split(":", 1)[0] for _, _, reason in refused)
        named = "; ".join(f"record {n} ({head!r}): {reason}" for n, head, reason in refused[:5])
        raise RecordsRefused(
            f"{data_uri}: the served teacher's log-probs for {len(refused)} of {len(items)} distinct examples cannot be "
            f"stored ({', '.join(f'{c} {r}' for r, c in reasons.most_common())}), e.g. {named}. Nothing shifted was "
            f"stored; {len(committed)} of {len(shards)} shards are committed and a re-run asks only for the rest. "
            "Misaligned records: send token ids (signal.api_prompt: token_ids) or serve the student's tokenizer; "
            "too few log-probs: raise the server's --max-logprobs or lower signal.k."
        )
    writer.resume([s for s in order if s.get("examples")])
    written = writer.close()
    seconds = time.perf_counter() - start
    logger.info(
        "teacher signal (served %s): %d examples, %d tokens, %.1f bytes/token, %.1fs",
        model, written["counts"]["examples"], written["counts"]["tokens"], written["bytes_per_token"], seconds,
    )
    applied = probe["temperature_applied"]
    if not math.isclose(applied, temperature):
        logger.warning(
            "the server returns raw log-probs (temperature 1), the loss runs at %g: the store is written at 1 and the "
            "loss re-tempers its tail under the even-spread assumption; for a store exact at %g start vLLM with "
            "--logprobs-mode processed_logprobs", temperature, temperature,
        )
    manifest = write_store_manifest(
        output_uri,
        inputs=inputs,
        written=written,
        teacher={"id": model, "api_base": mask_url(scorer.api_base), "model": model, "probe": probe},
        backend="openai",
        logprobs_mode=cfg.logprobs_mode,
        tokenizer_sha256=tok_sha,
        data_sha256=data_sha,
        data_uri=data_uri,
        records=len(records),
        vocab_size=vocab_size,
        k=cfg.k,
        slots=cfg.k,
        mode="topk",
        sampled_tokens=0,
        temperature=applied,  # what the stored log-probs are at
        requested_temperature=float(temperature),
        max_length=max_length,
        seconds=seconds,
    )
    io.remove(progress_uri)
    return manifest


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
