"""The server's OpenAI-compatible API as plain functions, one per route: a request body in, the answer out.

``GET /v1/models`` (:func:`list_models`), ``POST /v1/chat/completions`` (:func:`chat_completion`) and
``POST /v1/completions`` for scoring (:func:`score_completions`); a bad request raises
:class:`RequestError`. :class:`Faults` scripts failures for testing clients. The HTTP side is
:mod:`mydistill.generation.serve.handler`.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mydistill.generation.base import Sampling
from mydistill.generation.serve.engine import SCORING_FAULTS, BatchingEngine, ChatJob, RequestError, ScoredPrompt, ScoreJob

DEFAULT_MAX_TOKENS = 256


class Faults:
    """Scripted failures per distinct request body, for testing clients' retry logic."""

    def __init__(self, statuses: list[int] | None = None, retry_after: float | None = None):
        self.lock = threading.Lock()
        self.statuses = list(statuses or [])
        self.retry_after = retry_after
        self.scoring: str | None = None  # one of SCORING_FAULTS: every scoring answer wrong that way
        self.attempts: dict[str, list[float]] = defaultdict(list)
        self.served: dict[int, int] = defaultdict(int)
        self.requests = 0

    def configure(self, statuses: list[int], retry_after: float | None, scoring: str | None = None) -> None:
        if scoring is not None and scoring not in SCORING_FAULTS:
            raise ValueError(f"unknown scoring fault {scoring!r}; expected one of {SCORING_FAULTS}")
        with self.lock:
            self.statuses, self.retry_after, self.scoring = list(statuses), retry_after, scoring
            self.attempts.clear()
            self.served.clear()
            self.requests = 0

    def check(self, body: bytes) -> int | None:
        """The error status to answer this attempt with, or None to serve it."""
        key = hashlib.sha256(body).hexdigest()
        with self.lock:
            self.requests += 1
            attempts = self.attempts[key]
            attempts.append(time.time())
            if len(attempts) <= len(self.statuses):
                status = self.statuses[len(attempts) - 1]
                self.served[status] += 1
                return status
        return None

    def stats(self) -> dict[str, Any]:
        with self.lock:
            return {
                "requests": self.requests,
                "faults_served": {str(k): v for k, v in self.served.items()},
                "attempts": {k: list(v) for k, v in self.attempts.items()},
            }


@dataclass
class ServerSettings:
    """What every request of one server shares."""

    engine: BatchingEngine
    model_name: str
    api_key: str | None = None
    faults: Faults | None = None
    request_timeout_s: float = 600.0
    log_requests: bool = False
    max_logprobs: int = 20
    logprobs_mode: str = "raw"


def list_models(settings: ServerSettings) -> dict[str, Any]:
    """``GET /v1/models``: the one model served."""
    return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "owned_by": "mydistill"}]}


def chat_completion(settings: ServerSettings, body: bytes) -> dict[str, Any]:
    """``POST /v1/chat/completions``: ``n`` completions of the conversation's user message."""
    request = _json_object(body)
    _check_model(request, settings.model_name)
    if request.get("stream"):
        raise RequestError(400, "stream=true is not supported by this server")
    message = _user_message(request.get("messages"))
    try:
        max_tokens = int(request.get("max_completion_tokens") or request.get("max_tokens") or DEFAULT_MAX_TOKENS)
        temperature = float(request.get("temperature", 1.0))
        top_p = float(request.get("top_p", 1.0))
        n = int(request.get("n", 1))
        seed = int(request.get("seed") or 0)
    except (TypeError, ValueError) as e:
        raise RequestError(400, f"bad sampling parameter: {e}") from None
    if max_tokens < 1 or n < 1 or temperature < 0 or not 0 < top_p <= 1:
        raise RequestError(400, "need max_tokens >= 1, n >= 1, temperature >= 0 and 0 < top_p <= 1")
    sampling = Sampling(max_tokens, temperature, top_p, seed, ignore_eos=bool(request.get("ignore_eos", False)))
    completions = settings.engine.submit(ChatJob(message, n, sampling), timeout=settings.request_timeout_s)
    prompt_tokens = completions[0].prompt_tokens or 0
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": settings.model_name,
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": c.text},
                "finish_reason": c.finish_reason,
            }
            for i, c in enumerate(completions)
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": sum(c.completion_tokens for c in completions),
            "total_tokens": prompt_tokens + sum(c.completion_tokens for c in completions),
        },
    }


