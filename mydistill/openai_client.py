"""One client for OpenAI-compatible HTTP APIs: the teacher's chat completions (the generate stage),
a served teacher's ``/completions`` (the signal stage) and the judge's chat completions (evaluate).

It owns what every caller needs in the same way:

- the API key, read from the environment variable the config names, sent only in the
  Authorization header (``redact`` strips it from any text that might reach a log or an error);
- retries of what may pass (HTTP 408/409/429/5xx, timeouts, dropped connections, a malformed
  answer) with exponential backoff and jitter, so that many clients throttled together do not
  come back together; a server's ``Retry-After`` sets the delay instead;
- one clear message for what retrying cannot fix: 401/403 (the key), 404/405 (the URL or the
  model), retries exhausted (is the server running?).

Each caller keeps only its request body and the parsing of an answer: a ``parse(response)``
function that sees every response that is neither retryable nor fatal (200, and the 4xx that
concern one request, e.g. a prompt over the context length).
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import os
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from mydistill.config.generation import mask_url, strip_userinfo

logger = logging.getLogger(__name__)

T = TypeVar("T")

RETRYABLE_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})
# Longest Retry-After we honour; a server asking for more is waited on for this long per attempt.
MAX_RETRY_AFTER_S = 300.0
# Longest pause of the exponential backoff between two attempts.
MAX_BACKOFF_S = 60.0


class APIError(RuntimeError):
    """The API cannot serve the run (unreachable after retries, bad key, unknown model or URL).

    ``status`` is the HTTP status that ended it (None: no answer, the server was unreachable)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class RetryableError(Exception):
    """An answer that another attempt may get right: a 408/409/429/5xx or a malformed body."""

    def __init__(self, message: str, retry_after: float | None = None, *, overload: bool = False, status: int | None = None):
        super().__init__(message)
        self.retry_after = retry_after  # seconds the server asked us to wait (Retry-After)
        self.overload = overload  # the server asks for fewer requests at once (503, a 429 without Retry-After)
        self.status = status


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


def error_detail(response: Any, limit: int = 300) -> str:
    """The server's own error message from a response (OpenAI's ``{"error": {"message": …}}`` or the text), on one line."""
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


