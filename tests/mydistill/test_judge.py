"""The judge metric: verdict parsing, position-swapped pairwise grading, caching, and failures
(4xx, 5xx, garbage replies) against the project's own OpenAI-compatible server."""

from __future__ import annotations

import json

import httpx
import pytest

from mydistill.config import JudgeConfig
from mydistill.evaluation.judge import Judge, JudgeError, parse_pairwise_verdict, parse_reference_verdict
from tests.mydistill import generation_fixtures as fx

KEY_ENV = "MYDISTILL_TEST_JUDGE_KEY"
KEY = "sk-judge-test-key"


def test_verdicts_are_read_from_the_reply():
    assert parse_reference_verdict("CORRECT") == 1.0
    assert parse_reference_verdict("Incorrect.") == 0.0
    assert parse_reference_verdict("the answer is correct") == 1.0
    assert parse_reference_verdict("correct or incorrect?") is None
    assert parse_reference_verdict("blah") is None
    assert parse_pairwise_verdict("A") == "A" and parse_pairwise_verdict(" b.") == "B"
    assert parse_pairwise_verdict("Tie") == "TIE" and parse_pairwise_verdict("Answer A") is None


class FakeJudge:
    """An httpx.MockTransport handler: replies by rule to the message asked, counting requests."""

    def __init__(self, reply):
        self.reply, self.calls = reply, []

    def __call__(self, request):
        content = json.loads(request.content)["messages"][0]["content"]
        self.calls.append(content)
        return httpx.Response(200, json={"choices": [{"message": {"content": self.reply(content)}}]})


def _judge(reply, mode="reference", tmp_path=None):
    fake = FakeJudge(reply)
    cfg = JudgeConfig(base_url="http://judge.invalid/v1", model="m", mode=mode)
    return Judge(cfg, cache_uri=str(tmp_path) if tmp_path else None, transport=httpx.MockTransport(fake)), fake


def test_pairwise_swaps_the_order_so_a_position_bias_cancels(tmp_path):
    judge, fake = _judge(lambda content: "A", mode="pairwise")
    scores = judge(["q1", "q2"], ["student 1", "student 2"], ["r1", "r2"], ["teacher 1", "teacher 2"])
    # always "A": the student wins when first, loses when second -> 0.5 each, not 1.0
    assert scores == [0.5, 0.5] and len(fake.calls) == 4
    judge, _ = _judge(lambda content: "A" if "Answer A: good" in content else "B", mode="pairwise")
    assert judge(["q"], ["good"], ["r"], ["bad"]) == [1.0]  # preferred in both orders


def test_reference_grading_is_cached(tmp_path):
    judge, fake = _judge(lambda content: "CORRECT" if "Candidate answer: Paris" in content else "INCORRECT", tmp_path=tmp_path)
    assert judge(["capital of France?"] * 2, ["Paris", "Rome"], ["Paris"] * 2, None) == [1.0, 0.0]
    again, fake_again = _judge(lambda content: "INCORRECT", tmp_path=tmp_path)
    assert again(["capital of France?"], ["Paris"], ["Paris"], None) == [1.0]  # from the cache
    assert fake_again.calls == [] and again.stats["cached"] == 1


# ----------------------------------------------------------------------------------------------
# against mydistill.generation.serve (a tiny random model: its replies are garbage to a judge)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = fx.build_random_teacher(tmp_path_factory.getbasetemp() / "judge-model")
    proc = fx.ServerProcess(model, "--model-name", "judge", "--api-key-env", KEY_ENV, "--enable-admin", env={KEY_ENV: KEY})
    yield proc
    proc.close()


def _faults(server, statuses):
    httpx.post(f"{server.base_url}/admin/faults", json={"statuses": statuses, "retry_after": 0}).raise_for_status()


def _server_judge(server, **kw):
    return Judge(JudgeConfig(base_url=server.api_base, model="judge", api_key_env=KEY_ENV, max_retries=1, **kw))


def test_garbage_replies_are_counted_and_a_judge_that_grades_nothing_says_why(server, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    judge = _server_judge(server)
    with pytest.raises(JudgeError, match="graded none of 2 answers: judge reply is neither CORRECT nor INCORRECT"):
        judge(["q1", "q2"], ["a", "b"], ["r", "r"], None)
    assert judge.stats["unreadable"] == 2 and judge.stats["http_4xx"] == 0


def test_a_5xx_is_retried_and_a_4xx_is_counted_with_the_servers_message(server, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    _faults(server, [500])
    try:
        judge = _server_judge(server)
        assert judge.ask("first question") is not None  # 500, then retried: answered
        assert judge.stats["requests"] == 2 and judge.stats["http_5xx"] == 0
        _faults(server, [503, 503])
        assert judge.ask("second question") is None  # two 5xx, max_retries=1: counted
        assert judge.stats["http_5xx"] == 1 and "HTTP 503" in judge.stats["first_error"]
    finally:
        _faults(server, [])
    monkeypatch.setenv(KEY_ENV, "wrong-key")
    judge = _server_judge(server)
    with pytest.raises(JudgeError, match=f"refused the request with HTTP 401 .*{KEY_ENV}"):
        judge(["q"], ["a"], ["r"], None)
    assert judge.stats["http_4xx"] == 1 and judge.stats["requests"] == 1  # a 4xx is not retried
    assert "wrong-key" not in str(judge.stats)


def test_an_unreachable_judge_is_counted():
    judge = Judge(JudgeConfig(base_url="http://127.0.0.1:9/v1", model="m", max_retries=0, timeout_s=2))
    with pytest.raises(JudgeError, match="unreachable"):
        judge(["q"], ["a"], ["r"], None)
    assert judge.stats["unreachable"] == 1


def test_a_rate_limited_judge_waits_and_asks_again():
    answers = [httpx.Response(429, headers={"retry-after": "0"}, json={"error": {"message": "rate limited"}}),
               httpx.Response(200, json={"choices": [{"message": {"content": "CORRECT"}}]})]
    judge = Judge(JudgeConfig(base_url="http://judge.invalid/v1", model="m", max_retries=2),
                  transport=httpx.MockTransport(lambda request: answers.pop(0)))
    assert judge(["q"], ["a"], ["a"], None) == [1.0]
    assert judge.stats["requests"] == 2 and judge.stats["http_4xx"] == 0
