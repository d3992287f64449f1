"""A small OpenAI-compatible server for a local Hugging Face model.

    python -m mydistill.generation.serve --model DIR [--port 8000] [--host 127.0.0.1]

It serves ``POST /v1/chat/completions`` (non-streaming), ``POST /v1/completions`` for scoring
(``echo: true`` + ``logprobs: k``, or vLLM's ``prompt_logprobs: k``; prompts as text or token ids;
``max_tokens`` 0 or 1), ``GET /v1/models`` and ``GET /health``, so a teacher on one machine can feed
``generate.backend: openai`` and ``signal.backend: openai`` runs elsewhere, and so both can be tested
against a real server. Like vLLM, it returns at most ``--max-logprobs`` (default 20) entries per
position and raw log-probs (temperature not applied) unless started with ``--logprobs-mode
processed``. Requests that arrive together are decoded (or scored) together (micro-batching
through :class:`~mydistill.generation.hf.HFBackend`). For production serving use vLLM
or TGI; this is the dependency-free stand-in (standard library HTTP server).

Options for testing clients: ``--api-key-env VAR`` requires ``Authorization: Bearer $VAR``;
``--enable-admin`` adds ``POST /admin/faults`` (``{"statuses": [429, 500], "retry_after": 0.5}``:
each distinct request first gets these error statuses, one per attempt, then succeeds; ``"scoring":
"no_logprobs" | "fewer_logprobs" | "extra_bos" | "perturb"`` makes every scoring answer wrong in that
way: no log-probs, one entry fewer than asked, a BOS token the client did not send, or the
log-probs of another model) and ``GET /admin/stats``. The server binds to 127.0.0.1 unless told
otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import logging
import os
import queue
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from mydistill.generation.base import Completion, GenerationRequest, Sampling
from mydistill.generation.hf import HFBackend

logger = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 256


class RequestError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status = status
        self.kind = kind


@dataclass
class _Job:
    message: str
    n: int
    sampling: Sampling
    done: threading.Event = field(default_factory=threading.Event)
    result: list[Completion] | None = None
    error: RequestError | None = None


SCORING_FAULTS = ("no_logprobs", "fewer_logprobs", "extra_bos", "perturb")


@dataclass
class _Scored:
    """One scored prompt: its ``token_ids`` (T,), and per position p the ``top_ids`` / ``top_logprobs``
    (T, k) of the next-token distribution after token p, the log-prob and rank of the token that
    follows (``next_logprob`` / ``next_rank`` (T-1,)), and the greedy next token after the prompt."""

    token_ids: list[int]
    top_ids: list[list[int]]
    top_logprobs: list[list[float]]
    next_logprob: list[float]
    next_rank: list[int]
    generated_id: int


@dataclass
class _ScoreJob:
    prompts: list[str | list[int]]
    add_special_tokens: bool
    top_k: int
    temperature: float | None  # applied to the log-probs, or None: raw log-probs
    fault: str | None = None
    done: threading.Event = field(default_factory=threading.Event)
    result: list[_Scored] | None = None
    error: RequestError | None = None

    @property
    def n(self) -> int:
        return len(self.prompts)


class BatchingEngine:
    """Collects concurrent requests for a few milliseconds and decodes them as one batch.

    All tokenizer and model work happens on this one worker thread, so handler threads never
    share the tokenizer or the model.
    """

    def __init__(self, backend: HFBackend, *, max_batch_size: int = 32, max_wait_s: float = 0.01):
        self.backend = backend
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self._queue: queue.Queue[_Job] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="batching-engine", daemon=True)
        self._thread.start()

    def submit(self, job: Any, timeout: float | None = None) -> Any:
        self._queue.put(job)
        if not job.done.wait(timeout):
            raise RequestError(503, "generation timed out", "server_error")
        if job.error is not None:
            raise job.error
        assert job.result is not None
        return job.result

    def _loop(self) -> None:
        while True:
            jobs = [self._queue.get()]
            deadline = time.monotonic() + self.max_wait_s
            while sum(j.n for j in jobs) < self.max_batch_size:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    jobs.append(self._queue.get(timeout=remaining))
                except queue.Empty:
                    break
            scoring = [j for j in jobs if isinstance(j, _ScoreJob)]
            if scoring:
                self._score(scoring)
            groups: dict[Sampling, list[_Job]] = defaultdict(list)
            for job in jobs:
                if isinstance(job, _Job):
                    groups[job.sampling].append(job)
            for sampling, group in groups.items():
                self._run(group, sampling)

    def _run(self, jobs: list[_Job], sampling: Sampling) -> None:
        window = self.backend.context_window(0)
        requests, ready = [], []
        for job in jobs:
            try:
                prompt = self.backend.prepare(uuid.uuid4().hex, job.message)
                needed = (prompt.num_tokens or 0) + sampling.max_new_tokens
                if window is not None and needed > window:
                    raise RequestError(
                        400,
                        f"This model's maximum context length is {window} tokens. However, you requested {needed} "
                        f"tokens ({prompt.num_tokens} in the messages, {sampling.max_new_tokens} in the completion).",
                    )
                requests.append(GenerationRequest(prompt, tuple(range(job.n))))
                ready.append(job)
            except RequestError as e:
                job.error = e
                job.done.set()
            except Exception as e:  # reported to the client as a 500
                job.error = RequestError(500, f"{type(e).__name__}: {e}", "server_error")
                job.done.set()
        if not ready:
            return
        try:
            results = self.backend.generate(requests, sampling)
            for job, result in zip(ready, results, strict=True):
                job.result = result
        except Exception as e:
            logger.exception("generation failed")
            for job in ready:
                job.error = RequestError(500, f"{type(e).__name__}: {e}", "server_error")
        for job in ready:
            job.done.set()


    def _score(self, jobs: list[_ScoreJob]) -> None:
        import torch

        tokenizer, model = self.backend.tokenizer, self.backend.model
        window = self.backend.context_window(0)
        for job in jobs:
            try:
                sequences = []
                for prompt in job.prompts:
                    ids = list(prompt) if isinstance(prompt, list) else tokenizer(
                        prompt, add_special_tokens=job.add_special_tokens
                    )["input_ids"]
                    if job.fault == "extra_bos":  # a server that tokenizes differently from the client
                        ids = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else 0, *ids]
                    if not ids:
                        raise RequestError(400, "empty prompt")
                    if window is not None and len(ids) + 1 > window:
                        raise RequestError(
                            400, f"This model's maximum context length is {window} tokens. However, you requested "
                            f"{len(ids) + 1} tokens ({len(ids)} in the prompt, 1 in the completion).",
                        )
                    if max(ids) >= model.config.vocab_size or min(ids) < 0:
                        raise RequestError(400, f"token id out of range [0, {model.config.vocab_size})")
                    sequences.append(ids)
                scored = []
                for begin in range(0, len(sequences), self.max_batch_size):
                    scored += self._score_batch(sequences[begin : begin + self.max_batch_size], job, torch)
                job.result = scored
            except RequestError as e:
                job.error = e
            except Exception as e:  # reported to the client as a 500
                logger.exception("scoring failed")
                job.error = RequestError(500, f"{type(e).__name__}: {e}", "server_error")
            job.done.set()

    def _score_batch(self, sequences: list[list[int]], job: _ScoreJob, torch: Any) -> list[_Scored]:
        model = self.backend.model
        device = next(model.parameters()).device
        width = max(len(s) for s in sequences)
        input_ids = torch.zeros((len(sequences), width), dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for i, s in enumerate(sequences):  # right padding: causal attention keeps the real positions exact
            input_ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        with torch.inference_mode():
            logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits.float()
        if job.fault == "perturb":  # another model behind the same name
            logits = logits + 0.5 * torch.sin(torch.arange(logits.shape[-1], device=logits.device, dtype=logits.dtype))
        if job.temperature is not None and job.temperature > 0:
            logits = logits / job.temperature
        log_p = torch.log_softmax(logits, dim=-1)
        k = min(job.top_k, log_p.shape[-1])
        out = []
        for i, s in enumerate(sequences):
            lp = log_p[i, : len(s)]  # (T, V): row p is the distribution of the token after position p
            top_lp, top_ids = lp.topk(k, dim=-1)
            follow = torch.tensor(s[1:], device=lp.device, dtype=torch.long)
            next_lp = lp[:-1].gather(-1, follow[:, None]).squeeze(-1)
            next_rank = (lp[:-1] > next_lp[:, None]).sum(-1) + 1
            out.append(
                _Scored(
                    token_ids=list(s),
                    top_ids=top_ids.cpu().tolist(),
                    top_logprobs=top_lp.cpu().tolist(),
                    next_logprob=next_lp.cpu().tolist(),
                    next_rank=next_rank.cpu().tolist(),
                    generated_id=int(top_ids[-1, 0]),
                )
            )
        return out


class _Faults:
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


def make_handler(
    engine: BatchingEngine,
    model_name: str,
    *,
    api_key: str | None = None,
    faults: _Faults | None = None,
    request_timeout_s: float = 600.0,
    log_requests: bool = False,
    max_logprobs: int = 20,
    logprobs_mode: str = "raw",
) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "mydistill-serve"

        def log_message(self, format: str, *args: Any) -> None:
            if log_requests:  # the request line only: headers (and keys) are never logged
                logger.info("%s %s", self.address_string(), format % args)

        # -------------------------------------------------------------------------------------

        def _send(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, message: str, kind: str, headers: dict[str, str] | None = None) -> None:
            self._send(status, {"error": {"message": message, "type": kind, "code": status}}, headers)

        def _authorized(self) -> bool:
            if api_key is None:
                return True
            given = self.headers.get("Authorization", "")
            ok = hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode())
            if not ok:
                self._error(401, "invalid or missing API key", "authentication_error")
            return ok

        def _body(self) -> bytes:
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        # -------------------------------------------------------------------------------------

        def do_GET(self) -> None:
            if self.path == "/health":
                self._send(200, {"status": "ok"})
            elif self.path == "/v1/models":
                if self._authorized():
                    self._send(
                        200,
                        {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "mydistill"}]},
                    )
            elif self.path == "/admin/stats" and faults is not None:
                self._send(200, faults.stats())
            else:
                self._error(404, f"no route {self.path}", "not_found")

        def do_POST(self) -> None:
            body = self._body()
            if self.path == "/admin/faults" and faults is not None:
                spec = json.loads(body or b"{}")
                try:
                    faults.configure([int(s) for s in spec.get("statuses", [])], spec.get("retry_after"), spec.get("scoring"))
                except ValueError as e:
                    self._error(400, str(e), "invalid_request_error")
                    return
                self._send(200, {"status": "ok"})
                return
            if self.path not in ("/v1/chat/completions", "/v1/completions"):
                self._error(404, f"no route {self.path}", "not_found")
                return
            if not self._authorized():
                return
            if faults is not None:
                status = faults.check(body)
                if status is not None:
                    headers = (
                        {"Retry-After": f"{faults.retry_after:g}"}
                        if status == 429 and faults.retry_after is not None
                        else None
                    )
                    self._error(
                        status, f"injected fault {status}", "server_error" if status >= 500 else "rate_limit", headers
                    )
                    return
            try:
                self._send(200, self._chat(body) if self.path == "/v1/chat/completions" else self._completions(body))
            except RequestError as e:
                self._error(e.status, str(e), e.kind)

        def _chat(self, body: bytes) -> dict[str, Any]:
            try:
                request = json.loads(body)
            except json.JSONDecodeError as e:
                raise RequestError(400, f"request body is not JSON: {e}") from None
            if not isinstance(request, dict):
                raise RequestError(400, "request body must be a JSON object")
            if request.get("model") not in (None, model_name):
                raise RequestError(
                    404, f"The model {request.get('model')!r} does not exist (serving {model_name!r})", "not_found"
                )
            if request.get("stream"):
                raise RequestError(400, "stream=true is not supported by this server")
            message = _user_message(request.get("messages"))
            try:
                max_tokens = int(
                    request.get("max_completion_tokens") or request.get("max_tokens") or DEFAULT_MAX_TOKENS
                )
                temperature = float(request.get("temperature", 1.0))
                top_p = float(request.get("top_p", 1.0))
                n = int(request.get("n", 1))
                seed = int(request.get("seed") or 0)
            except (TypeError, ValueError) as e:
                raise RequestError(400, f"bad sampling parameter: {e}") from None
            if max_tokens < 1 or n < 1 or temperature < 0 or not 0 < top_p <= 1:
                raise RequestError(400, "need max_tokens >= 1, n >= 1, temperature >= 0 and 0 < top_p <= 1")
            sampling = Sampling(max_tokens, temperature, top_p, seed, ignore_eos=bool(request.get("ignore_eos", False)))
            completions = engine.submit(_Job(message, n, sampling), timeout=request_timeout_s)
            prompt_tokens = completions[0].prompt_tokens or 0
            return {
                "id": f"chatcmpl-{uuid.uuid4().hex}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model_name,
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

        def _completions(self, body: bytes) -> dict[str, Any]:
            """Scoring: the log-probs of the prompt's own tokens (echo / prompt_logprobs) and one greedy token."""
            request = _json_object(body)
            if request.get("model") not in (None, model_name):
                raise RequestError(
                    404, f"The model {request.get('model')!r} does not exist (serving {model_name!r})", "not_found"
                )
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
            fault = faults.scoring if faults is not None else None
            top_k = max(logprobs or 0, prompt_logprobs or 0)
            job = _ScoreJob(
                prompts, bool(request.get("add_special_tokens", True)), max(top_k, 1),
                temperature if logprobs_mode == "processed" else None, fault,
            )
            scored: list[_Scored] = engine.submit(job, timeout=request_timeout_s)
            if fault == "fewer_logprobs":
                top_k -= 1
            as_ids = bool(request.get("return_tokens_as_token_ids", False))
            tokenizer = engine.backend.tokenizer

            def name(token_id: int) -> str:
                return f"token_id:{token_id}" if as_ids else tokenizer.decode([token_id])

            choices = []
            for index, (prompt, sc) in enumerate(zip(prompts, scored, strict=True)):
                n = len(sc.token_ids)
                generated = [sc.generated_id] if max_tokens == 1 else []
                echoed = (tokenizer.decode(sc.token_ids) if isinstance(prompt, list) else prompt) if echo else ""
                choice: dict[str, Any] = {
                    "index": index,
                    "text": echoed + tokenizer.decode(generated),
                    "finish_reason": "length",
                    "logprobs": None,
                }
                if logprobs is not None and fault != "no_logprobs":
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
                    choice["logprobs"] = {
                        "tokens": [name(t) for t in tokens],
                        "token_logprobs": token_lps,
                        "top_logprobs": top,
                        "text_offset": offsets,
                    }
                if prompt_logprobs is not None:
                    entries: list[dict[str, Any] | None] = [None]
                    for r in range(n - 1):
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
                    choice["prompt_logprobs"] = entries
                if request.get("return_token_ids"):
                    choice["prompt_token_ids"] = sc.token_ids
                    choice["token_ids"] = generated
                choices.append(choice)
            prompt_tokens = sum(len(sc.token_ids) for sc in scored)
            completion_tokens = max_tokens * len(scored)
            return {
                "id": f"cmpl-{uuid.uuid4().hex}",
                "object": "text_completion",
                "created": int(time.time()),
                "model": model_name,
                "choices": choices,
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                },
            }

    return Handler