@dataclass
class ScoringRequest:
    """The checked parameters of a ``/v1/completions`` request."""

    prompts: list[str | list[int]]
    echo: bool
    logprobs: int | None  # OpenAI's: top entries listed per token (with echo, the prompt's too)
    prompt_logprobs: int | None  # vLLM's: top entries per prompt position
    max_tokens: int  # 0 (with echo or prompt_logprobs) or 1
    temperature: float


def scoring_request(request: dict[str, Any], max_logprobs: int) -> ScoringRequest:
    """The scoring parameters of ``request``, or a :class:`RequestError` saying which is wrong."""
    prompts = _prompts(request.get("prompt"))
    try:
        echo = bool(request.get("echo", False))
        logprobs = None if request.get("logprobs") is None else int(request["logprobs"])
        prompt_logprobs = None if request.get("prompt_logprobs") is None else int(request["prompt_logprobs"])
        max_tokens = int(request.get("max_tokens", 16) if request.get("max_tokens") is not None else 16)
        temperature = float(request.get("temperature", 1.0))
    except (TypeError, ValueError) as e:
        raise RequestError(400, f"bad parameter: {e}") from None
    for name, value in (("logprobs", logprobs), ("prompt_logprobs", prompt_logprobs)):
        if value is not None and value > max_logprobs:  # vLLM's wording
            raise RequestError(400, f"Requested {name} of {value}, which is greater than max allowed: {max_logprobs}")
        if value is not None and value < 0:
            raise RequestError(400, f"{name} must be >= 0")
    if max_tokens > 1 or max_tokens < 0 or (max_tokens == 0 and not echo and prompt_logprobs is None):
        raise RequestError(
            400, "this server's /v1/completions scores prompts: max_tokens 0 (with echo) or 1; "
            "generate with /v1/chat/completions"
        )
    return ScoringRequest(prompts, echo, logprobs, prompt_logprobs, max_tokens, temperature)


def score_completions(settings: ServerSettings, body: bytes) -> dict[str, Any]:
    """``POST /v1/completions``, scoring: the log-probs of the prompt's own tokens (echo / prompt_logprobs)
    and one greedy token."""
    request = _json_object(body)
    _check_model(request, settings.model_name)
    ask = scoring_request(request, settings.max_logprobs)
    fault = settings.faults.scoring if settings.faults is not None else None
    top_k = max(ask.logprobs or 0, ask.prompt_logprobs or 0)
    job = ScoreJob(
        ask.prompts, bool(request.get("add_special_tokens", True)), max(top_k, 1),
        ask.temperature if settings.logprobs_mode == "processed" else None, fault,
    )
    scored: list[ScoredPrompt] = settings.engine.submit(job, timeout=settings.request_timeout_s)
    if fault == "fewer_logprobs":
        top_k -= 1
    tokenizer = settings.engine.backend.tokenizer
    as_ids = bool(request.get("return_tokens_as_token_ids", False))

    def name(token_id: int) -> str:
        return f"token_id:{token_id}" if as_ids else tokenizer.decode([token_id])

    choices = []
    for index, (prompt, sc) in enumerate(zip(ask.prompts, scored, strict=True)):
        generated = [sc.generated_id] if ask.max_tokens == 1 else []
        echoed = (tokenizer.decode(sc.token_ids) if isinstance(prompt, list) else prompt) if ask.echo else ""
        choice: dict[str, Any] = {
            "index": index,
            "text": echoed + tokenizer.decode(generated),
            "finish_reason": "length",
            "logprobs": None,
        }
        if ask.logprobs is not None and fault != "no_logprobs":
            choice["logprobs"] = _openai_logprobs(sc, generated, echo=ask.echo, top_k=top_k, name=name, tokenizer=tokenizer)
        if ask.prompt_logprobs is not None:
            choice["prompt_logprobs"] = _prompt_logprobs(sc, top_k, fault, tokenizer)
        if request.get("return_token_ids"):
            choice["prompt_token_ids"] = sc.token_ids
            choice["token_ids"] = generated
        choices.append(choice)
    prompt_tokens = sum(len(sc.token_ids) for sc in scored)
    completion_tokens = ask.max_tokens * len(scored)
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": settings.model_name,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def _openai_logprobs(
    sc: ScoredPrompt, generated: list[int], *, echo: bool, top_k: int, name: Callable[[int], str], tokenizer: Any
) -> dict[str, Any]:
    """OpenAI's ``logprobs`` of one choice: the prompt's tokens (with echo), then the generated one."""
    n = len(sc.token_ids)
    tokens = (sc.token_ids if echo else []) + generated
    rows = list(range(n - 1)) if echo else []  # the row that predicts token p + 1
    token_lps: list[float | None] = ([None] if echo else []) + [sc.next_logprob[r] for r in rows]
    top: list[dict[str, float] | None] = ([None] if echo else []) + [
        _top_entries(sc, r, top_k, name, with_next=True) for r in rows
    ]
    if generated:
        token_lps.append(sc.top_logprobs[n - 1][0])
        top.append(_top_entries(sc, n - 1, top_k, name, with_next=False))
    pieces = [tokenizer.decode([t]) for t in tokens]
    offsets = [sum(len(p) for p in pieces[:i]) for i in range(len(pieces))]
    return {
        "tokens": [name(t) for t in tokens],
        "token_logprobs": token_lps,
        "top_logprobs": top,
        "text_offset": offsets,
    }


