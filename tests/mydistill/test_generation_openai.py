"""The OpenAI-compatible backend against a real HTTP server on 127.0.0.1 (``mydistill.generation.serve``
serving a tiny trained teacher), including scripted 429/500 failures, a wrong key, an unknown model,
an overlong prompt and an unreachable server; plus retry details on a mocked transport."""

from __future__ import annotations

import json
import logging
import os

import httpx
import pytest

from mydistill.generation import (
    APIError,
    GenerateConfig,
    GenerationRequest,
    OpenAIBackend,
    PreparedPrompt,
    Sampling,
    TeacherBackend,
    generate_responses,
    read_responses,
)
from mydistill.generation.openai_api import parse_retry_after

from tests.mydistill import generation_fixtures as fx

KEY_ENV = "MYDISTILL_TEST_API_KEY"
KEY = "sk-test-0123456789-do-not-leak"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    teacher = fx.build_trained_teacher(tmp_path_factory.getbasetemp() / "gen-trained-teacher")
    proc = fx.ServerProcess(
        teacher,
        *("--model-name", "tiny-teacher", "--dtype", "float32"),  # exact answers are asserted
        *("--api-key-env", KEY_ENV, "--enable-admin"),
        env={KEY_ENV: KEY},
    )
    yield proc
    output = proc.close()
    assert KEY not in output  # the server never logs the key either


@pytest.fixture
def api_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)


@pytest.fixture
def faults(server):
    def configure(statuses, retry_after=None):
        httpx.post(
            f"{server.base_url}/admin/faults", json={"statuses": statuses, "retry_after": retry_after}
        ).raise_for_status()

    yield configure
    configure([])


def _cfg(server, **kw) -> GenerateConfig:
    return GenerateConfig(backend="openai", api_base=server.api_base, api_key_env=KEY_ENV, max_new_tokens=16, **kw)


def _prompts(n: int, seed: int = 0) -> list[str]:
    return fx.teacher_prompts(n, seed)  # prompts the trained teacher answers right


def _all_text(folder) -> str:
    return "".join(open(os.path.join(folder, n), encoding="utf-8").read() for n in os.listdir(folder))


# ----------------------------------------------------------------------------------------------
# against the real server


