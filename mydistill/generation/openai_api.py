"""Teacher behind an OpenAI-compatible chat completions API (hosted, or a vLLM / TGI server).

Requests run concurrently (asyncio + httpx, at most ``concurrency`` in flight). Rate limits
(429), server errors (500, 502, 503, 504), timeouts and connection errors are retried with
exponential backoff and jitter; a ``Retry-After`` header from the server sets the delay instead.
Errors that retrying cannot fix stop the run with a message saying what to check (401/403: the
key, 404: the model or URL); errors that concern one prompt (400/413/422, e.g. a prompt over the
context length) mark that record 'failed' and the run goes on — unless every request of a shard
fails with the same error, which means the request itself is wrong, so the run stops.

The API key is read from the environment variable named by ``api_key_env`` when the backend is
built and goes only into the Authorization header: never into a config, record, manifest or log.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from mydistill.generation.base import (
    ChatFormatter,
    Completion,
    GenerationRequest,
    ProgressCallback,
    Sampling,
    TeacherBackend,
    stable_seed,
)
from mydistill.config.generation import mask_url, strip_userinfo

logger = logging.getLogger(__name__)

RETRYABLE_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})
# Longest Retry-After we honour; a server asking for more is waited on for this long per attempt.
MAX_RETRY_AFTER_S = 300.0


# A request that timed out is sent again with a longer timeout, up to this.
MAX_TIMEOUT_S = 600.0


class AdaptiveConcurrency:
    """How many requests may be in flight: additive increase, multiplicative decrease.

    Starts at ``maximum`` (``generate.concurrency``). Signs of an overloaded server (a timeout, a
    reset connection, HTTP 503, a 429 without Retry-After) halve the limit, down to 1; each run of ``2 x limit`` answers
    in a row raises it by one again, up to ``maximum``. A saturated server (a CPU-served teacher,
    a full listen backlog) thus slows the client down instead of failing the stage.
    """

    def __init__(self, maximum: int):
        self.maximum = self.limit = max(1, maximum)
        self.in_flight = 0
        self.lowest = self.limit
        self._answered = 0
        self._changed = asyncio.Condition()

    async def __aenter__(self) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.in_flight < self.limit)
            self.in_flight += 1

    async def __aexit__(self, *exc: Any) -> None:
        async with self._changed:
            self.in_flight -= 1
            self._changed.notify_all()

    def overloaded(self, reason: str) -> None:
        if self.limit > 1:
            self.limit = max(1, self.limit // 2)
            self.lowest = min(self.lowest, self.limit)
            logger.warning("server overloaded (%s): at most %d requests in flight now", reason, self.limit)
        self._answered = 0

    def answered(self) -> None:
        self._answered += 1
        if self.limit < self.maximum and self._answered >= 2 * self.limit:
            self.limit += 1
            self._answered = 0


class APIError(RuntimeError):
    """The API cannot serve the run (unreachable after retries, bad key, unknown model)."""


class _RetryableError(Exception):
    def __init__(self, message: str, retry_after: float | None = None, overload: bool = False):
        super().__init__(message)
        self.overload = overload  # the server asks for fewer requests at once
        self.retry_after = retry_after


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class OpenAIBackend(TeacherBackend):
    """Chat completions over HTTP; one request per (prompt, sample) so every sample has exact token counts.

    ``tokenizer`` (optional) is the teacher's tokenizer, when known: it lets the stage count and
    truncate overlong prompts before sending them. Without it the server formats the prompt and
    rejects one that is too long (the record is marked failed). ``transport`` replaces httpx's
    network transport (tests pass an ``httpx.MockTransport``).
    """

    name = "openai"

    def __init__(
        self,
        api_base: str,
        model: str,
        *,
        api_key_env: str = "OPENAI_API_KEY",
        concurrency: int = 8,
        timeout_s: float = 60.0,
        max_retries: int = 5,
        backoff_s: float = 1.0,
        max_tokens_param: str = "max_tokens",
        tokenizer: Any = None,
        transport: Any = None,
    ):
        # credentials in the URL would go out as Basic auth instead of the API key: the key alone is sent
        self.api_base = strip_userinfo(api_base.rstrip("/"))
        self.url = f"{self.api_base}/chat/completions"
        self.model = model
        self.api_key_env = api_key_env
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_tokens_param = max_tokens_param
        self.formatter = ChatFormatter(tokenizer) if tokenizer is not None else None
        self.transport = transport  # an httpx.AsyncBaseTransport, for tests (httpx.MockTransport)
        self.__api_key = os.environ.get(api_key_env) or None
        if self.__api_key is None:
            logger.info("environment variable %s is not set: requests go without an API key", api_key_env)

    def __repr__(self) -> str:  # never show the key
        return f"OpenAIBackend(api_base={mask_url(self.api_base)!r}, model={self.model!r})"

    def _redact(self, text: str) -> str:
        return text.replace(self.__api_key, "***") if self.__api_key else text

    # ------------------------------------------------------------------------------------------

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        sampling: Sampling,
        on_progress: ProgressCallback | None = None,
    ) -> list[list[Completion]]:
        results = _run_sync(self._generate_all(requests, sampling, on_progress))
        flat = [c for per_request in results for c in per_request]
        failed = [c for c in flat if c.extra.get("http_status")]
        if len(flat) >= 2 and len(failed) == len(flat) and len({c.error for c in failed}) == 1:
            raise APIError(
                f"every request to {mask_url(self.url)} was rejected with the same error: {failed[0].error}. "
                "Check the generate config (api_model, sampling parameters, api_max_tokens_param)."
            )
        return results

    async def _generate_all(
        self, requests: Sequence[GenerationRequest], sampling: Sampling, on_progress: ProgressCallback | None
    ) -> list[list[Completion]]:
        import httpx

        headers = {"Content-Type": "application/json"}
        if self.__api_key:
            headers["Authorization"] = f"Bearer {self.__api_key}"
        self.limiter = AdaptiveConcurrency(self.concurrency)
        self._timeout_now = self.timeout_s
        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        async with httpx.AsyncClient(
            headers=headers, timeout=httpx.Timeout(self.timeout_s), limits=limits, transport=self.transport
        ) as client:

            async def one(request: GenerationRequest, sample_index: int) -> Completion:
                completion = await self._request(client, request, sample_index, sampling)
                if on_progress:
                    on_progress(1)
                return completion

            tasks = [
                asyncio.ensure_future(one(request, sample_index))
                for request in requests
                for sample_index in request.sample_indices
            ]
            try:
                flat = await asyncio.gather(*tasks)
            except BaseException:
                # The first fatal error stops the shard: cancel what is still in flight.
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise
        out: list[list[Completion]] = []
        position = 0
        for request in requests:
            out.append(list(flat[position : position + len(request.sample_indices)]))
            position += len(request.sample_indices)
        return out

    def _body(self, request: GenerationRequest, sample_index: int, sampling: Sampling) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": "user", "content": request.prompt.message}],
            self.max_tokens_param: sampling.max_new_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "n": 1,
            # Per-sample seed: the n samples of a prompt differ, and a re-sent request is reproducible
            # where the server honours seeds.
            "seed": stable_seed(sampling.seed, request.prompt.key, sample_index),
        }
        if sampling.ignore_eos:
            body["ignore_eos"] = True  # vLLM extension, used by benchmarks only
        return body

    async def _request(
        self, client: Any, request: GenerationRequest, sample_index: int, sampling: Sampling
    ) -> Completion:
        import httpx
        from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential, wait_random

        # backoff_s, 2*backoff_s, 4*backoff_s ... (at most 60 s), plus up to backoff_s of jitter so that
        # many clients throttled together do not come back together.
        backoff = wait_exponential(multiplier=self.backoff_s, max=60.0) + wait_random(0, self.backoff_s)

        def wait(retry_state: Any) -> float:
            error = retry_state.outcome.exception()
            if isinstance(error, _RetryableError) and error.retry_after is not None:
                return min(error.retry_after, MAX_RETRY_AFTER_S)
            return backoff(retry_state)

        def log_retry(retry_state: Any) -> None:
            logger.warning(
                "request for %s failed (%s); retry %d/%d in %.1fs",
                request.prompt.key,
                self._redact(str(retry_state.outcome.exception())),
                retry_state.attempt_number,
                self.max_retries,
                retry_state.next_action.sleep if retry_state.next_action else 0.0,
            )

        body = self._body(request, sample_index, sampling)
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.max_retries + 1),
            wait=wait,
            retry=retry_if_exception_type((_RetryableError, httpx.TransportError)),
            before_sleep=log_retry,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    return await self._attempt(client, body, request)
        except (_RetryableError, httpx.TransportError) as e:
            reason = self._redact(f"{type(e).__name__}: {e}") if str(e) else type(e).__name__
            raise APIError(
                f"{mask_url(self.url)} failed after {self.max_retries + 1} attempts ({reason}). "
                "Is the server running and reachable? Shards written so far are kept; re-run to resume."
            ) from None
        raise AssertionError("unreachable")  # pragma: no cover

    async def _attempt(self, client: Any, body: dict[str, Any], request: GenerationRequest) -> Completion:
        """One request under the adaptive limit: overload signs lower the limit (and a timeout
        lengthens the next requests' timeout), answers raise it again."""
        import httpx

        async with self.limiter:
            try:
                response = await client.post(self.url, json=body, timeout=self._timeout_now)
                completion = self._completion(response, request)
            except httpx.TimeoutException:
                self._timeout_now = min(MAX_TIMEOUT_S, self._timeout_now * 2)
                self.limiter.overloaded(f"no answer within the timeout; next requests wait up to {self._timeout_now:.0f} s")
                raise
            except httpx.TransportError as e:
                self.limiter.overloaded(f"{type(e).__name__}")
                raise
            except _RetryableError as e:
                if e.overload:
                    self.limiter.overloaded(str(e)[:80])
                raise
        self.limiter.answered()
        return completion

    def _completion(self, response: Any, request: GenerationRequest) -> Completion:
        status = response.status_code
        if status == 200:
            try:
                data = response.json()
                choice = data["choices"][0]
                text = (choice.get("message") or {}).get("content") or ""
                finish = choice.get("finish_reason")
                usage = data.get("usage") or {}
            except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
                raise _RetryableError(f"malformed response ({type(e).__name__}: {e})") from None
            completion = Completion(
                text=text,
                finish_reason="stop",
                prompt_tokens=usage.get("prompt_tokens", request.prompt.num_tokens),
                completion_tokens=int(usage.get("completion_tokens") or 0),
            )
            if finish == "length":
                completion.finish_reason = "length"
            elif finish not in (None, "stop", "eos", "eos_token", "stop_sequence"):
                # e.g. content_filter: the text is not a real answer
                completion.finish_reason = "error"
                completion.error = f"finish_reason={finish}"
            return completion

        detail = self._redact(_error_detail(response))
        if status in RETRYABLE_STATUS:
            retry_after = parse_retry_after(response.headers.get("retry-after"))
            # a 429 that says when to come back is paced by its Retry-After; one that does not, or a 503, asks for less
            overload = status == 503 or (status == 429 and retry_after is None)
            raise _RetryableError(f"HTTP {status}: {detail}", retry_after, overload=overload)
        if status in (401, 403):
            key_state = "is set" if self.__api_key else "is NOT set"
            raise APIError(
                f"{mask_url(self.url)} refused the request with HTTP {status} ({detail}). "
                f"Check the API key in the environment variable {self.api_key_env} (it {key_state})."
            )
        if status in (404, 405):
            raise APIError(
                f"{mask_url(self.url)} answered HTTP {status} ({detail}). Check api_base (it should end with the "
                f"API version, e.g. /v1) and the model name {self.model!r}."
            )
        if 400 <= status < 500:
            return Completion(
                text="",
                finish_reason="error",
                prompt_tokens=request.prompt.num_tokens,
                error=f"HTTP {status}: {detail}",
                extra={"http_status": status},
            )
        raise APIError(f"{mask_url(self.url)} answered HTTP {status} ({detail})")


def _error_detail(response: Any, limit: int = 300) -> str:
    try:
        data = response.json()
        message = data.get("error", data) if isinstance(data, dict) else data
        if isinstance(message, dict):
            message = message.get("message", message)
        text = str(message)
    except ValueError:
        text = response.text
    text = " ".join(text.split())
    return text[:limit] + ("..." if len(text) > limit else "")


def _run_sync(coro: Any) -> Any:
    """Run ``coro`` to completion from sync code, also when an event loop is already running here."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()