def _top_entries(sc: _Scored, row: int, k: int, name: Any, *, with_next: bool) -> dict[str, float]:
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


def make_server(
    model_dir: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    model_name: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    max_batch_size: int = 32,
    api_key: str | None = None,
    faults: _Faults | None = None,
    log_requests: bool = False,
    max_logprobs: int = 20,
    logprobs_mode: str = "raw",
) -> ThreadingHTTPServer:
    backend = HFBackend(model_dir, batch_size=max_batch_size, device=device, dtype=dtype)
    _ = backend.model  # load now, not on the first request
    engine = BatchingEngine(backend, max_batch_size=max_batch_size)
    name = model_name or os.path.basename(model_dir.rstrip("/"))
    handler = make_handler(
        engine, name, api_key=api_key, faults=faults, log_requests=log_requests, max_logprobs=max_logprobs,
        logprobs_mode=logprobs_mode,
    )
    server = ThreadingHTTPServer((host, port), handler, bind_and_activate=False)
    # the listen backlog must hold every connection a full batch invites (the default 5 reset the
    # rest of 32 concurrent clients)
    server.request_queue_size = max(128, 4 * max_batch_size)
    try:
        server.server_bind()
        server.server_activate()
    except BaseException:
        server.server_close()
        raise
    server.daemon_threads = True
    server.model_name = name  # type: ignore[attr-defined]
    return server


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mydistill.generation.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", required=True, help="local or s3:// model folder (save_pretrained, tokenizer inside)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port; 0 picks a free one (printed on start)")
    parser.add_argument("--model-name", default=None, help="name clients send as 'model' (default: folder name)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--max-batch-size", type=int, default=32, help="most sequences decoded together")
    parser.add_argument(
        "--api-key-env", default=None, help="require 'Authorization: Bearer $VAR' (the variable's name)"
    )
    parser.add_argument("--enable-admin", action="store_true", help="fault injection and stats endpoints (testing)")
    parser.add_argument("--faults", default="", help="comma-separated statuses each request gets first, e.g. 429,500")
    parser.add_argument("--retry-after", type=float, default=None, help="Retry-After seconds sent with injected 429s")
    parser.add_argument("--log-requests", action="store_true")
    parser.add_argument(
        "--max-logprobs", type=int, default=20, help="most log-probs per position a request may ask for (vLLM's default: 20)"
    )
    parser.add_argument(
        "--logprobs-mode", default="raw", choices=["raw", "processed"],
        help="'raw': log-probs of the model's logits (vLLM's default); 'processed': after the request's temperature",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            parser.error(f"--api-key-env {args.api_key_env}: that environment variable is not set")
    statuses = [int(s) for s in args.faults.split(",") if s.strip()]
    faults = _Faults(statuses, args.retry_after) if (args.enable_admin or statuses) else None
    server = make_server(
        args.model,
        host=args.host,
        port=args.port,
        model_name=args.model_name,
        device=args.device,
        dtype=args.dtype,
        max_batch_size=args.max_batch_size,
        api_key=api_key,
        faults=faults,
        log_requests=args.log_requests,
        max_logprobs=args.max_logprobs,
        logprobs_mode=args.logprobs_mode,
    )
    host, port = str(server.server_address[0]), server.server_address[1]
    name = server.model_name  # type: ignore[attr-defined]
    print(f"serving {name} at http://{host}:{port}/v1", flush=True)  # the tests wait for this line
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
