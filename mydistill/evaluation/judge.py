"""The ``judge`` metric: an OpenAI-compatible chat model grades answers.

Two modes (``evaluate.judge.mode``):

- ``reference``: "is this answer correct, given the reference?" → 1 (CORRECT) or 0;
- ``pairwise``: "which answer is better?" for the model's answer against the teacher's, asked
  twice with the order swapped so that a judge preferring the first (or second) position cancels
  out (Zheng et al. 2023, "Judging LLM-as-a-judge", §3.4): 1 per win, 0.5 per tie, averaged over
  the orders that got a readable verdict.

The API key comes from the environment variable ``api_key_env`` (never from the config).
Verdicts are cached by (judge model, mode, prompt text) in a JSONL file, so a re-run asks only
for what it has not seen. Requests go through :mod:`mydistill.openai_client` (429/5xx and dropped
connections retried with backoff, Retry-After honoured, the key redacted). Failures do not stop the evaluation but are counted in ``stats``
(``http_4xx``, ``http_5xx``, ``unreachable``, ``unreadable`` replies) and the first one is kept
as a sentence; when no request at all gets a readable verdict the judge raises
:class:`JudgeError` with that sentence, rather than scoring everything 0.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from mydistill import io
from mydistill.openai_client import APIError, OpenAIClient, error_detail

CACHE_FILE = "verdicts.jsonl"

REFERENCE_PROMPT = (
    "You grade answers to questions.\n"
    "Question: {prompt}\nReference answer: {reference}\nCandidate answer: {answer}\n"
    "Does the candidate answer give the same answer as the reference (wording may differ)? "
    "Reply with one word: CORRECT or INCORRECT."
)
PAIRWISE_PROMPT = (
    "You compare two answers to a question.\n"
    "Question: {prompt}\nReference answer: {reference}\nAnswer A: {first}\nAnswer B: {second}\n"
    "Which answer is better? Reply with one word: A, B or TIE."
)


class JudgeError(RuntimeError):
    """The judge could not grade anything (every request failed or was unreadable)."""


def judge_cache_uri(work_dir: str) -> str:
    return io.join(work_dir, "judge-cache")


def parse_reference_verdict(text: str) -> float | None:
    """1.0 for CORRECT, 0.0 for INCORRECT, None when the reply says neither (or both)."""
    words = set(re.findall(r"[a-z]+", text.lower()))
    correct, incorrect = "correct" in words, "incorrect" in words or "wrong" in words
    if correct == incorrect:
        return None
    return 1.0 if correct else 0.0


def parse_pairwise_verdict(text: str) -> str | None:
    """'A', 'B' or 'TIE' from the reply's first word; None otherwise."""
    match = re.match(r"\W*(tie|a|b)\b", text.strip(), re.IGNORECASE)
    return match.group(1).upper() if match else None


