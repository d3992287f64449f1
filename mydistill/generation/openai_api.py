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
import logging
from collections.abc import Awaitable, Callable, Sequence
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
from mydistill.config.generation import mask_url
from mydistill.openai_client import (  # noqa: F401 (APIError and parse_retry_after are imported from here too)
    APIError,
    OpenAIClient,
    RetryableError,
    error_detail,
    parse_retry_after,
    run_sync,
)

logger = logging.getLogger(__name__)

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
        self.client = OpenAIClient(
            api_base, api_key_env=api_key_env, timeout_s=timeout_s, max_retries=max_retries, backoff_s=backoff_s,
            setting="api_base", model=model, transport=transport,
        )
        self.api_base = self.client.api_base
        self.url = self.client.url("chat/completions")
        self.model = model
        self.concurrency = concurrency
        self.timeout_s = timeout_s  # the first attempt's; a timeout doubles it for later ones
        self.max_tokens_param = max_tokens_param
        self.formatter = ChatFormatter(tokenizer) if tokenizer is not None else None
        if not self.client.has_key:
            logger.info("environment variable %s is not set: requests go without an API key", api_key_env)

    def __repr__(self) -> str:  # never show the key
        return f"OpenAIBackend(api_base={mask_url(self.api_base)!r}, model={self.model!r})"

    # ------------------------------------------------------------------------------------------

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        sampling: Sampling,
        on_progress: ProgressCallback | None = None,
    ) -> list[list[Completion]]:
        results = run_sync(self._generate_all(requests, sampling, on_progress))
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
        self.limiter = AdaptiveConcurrency(self.concurrency)
        self._timeout_now = self.timeout_s
        async with self.client.async_client(self.concurrency) as client:

            async def one(request: GenerationRequest, sample_index: int) -> Completion:
                completion = await self.client.post(
                    client, "chat/completions", self._body(request, sample_index, sampling),
                    lambda response: self._completion(response, request),
                    label=f"request for {request.prompt.key}", timeout=lambda: self._timeout_now, around=self._attempt,
                )
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

    async def _attempt(self, once: Callable[[], Awaitable[Completion]]) -> Completion:
        """One request under the adaptive limit: overload signs lower the limit (and a timeout
        lengthens the next requests' timeout), answers raise it again."""
        import httpx

        async with self.limiter:
            try:
                completion = await once()
            except httpx.TimeoutException:
                self._timeout_now = min(MAX_TIMEOUT_S, self._timeout_now * 2)
                self.limiter.overloaded(f"no answer within the timeout; next requests wait up to {self._timeout_now:.0f} s")
                raise
            except httpx.TransportError as e:
                self.limiter.overloaded(f"{type(e).__name__}")
                raise
            except RetryableError as e:
                if e.overload:
                    self.limiter.overloaded(str(e)[:80])
                raise
        self.limiter.answered()
        return completion

    def _completion(self, response: Any, request: GenerationRequest) -> Completion:
        """A 200 as a completion; a 4xx about this prompt (the client let it through) as a failed record."""
        status = response.status_code
        if status != 200:
            return Completion(
                text="",
                finish_reason="error",
                prompt_tokens=request.prompt.num_tokens,
                error=f"HTTP {status}: {self.client.redact(error_detail(response))}",
                extra={"http_status": status},
            )
        try:
            data = response.json()
            choice = data["choices"][0]
            text = (choice.get("message") or {}).get("content") or ""
            finish = choice.get("finish_reason")
            usage = data.get("usage") or {}
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
            raise RetryableError(f"malformed response ({type(e).__name__}: {e})") from None
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