def _prompt_logprobs(sc: ScoredPrompt, top_k: int, fault: str | None, tokenizer: Any) -> list[dict[str, Any] | None]:
    """vLLM's ``prompt_logprobs`` of one choice: per prompt position, its top entries by token id."""
    entries: list[dict[str, Any] | None] = [None]
    for r in range(len(sc.token_ids) - 1):
        if fault == "no_logprobs":
            entries.append(None)
            continue
        entry = {
            str(t): {"logprob": lp, "rank": rank + 1, "decoded_token": tokenizer.decode([t])}
            for rank, (t, lp) in enumerate(zip(sc.top_ids[r][:top_k], sc.top_logprobs[r][:top_k]))
        }
        follow = sc.token_ids[r + 1]  # vLLM always lists the prompt's own token too
        entry.setdefault(
            str(follow), {"logprob": sc.next_logprob[r], "rank": sc.next_rank[r], "decoded_token": tokenizer.decode([follow])}
        )
        entries.append(entry)
    return entries


def _check_model(request: dict[str, Any], model_name: str) -> None:
    if request.get("model") not in (None, model_name):
        raise RequestError(
            404, f"The model {request.get('model')!r} does not exist (serving {model_name!r})", "not_found"
        )


def _top_entries(sc: ScoredPrompt, row: int, k: int, name: Any, *, with_next: bool) -> dict[str, float]:
    """OpenAI's ``top_logprobs`` entry of one position: the top k by name, plus (like vLLM) the token that follows."""
    entry = {name(t): lp for t, lp in zip(sc.top_ids[row][:k], sc.top_logprobs[row][:k])}
    if with_next:
        entry.setdefault(name(sc.token_ids[row + 1]), sc.next_logprob[row])
    return entry


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        request = json.loads(body)
    except json.JSONDecodeError as e:
        raise RequestError(400, f"request body is not JSON: {e}") from None
    if not isinstance(request, dict):
        raise RequestError(400, "request body must be a JSON object")
    return request


def _prompts(prompt: Any) -> list[str | list[int]]:
    """The completions API's ``prompt``: a string, token ids, or a list of either."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return [list(prompt)]
    if isinstance(prompt, list) and prompt and all(
        isinstance(p, str) or (isinstance(p, list) and p and all(isinstance(t, int) for t in p)) for p in prompt
    ):
        return list(prompt)
    raise RequestError(400, "'prompt' must be a string, a list of token ids, or a non-empty list of either")


def _user_message(messages: Any) -> str:
    """The text of a single-turn conversation (the stage sends one user message)."""
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "'messages' must be a non-empty list")
    texts = []
    for m in messages:
        if not isinstance(m, dict) or "content" not in m:
            raise RequestError(400, "each message needs 'role' and 'content'")
        content = m["content"]
        if isinstance(content, list):  # content parts: keep the text ones
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if m.get("role", "user") == "user":
            texts.append(str(content))
    if not texts:
        raise RequestError(400, "no user message")
    return "\n\n".join(texts)
