"""The server's engine: one worker thread that decodes (or scores) the requests that arrive together.

Chat requests become :class:`ChatJob` (decoded in groups of equal sampling settings through
:class:`~mydistill.generation.hf.HFBackend`); scoring requests become :class:`ScoreJob` (one forward
pass per batch, the top-k log-probs of every position). See :mod:`mydistill.generation.serve`.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from mydistill.generation.base import Completion, GenerationRequest, Sampling
from mydistill.generation.hf import HFBackend

logger = logging.getLogger(__name__)


class RequestError(Exception):
    """A request the server answers with an error: HTTP ``status``, OpenAI's error ``kind``."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status = status
        self.kind = kind


@dataclass
class ChatJob:
    message: str
    n: int
    sampling: Sampling
    done: threading.Event = field(default_factory=threading.Event)
    result: list[Completion] | None = None
    error: RequestError | None = None


# the ways the admin endpoint can make every scoring answer wrong (see mydistill.generation.serve)
SCORING_FAULTS = ("no_logprobs", "fewer_logprobs", "extra_bos", "perturb")


@dataclass
class ScoredPrompt:
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
class ScoreJob:
    prompts: list[str | list[int]]
    add_special_tokens: bool
    top_k: int
    temperature: float | None  # applied to the log-probs, or None: raw log-probs
    fault: str | None = None
    done: threading.Event = field(default_factory=threading.Event)
    result: list[ScoredPrompt] | None = None
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
        self._queue: queue.Queue[ChatJob | ScoreJob] = queue.Queue()
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
            scoring = [j for j in jobs if isinstance(j, ScoreJob)]
            if scoring:
                self._score(scoring)
            groups: dict[Sampling, list[ChatJob]] = defaultdict(list)
            for job in jobs:
                if isinstance(job, ChatJob):
                    groups[job.sampling].append(job)
            for sampling, group in groups.items():
                self._run(group, sampling)

    def _run(self, jobs: list[ChatJob], sampling: Sampling) -> None:
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

    def _score(self, jobs: list[ScoreJob]) -> None:
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

    def _score_batch(self, sequences: list[list[int]], job: ScoreJob, torch: Any) -> list[ScoredPrompt]:
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
                ScoredPrompt(
                    token_ids=list(s),
                    top_ids=top_ids.cpu().tolist(),
                    top_logprobs=top_lp.cpu().tolist(),
                    next_logprob=next_lp.cpu().tolist(),
                    next_rank=next_rank.cpu().tolist(),
                    generated_id=int(top_ids[-1, 0]),
                )
            )
        return out