def run_sync(coro: Any) -> Any:
    """Run ``coro`` to completion from sync code, also when an event loop is already running here."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


class OpenAIClient:
    """An OpenAI-compatible endpoint at ``api_base`` (e.g. ``http://127.0.0.1:8000/v1``).

    ``setting`` names the config field of the URL and ``model`` the model asked for, so that a
    404 says what to check. ``transport`` replaces httpx's network transport (tests pass an
    ``httpx.MockTransport``, which serves sync and async clients alike).
    """

    def __init__(
        self,
        api_base: str,
        *,
        api_key_env: str,
        timeout_s: float = 60.0,
        max_retries: int = 5,
        backoff_s: float = 1.0,
        setting: str = "api_base",
        model: str | None = None,
        transport: Any = None,
    ):
        # credentials in the URL would go out as Basic auth instead of the API key: the key alone is sent
        self.api_base = strip_userinfo(api_base.rstrip("/"))
        self.api_key_env = api_key_env
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.setting = setting
        self.model = model
        self.transport = transport
        self.__api_key = os.environ.get(api_key_env) or None

    def __repr__(self) -> str:  # never show the key
        return f"OpenAIClient(api_base={mask_url(self.api_base)!r})"

    @property
    def has_key(self) -> bool:
        return self.__api_key is not None

    def redact(self, text: str) -> str:
        return text.replace(self.__api_key, "***") if self.__api_key else text

    def url(self, path: str) -> str:
        return f"{self.api_base}/{path.lstrip('/')}"

    def headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.__api_key:
            headers["Authorization"] = f"Bearer {self.__api_key}"
        return headers

    def async_client(self, concurrency: int) -> Any:
        """An ``httpx.AsyncClient`` with our headers, timeout and at most ``concurrency`` connections."""
        import httpx

        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        return httpx.AsyncClient(headers=self.headers(), timeout=httpx.Timeout(self.timeout_s), limits=limits, transport=self.transport)

    def sync_client(self) -> Any:
        import httpx

        return httpx.Client(headers=self.headers(), timeout=httpx.Timeout(self.timeout_s), transport=self.transport)

    # -- what an answer means ---------------------------------------------------------------

    def check(self, response: Any) -> None:
        """Raise for an answer that is retryable (:class:`RetryableError`) or fatal (:class:`APIError`);
        return for one the caller parses (200, and the 4xx that concern the request itself)."""
        status = response.status_code
        if status in RETRYABLE_STATUS:
            retry_after = parse_retry_after(response.headers.get("retry-after"))
            # a 429 that says when to come back is paced by its Retry-After; one that does not, or a 503, asks for less
            overload = status == 503 or (status == 429 and retry_after is None)
            raise RetryableError(f"HTTP {status}: {self.redact(error_detail(response))}", retry_after, overload=overload, status=status)
        where = mask_url(str(response.request.url)) if _has_request(response) else mask_url(self.api_base)
        if status in (401, 403):
            key_state = "is set" if self.__api_key else "is NOT set"
            raise APIError(
                f"{where} refused the request with HTTP {status} ({self.redact(error_detail(response))}). "
                f"Check the API key in the environment variable {self.api_key_env} (it {key_state}).",
                status,
            )
        if status in (404, 405):
            model = f" and the model {self.model!r}" if self.model else ""
            raise APIError(
                f"{where} answered HTTP {status} ({self.redact(error_detail(response))}). Check {self.setting} "
                f"(it should end with the API version, e.g. /v1){model}.",
                status,
            )
        if status >= 500 or status < 200 or 300 <= status < 400:
            raise APIError(f"{where} answered HTTP {status} ({self.redact(error_detail(response))})", status)

    # -- retries ----------------------------------------------------------------------------

    def _wait(self) -> Callable[[Any], float]:
        from tenacity import wait_exponential, wait_random

        # backoff_s, 2*backoff_s, 4*backoff_s ... plus up to backoff_s of jitter
        backoff = wait_exponential(multiplier=self.backoff_s, max=MAX_BACKOFF_S) + wait_random(0, self.backoff_s)

        def wait(state: Any) -> float:
            error = state.outcome.exception()
            if isinstance(error, RetryableError) and error.retry_after is not None:
                return min(error.retry_after, MAX_RETRY_AFTER_S)
            return backoff(state)

        return wait

    def _retry_args(self, label: str) -> dict[str, Any]:
        import httpx
        from tenacity import retry_if_exception_type, stop_after_attempt

        def log_retry(state: Any) -> None:
            logger.warning(
                "%s failed (%s); retry %d/%d in %.2fs",
                label,
                self.redact(_reason(state.outcome.exception())),
                state.attempt_number,
                self.max_retries,
                state.next_action.sleep if state.next_action else 0.0,
            )

        return dict(
            stop=stop_after_attempt(self.max_retries + 1),
            wait=self._wait(),
            retry=retry_if_exception_type((RetryableError, httpx.TransportError)),
            before_sleep=log_retry,
            reraise=True,
        )

    def _exhausted(self, url: str, error: BaseException) -> APIError:
        return APIError(
            f"{mask_url(url)} failed after {self.max_retries + 1} attempts ({self.redact(_reason(error))}). "
            "Is the server running and reachable? Shards written so far are kept; re-run to resume.",
            error.status if isinstance(error, RetryableError) else None,
        )

    async def post(
        self,
        client: Any,
        path: str,
        body: dict[str, Any],
        parse: Callable[[Any], T],
        *,
        label: str = "request",
        timeout: Callable[[], float] | None = None,
        around: Callable[[Callable[[], Awaitable[T]]], Awaitable[T]] | None = None,
    ) -> T:
        """POST ``body`` to ``path`` on ``client`` (from :meth:`async_client`), retrying what may pass;
        ``parse`` makes the result from a response :meth:`check` let through.

        ``timeout`` gives each attempt's timeout (default the client's); ``around`` wraps each attempt
        (the generate stage's adaptive concurrency limit watches overload signs there).
        """
        import httpx
        from tenacity import AsyncRetrying

        url = self.url(path)

        async def once() -> T:
            kwargs = {"timeout": timeout()} if timeout else {}
            response = await client.post(url, json=body, **kwargs)
            self.check(response)
            return parse(response)

        try:
            async for attempt in AsyncRetrying(**self._retry_args(label)):
                with attempt:
                    return await (around(once) if around else once())
        except (RetryableError, httpx.TransportError) as e:
            raise self._exhausted(url, e) from None
        raise AssertionError("unreachable")  # pragma: no cover

    def post_sync(
        self,
        path: str,
        body: dict[str, Any],
        parse: Callable[[Any], T],
        *,
        label: str = "request",
        on_attempt: Callable[[], None] | None = None,
        client: Any = None,
    ) -> T:
        """:meth:`post` for sync callers (the judge); ``on_attempt`` is called before each attempt."""
        import httpx
        from tenacity import Retrying

        url = self.url(path)
        own = client is None
        client = client or self.sync_client()
        try:
            for attempt in Retrying(**self._retry_args(label)):
                with attempt:
                    if on_attempt:
                        on_attempt()
                    response = client.post(url, json=body)
                    self.check(response)
                    return parse(response)
        except (RetryableError, httpx.TransportError) as e:
            raise self._exhausted(url, e) from None
        finally:
            if own:
                client.close()
        raise AssertionError("unreachable")  # pragma: no cover

    def get_sync(self, path: str) -> Any:
        """One GET (no retries: a probe such as ``/models``), checked; unreachable becomes :class:`APIError`."""
        import httpx

        url = self.url(path)
        try:
            with self.sync_client() as client:
                response = client.get(url)
        except httpx.TransportError as e:
            raise APIError(f"{mask_url(url)} is unreachable ({type(e).__name__}: {e}); is the server running?") from None
        try:
            self.check(response)
        except RetryableError as e:
            raise APIError(f"{mask_url(url)} answered {e}") from None
        return response


def _has_request(response: Any) -> bool:
    try:
        response.request  # noqa: B018 (httpx raises when a Response was built without one)
    except RuntimeError:
        return False
    return True


def _reason(error: BaseException | None) -> str:
    if isinstance(error, RetryableError):
        return str(error)
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
