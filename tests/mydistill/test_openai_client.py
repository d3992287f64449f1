"""The one OpenAI-compatible client: what is retried and how long it waits, what stops at once and
what it says, and that the key never leaves the Authorization header. Its three callers (generate,
the served signal, the judge) are tested against a real server in their own files."""

from __future__ import annotations

import json
import logging

import httpx
import pytest

from mydistill.openai_client import APIError, OpenAIClient, RetryableError, run_sync

KEY_ENV = "MYDISTILL_TEST_CLIENT_KEY"
KEY = "sk-client-secret-42"


def _client(handler, monkeypatch, **kw) -> OpenAIClient:
    monkeypatch.setenv(KEY_ENV, KEY)
    kw = {"max_retries": 2, "backoff_s": 0.001, **kw}
    return OpenAIClient("http://user:pw@mock/v1/", api_key_env=KEY_ENV, transport=httpx.MockTransport(handler), **kw)


def _scripted(*answers):
    """A handler answering with ``answers`` in turn (the last one repeats), recording each request."""
    seen = []

    def handler(request):
        seen.append(request)
        status, headers, body = answers[min(len(seen), len(answers)) - 1]
        return httpx.Response(status, headers=headers, json=body)

    return handler, seen


def test_retry_after_sets_the_wait_and_a_429_is_retried(monkeypatch):
    handler, seen = _scripted((429, {"retry-after": "0.2"}, {"error": {"message": "slow down"}}), (200, {}, {"ok": 1}))
    client = _client(handler, monkeypatch, backoff_s=30.0)  # a backoff this long would time the test out
    sleeps = []
    monkeypatch.setattr("asyncio.sleep", _recording_sleep(sleeps))

    async def go():
        async with client.async_client(2) as http:
            return await client.post(http, "chat/completions", {"q": 1}, lambda r: r.json())

    assert run_sync(go()) == {"ok": 1}
    assert len(seen) == 2 and sleeps == [0.2]
    # the key goes in the header only, and credentials in the URL are not sent
    assert seen[0].headers["authorization"] == f"Bearer {KEY}" and seen[0].url == "http://mock/v1/chat/completions"


def _recording_sleep(sleeps):
    real = __import__("asyncio").sleep

    async def sleep(seconds, *args, **kwargs):
        sleeps.append(seconds)
        await real(0)

    return sleep


def test_backoff_grows_with_jitter_and_exhaustion_is_one_clear_error(monkeypatch, caplog):
    handler, seen = _scripted((503, {}, {"error": {"message": f"overloaded, key {KEY}"}}))
    client = _client(handler, monkeypatch, max_retries=3, backoff_s=0.01)
    with caplog.at_level(logging.WARNING), pytest.raises(APIError, match=r"failed after 4 attempts \(HTTP 503: overloaded, key \*\*\*\)") as err:
        client.post_sync("completions", {}, lambda r: r)
    assert len(seen) == 4 and err.value.status == 503
    assert KEY not in str(err.value) and KEY not in caplog.text
    waits = [float(r.getMessage().rsplit(" in ", 1)[1].rstrip("s")) for r in caplog.records if "retry" in r.getMessage()]
    assert len(waits) == 3 and all(w >= 0.01 * 2**i for i, w in enumerate(waits))  # 0.01, 0.02, 0.04 … plus jitter


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (401, f"refused the request with HTTP 401 .*environment variable {KEY_ENV} \\(it is set\\)"),
        (403, "HTTP 403"),
        (404, r"answered HTTP 404 .*Check evaluate.judge.base_url .*model 'judge-1'"),
        (501, "answered HTTP 501"),
    ],
)
def test_what_retrying_cannot_fix_stops_at_once(monkeypatch, status, expected):
    handler, seen = _scripted((status, {}, {"error": {"message": "no"}}))
    client = _client(handler, monkeypatch, setting="evaluate.judge.base_url", model="judge-1")
    with pytest.raises(APIError, match=expected) as err:
        client.post_sync("chat/completions", {}, lambda r: r)
    assert len(seen) == 1 and err.value.status == status


def test_a_4xx_about_the_request_goes_to_the_caller_and_a_malformed_answer_is_retried(monkeypatch):
    handler, seen = _scripted((400, {}, {"error": {"message": "too long"}}))
    client = _client(handler, monkeypatch)
    assert client.post_sync("completions", {}, lambda r: r.status_code) == 400 and len(seen) == 1

    handler, seen = _scripted((200, {}, {"choices": "garbage"}), (200, {}, {"choices": [{"text": "fine"}]}))
    client = _client(handler, monkeypatch)

    def parse(response):
        try:
            return response.json()["choices"][0]["text"]
        except (KeyError, IndexError, TypeError) as e:
            raise RetryableError(f"malformed response ({e})") from None

    assert client.post_sync("completions", {}, parse) == "fine" and len(seen) == 2


def test_an_unreachable_server_names_no_status(monkeypatch):
    def refuse(request):
        raise httpx.ConnectError("connection refused", request=request)

    client = _client(refuse, monkeypatch, max_retries=1)
    with pytest.raises(APIError, match=r"failed after 2 attempts \(ConnectError: connection refused\)\. Is the server running") as err:
        client.post_sync("completions", {}, lambda r: r)
    assert err.value.status is None
    with pytest.raises(APIError, match="is unreachable"):
        client.get_sync("models")
    assert KEY not in repr(client) and json.dumps(client.headers()).count(KEY) == 1