def test_responses_over_http_match_the_teacher(server, api_key, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    prompts = _prompts(12)
    fx.write_prompts(tmp_path / "p.jsonl", prompts)
    out = tmp_path / "o"
    manifest = generate_responses(
        str(tmp_path / "p.jsonl"),
        str(out),
        teacher="tiny-teacher",
        cfg=_cfg(server, concurrency=4, shard_size=5),
        progress=False,
    )
    records = read_responses(str(out))
    assert (
        manifest["status_counts"]["ok"] == 12
        and manifest["backend"] == "openai"
        and manifest["teacher_id"] == "tiny-teacher"
    )
    for r in records:
        assert r["response"] == fx.target_response(r["prompt"])
        assert r["finish_reason"] == "stop" and r["completion_tokens"] == 12 and r["prompt_tokens"] > 2
    assert KEY not in _all_text(out) and KEY not in caplog.text and KEY_ENV in json.dumps(manifest["config"])


def test_429_and_500_are_retried_and_retry_after_is_honoured(server, api_key, faults, tmp_path):
    faults([429, 500], retry_after=0.5)
    fx.write_prompts(tmp_path / "p.jsonl", _prompts(4, seed=1))
    cfg = _cfg(server, backoff_s=0.01, max_retries=3)
    manifest = generate_responses(
        str(tmp_path / "p.jsonl"), str(tmp_path / "o"), teacher="tiny-teacher", cfg=cfg, progress=False
    )
    assert manifest["status_counts"]["ok"] == 4
    stats = httpx.get(f"{server.base_url}/admin/stats").json()
    assert stats["faults_served"] == {"429": 4, "500": 4}
    for attempts in stats["attempts"].values():
        assert len(attempts) == 3
        assert attempts[1] - attempts[0] >= 0.45  # waited for Retry-After, not the 0.01 s backoff
        assert attempts[2] - attempts[1] < 0.45  # after the 500: exponential backoff from 0.01 s


class _CrashAfter(TeacherBackend):
    def __init__(self, inner, shards):
        self.inner, self.shards, self.name, self.formatter = inner, shards, inner.name, inner.formatter

    def generate(self, requests, sampling, on_progress=None):
        if self.shards == 0:
            raise KeyboardInterrupt("injected")
        self.shards -= 1
        return self.inner.generate(requests, sampling, on_progress)


def test_unreachable_api_fails_clearly_and_the_run_resumes_later(server, api_key, tmp_path):
    fx.write_prompts(tmp_path / "p.jsonl", _prompts(10, seed=2))
    out = str(tmp_path / "o")
    cfg = _cfg(server, shard_size=4)
    live = OpenAIBackend(server.api_base, "tiny-teacher", api_key_env=KEY_ENV)
    with pytest.raises(KeyboardInterrupt):
        generate_responses(
            str(tmp_path / "p.jsonl"),
            out,
            teacher="tiny-teacher",
            cfg=cfg,
            backend=_CrashAfter(live, 1),
            progress=False,
        )
    assert len(read_responses(out)) == 4

    dead = cfg.model_copy(
        update={"api_base": f"http://127.0.0.1:{fx.unused_port()}/v1", "max_retries": 2, "backoff_s": 0.01}
    )
    with pytest.raises(APIError, match=r"failed after 3 attempts \(ConnectError.*Is the server running"):
        generate_responses(str(tmp_path / "p.jsonl"), out, teacher="tiny-teacher", cfg=dead, progress=False)
    assert len(read_responses(out)) == 4  # kept

    manifest = generate_responses(str(tmp_path / "p.jsonl"), out, teacher="tiny-teacher", cfg=cfg, progress=False)
    assert manifest["records"] == 10 and manifest["run"]["generated_records"] == 6
    assert len({r["id"] for r in read_responses(out)}) == 10


def test_wrong_or_missing_key_is_a_clear_error_that_never_shows_the_key(server, monkeypatch, tmp_path, caplog):
    fx.write_prompts(tmp_path / "p.jsonl", _prompts(3))
    monkeypatch.setenv(KEY_ENV, "sk-wrong-key-987654321")
    with pytest.raises(APIError, match=f"HTTP 401 .*environment variable {KEY_ENV} \\(it is set\\)") as err:
        generate_responses(
            str(tmp_path / "p.jsonl"), str(tmp_path / "o"), teacher="tiny-teacher", cfg=_cfg(server), progress=False
        )
    assert "sk-wrong-key" not in str(err.value) and "sk-wrong-key" not in caplog.text
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(APIError, match="it is NOT set"):
        generate_responses(
            str(tmp_path / "p.jsonl"), str(tmp_path / "o"), teacher="tiny-teacher", cfg=_cfg(server), progress=False
        )


def test_unknown_model_is_a_clear_error(server, api_key, tmp_path):
    fx.write_prompts(tmp_path / "p.jsonl", _prompts(2))
    with pytest.raises(APIError, match=r"HTTP 404 .*model 'no-such-model'"):
        generate_responses(
            str(tmp_path / "p.jsonl"), str(tmp_path / "o"), teacher="no-such-model", cfg=_cfg(server), progress=False
        )


def test_overlong_prompt_fails_its_record_only_or_is_skipped_with_a_local_tokenizer(server, api_key, tmp_path):
    prompts = [*_prompts(3), "kite " + "boat " * 100]
    fx.write_prompts(tmp_path / "p.jsonl", prompts)
    manifest = generate_responses(
        str(tmp_path / "p.jsonl"), str(tmp_path / "o"), teacher="tiny-teacher", cfg=_cfg(server), progress=False
    )
    records = {r["id"]: r for r in read_responses(str(tmp_path / "o"))}
    assert manifest["status_counts"] == {"ok": 3, "empty": 0, "truncated": 0, "failed": 1, "unparsed": 0}
    assert records["q0003"]["status"] == "failed" and "maximum context length" in records["q0003"]["error"]

    tokenizer = fx.build_tokenizer()
    cfg = _cfg(server, max_prompt_tokens=64)
    manifest = generate_responses(
        str(tmp_path / "p.jsonl"),
        str(tmp_path / "o2"),
        teacher="tiny-teacher",
        cfg=cfg,
        tokenizer=tokenizer,
        progress=False,
    )
    assert manifest["records"] == 3 and manifest["prompts"]["overlong_skipped"] == 1


# ----------------------------------------------------------------------------------------------
# retry details on a mocked transport (no server)


def _backend(handler, **kw) -> OpenAIBackend:
    return OpenAIBackend(
        "http://mock/v1", "m", api_key_env="MYDISTILL_UNSET_KEY_ENV", transport=httpx.MockTransport(handler), **kw
    )


def _request(i: int = 0) -> GenerationRequest:
    return GenerationRequest(PreparedPrompt(f"k{i}", f"hello {i}"))


def _ok(text="hi", finish="stop"):
    return httpx.Response(
        200,
        json={
            "choices": [{"message": {"content": text}, "finish_reason": finish}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2},
        },
    )


def test_parse_retry_after():
    assert parse_retry_after("2") == 2.0 and parse_retry_after("0.5") == 0.5
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    assert 0 <= parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") <= 0.0  # a date in the past: no wait


def test_malformed_success_is_retried_and_finish_reasons_are_mapped():
    calls = []

    def handler(request):
        calls.append(json.loads(request.content))
        if len(calls) == 1:
            return httpx.Response(200, text="<html>proxy error</html>")
        text = json.loads(request.content)["messages"][0]["content"]
        return _ok("x", {"hello 0": "stop", "hello 1": "length", "hello 2": "content_filter"}[text])

    backend = _backend(handler, backoff_s=0.001, concurrency=1)
    results = backend.generate([_request(0), _request(1), _request(2)], Sampling(5, temperature=0.3, top_p=0.9, seed=1))
    assert [r[0].finish_reason for r in results] == ["stop", "length", "error"]
    assert results[2][0].error == "finish_reason=content_filter"
    body = calls[-1]
    assert body["max_tokens"] == 5 and body["temperature"] == 0.3 and body["top_p"] == 0.9 and body["n"] == 1
    assert "Authorization" not in str(calls)


def test_one_rejected_request_fails_its_record_but_a_uniformly_rejected_shard_stops():
    def some_bad(request):
        text = json.loads(request.content)["messages"][0]["content"]
        return httpx.Response(400, json={"error": {"message": "bad prompt"}}) if text == "hello 1" else _ok()

    results = _backend(some_bad).generate([_request(0), _request(1)], Sampling(4))
    assert results[1][0].error == "HTTP 400: bad prompt" and results[0][0].finish_reason == "stop"

    all_bad = _backend(lambda r: httpx.Response(422, json={"error": {"message": "unknown field top_p"}}))
    with pytest.raises(APIError, match=r"every request .* unknown field top_p"):
        all_bad.generate([_request(0), _request(1)], Sampling(4))


def test_server_errors_exhaust_retries_into_a_clear_error():
    seen = []

    def handler(request):
        seen.append(1)
        return httpx.Response(503, json={"error": {"message": "overloaded"}})

    with pytest.raises(APIError, match=r"failed after 3 attempts \(HTTP 503: overloaded\)"):
        _backend(handler, max_retries=2, backoff_s=0.001).generate([_request()], Sampling(4))
    assert len(seen) == 3


def test_max_completion_tokens_param_and_key_header(monkeypatch):
    monkeypatch.setenv("MYDISTILL_MOCK_KEY", "sk-mock")
    seen = {}

    def handler(request):
        seen.update(json.loads(request.content), auth=request.headers.get("authorization"))
        return _ok()

    backend = OpenAIBackend(
        "http://mock/v1",
        "m",
        api_key_env="MYDISTILL_MOCK_KEY",
        max_tokens_param="max_completion_tokens",
        transport=httpx.MockTransport(handler),
    )
    backend.generate([_request()], Sampling(7))
    assert seen["max_completion_tokens"] == 7 and "max_tokens" not in seen and seen["auth"] == "Bearer sk-mock"
    assert "sk-mock" not in repr(backend) and "sk-mock" not in str(vars(backend).get("api_key_env"))


def test_credentials_in_api_base_are_never_sent_nor_recorded_and_the_key_is(server, api_key, tmp_path, caplog):
    """A user:password@ in api_base used to replace the API key with Basic auth (the server got 401)."""
    fx.write_prompts(tmp_path / "p.jsonl", _prompts(2))
    with_userinfo = server.api_base.replace("http://", "http://someone:hunter2@")
    cfg = GenerateConfig(backend="openai", api_base=with_userinfo, api_key_env=KEY_ENV, max_new_tokens=16)
    assert cfg.api_base == with_userinfo.rstrip("/")  # the run itself has the URL as given
    assert "hunter2" not in json.dumps(cfg.model_dump(mode="json")) and "hunter2" not in str(cfg.model_dump())
    manifest = generate_responses(str(tmp_path / "p.jsonl"), str(tmp_path / "o"), teacher="tiny-teacher", cfg=cfg, progress=False)
    assert manifest["status_counts"]["ok"] == 2  # the server checked the bearer key
    assert "hunter2" not in _all_text(tmp_path / "o") and "hunter2" not in caplog.text
    assert "generate.api_base carries credentials (http://***@127.0.0.1" in caplog.text


def test_a_saturated_server_slows_the_client_down_instead_of_failing_the_stage(caplog):
    """A server that can take 2 requests at a time, asked for 16: every request beyond its capacity
    times out or is reset (a full listen backlog), so the client halves what it keeps in flight
    until the server copes, and every prompt is answered."""
    import asyncio

    state = {"in_flight": 0, "peak": 0, "timeouts": 0, "resets": 0}

    async def handler(request):
        state["in_flight"] += 1
        try:
            if state["in_flight"] > 2:
                if state["timeouts"] <= state["resets"]:
                    state["timeouts"] += 1
                    raise httpx.ReadTimeout("no answer", request=request)
                state["resets"] += 1
                raise httpx.ReadError("connection reset by peer", request=request)
            state["peak"] = max(state["peak"], state["in_flight"])
            await asyncio.sleep(0.01)
            return _ok()
        finally:
            state["in_flight"] -= 1

    backend = _backend(handler, concurrency=16, backoff_s=0.01, max_retries=8, timeout_s=1.0)
    results = backend.generate([_request(i) for i in range(40)], Sampling(4))
    assert all(r[0].finish_reason == "stop" for r in results)
    assert state["timeouts"] > 0 and state["resets"] > 0
    assert backend.limiter.lowest <= 2 and backend._timeout_now > 1.0
    assert "server overloaded" in caplog.text


def test_more_concurrent_clients_than_a_batch_are_all_served(server, api_key, tmp_path):
    """48 requests at once against the project's server (a batch of 32): the listen backlog holds
    them all (the default of 5 reset connections), and the batches answer every one."""
    fx.write_prompts(tmp_path / "p.jsonl", _prompts(48, seed=3))
    manifest = generate_responses(
        str(tmp_path / "p.jsonl"), str(tmp_path / "o"), teacher="tiny-teacher", cfg=_cfg(server, concurrency=48, shard_size=48),
        progress=False,
    )
    assert manifest["status_counts"]["ok"] == 48


def test_a_generate_stage_that_fails_before_any_response_leaves_no_folder(tmp_path):
    fx.write_prompts(tmp_path / "p.jsonl", _prompts(3))
    dead = GenerateConfig(backend="openai", api_base=f"http://127.0.0.1:{fx.unused_port()}/v1", max_retries=0, backoff_s=0.01,
                          reuse_responses=False)
    with pytest.raises(APIError):
        generate_responses(str(tmp_path / "p.jsonl"), str(tmp_path / "o"), teacher="t", cfg=dead, progress=False)
    assert not (tmp_path / "o").exists()  # not a folder holding only generate_params.json