class Judge:
    """Callable ``(prompts, answers, references, teacher_answers) -> scores`` for evaluate_models."""

    def __init__(self, cfg: Any, *, cache_uri: str | None = None, transport: Any = None):
        self.cfg = cfg
        self.cache_uri = cache_uri
        self.client = OpenAIClient(
            cfg.base_url, api_key_env=cfg.api_key_env, timeout_s=cfg.timeout_s, max_retries=cfg.max_retries,
            backoff_s=0.2, setting="evaluate.judge.base_url", model=cfg.model, transport=transport,
        )
        self.cache: dict[str, str] = {}
        if cache_uri and io.exists(io.join(cache_uri, CACHE_FILE)):
            self.cache = {r["key"]: r["reply"] for r in io.read_records(io.join(cache_uri, CACHE_FILE))}
        self.stats: dict[str, Any] = {
            "requests": 0, "cached": 0, "http_4xx": 0, "http_5xx": 0, "unreachable": 0, "unreadable": 0, "first_error": None,
        }

    # -- one request -------------------------------------------------------------------------

    def _note(self, kind: str, message: str) -> None:
        self.stats[kind] += 1
        if self.stats["first_error"] is None:
            self.stats["first_error"] = message

    def ask(self, content: str) -> str | None:
        """The judge's reply to one user message (cached), or None after a counted failure."""
        key = io.sha256_of([self.cfg.model, self.cfg.mode, content])
        if key in self.cache:
            self.stats["cached"] += 1
            return self.cache[key]
        body = {"model": self.cfg.model, "messages": [{"role": "user", "content": content}], "max_tokens": 8,
                "temperature": 0.0}
        where = f"judge at {self.cfg.base_url}"

        def count() -> None:
            self.stats["requests"] += 1

        try:
            response = self.client.post_sync("chat/completions", body, lambda r: r, label="judge request", on_attempt=count)
        except APIError as e:
            if e.status is None:
                self._note("unreachable", f"{where} unreachable: {e}")
            else:
                self._note("http_5xx" if e.status >= 500 else "http_4xx", f"{where}: {e}")
            return None
        if response.status_code != 200:  # a 4xx about this request
            self._note("http_4xx", f"{where} answered HTTP {response.status_code}: {self.client.redact(error_detail(response))}")
            return None
        try:
            reply = response.json()["choices"][0]["message"]["content"]
            if not isinstance(reply, str):
                raise TypeError("content is not text")
        except (ValueError, KeyError, IndexError, TypeError) as e:
            self._note("unreadable", f"{where} sent a reply that is not a chat completion ({e})")
            return None
        self.cache[key] = reply
        return reply

    # -- grading -----------------------------------------------------------------------------

    def _verdict_reference(self, prompt: str, answer: str, reference: str) -> float | None:
        reply = self.ask(REFERENCE_PROMPT.format(prompt=prompt, reference=reference, answer=answer))
        if reply is None:
            return None
        verdict = parse_reference_verdict(reply)
        if verdict is None:
            self._note("unreadable", f"judge reply is neither CORRECT nor INCORRECT: {reply[:80]!r}")
        return verdict

    def _verdict_pairwise(self, prompt: str, answer: str, teacher_answer: str, reference: str) -> float | None:
        scores = []
        for first, second, model_is in ((answer, teacher_answer, "A"), (teacher_answer, answer, "B")):
            reply = self.ask(PAIRWISE_PROMPT.format(prompt=prompt, reference=reference, first=first, second=second))
            if reply is None:
                continue
            verdict = parse_pairwise_verdict(reply)
            if verdict is None:
                self._note("unreadable", f"judge reply is not A, B or TIE: {reply[:80]!r}")
                continue
            scores.append(0.5 if verdict == "TIE" else float(verdict == model_is))
        return sum(scores) / len(scores) if scores else None

    def __call__(
        self, prompts: Sequence[str], answers: Sequence[str], references: Sequence[str],
        teacher_answers: Sequence[str] | None,
    ) -> list[float]:
        verdicts: list[float | None] = []
        for i, (prompt, answer, reference) in enumerate(zip(prompts, answers, references, strict=True)):
            if self.cfg.mode == "pairwise":
                if teacher_answers is None:
                    raise JudgeError("judge mode pairwise compares with the teacher's answers, but no teacher was evaluated")
                verdicts.append(self._verdict_pairwise(prompt, answer, teacher_answers[i], reference))
            else:
                verdicts.append(self._verdict_reference(prompt, answer, reference))
        self._save_cache()
        if verdicts and all(v is None for v in verdicts):
            raise JudgeError(
                f"the judge graded none of {len(verdicts)} answers: {self.stats['first_error']} "
                f"(counts: {self.summary()})"
            )
        # an answer the judge could not grade counts as not correct / not better (counted in stats)
        return [v if v is not None else 0.0 for v in verdicts]

    def summary(self) -> dict[str, Any]:
        return {k: v for k, v in self.stats.items() if v}

    def _save_cache(self) -> None:
        if self.cache_uri and self.cache:
            io.write_records(io.join(self.cache_uri, CACHE_FILE), [{"key": k, "reply": v} for k, v in self.cache.items()])


def make_judge(cfg: Any, *, cache_uri: str | None = None) -> Judge:
    return Judge(cfg, cache_uri=cache_uri)

