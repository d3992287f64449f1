"""The signal stage's client for a served teacher: scores prompts on an OpenAI-compatible ``/completions``
endpoint with bounded concurrency and retries (see :mod:`mydistill.signal.served` for the stage).

429/5xx/timeouts are retried with backoff honouring Retry-After (as the generate stage's client
does); 401/403/404 and retries exhausted raise :class:`~mydistill.generation.openai_api.APIError`;
other 4xx refuse the prompts of that request (the reason comes back in place of the answer).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

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

logger = logging.getLogger(__name__)


class ServedTeacherError(RuntimeError):
    """The served teacher cannot make this store; the message says why and what to do."""


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
