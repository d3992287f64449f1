"""The signal stage's client for a served teacher: scores prompts on an OpenAI-compatible ``/completions``
endpoint with bounded concurrency and retries (see :mod:`mydistill.signal.served` for the stage).

429/5xx/timeouts are retried with backoff honouring Retry-After by :mod:`mydistill.openai_client`;
401/403/404 and retries exhausted raise its :class:`~mydistill.openai_client.APIError`;
other 4xx refuse the prompts of that request (the reason comes back in place of the answer).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mydistill.config.generation import mask_url
from mydistill.config.signal import SignalConfig
from mydistill.openai_client import APIError, OpenAIClient, RetryableError, error_detail, run_sync

logger = logging.getLogger(__name__)


class ServedTeacherError(RuntimeError):
    """The served teacher cannot make this store; the message says why and what to do."""


@dataclass
class Scored:
    """What the server said about one prompt: the ids it read (None where it named none) and, per
    position, its listed next-token log-probs ``{token id: log-prob}`` (None: position 0, or none sent)."""

    token_ids: list[int | None] | None
    positions: list[dict[int, float] | None]
    model: str


class CompletionsScorer:
    """Scores prompts on an OpenAI-compatible ``/completions`` endpoint: bounded concurrency, retries.

    ``tokenizer`` (the student's) maps token strings back to ids when the server names tokens by
    text (servers without vLLM's ``return_tokens_as_token_ids``); a string several ids decode to
    maps to none, and the record using it is refused as misaligned.
    """

    def __init__(self, cfg: SignalConfig, *, model: str | None = None, tokenizer: Any = None, transport: Any = None):
        assert cfg.api_base
        self.cfg = cfg
        self.model = model or cfg.api_model
        self.client = OpenAIClient(
            cfg.api_base, api_key_env=cfg.api_key_env, timeout_s=cfg.timeout_s, max_retries=cfg.max_retries,
            backoff_s=cfg.backoff_s, setting="signal.api_base (the server must offer /completions)", model=self.model,
            transport=transport,
        )
        self.api_base = self.client.api_base
        self._piece_ids: dict[str, int | None] | None = None
        self.tokenizer = tokenizer

    def __repr__(self) -> str:  # never show the key
        return f"CompletionsScorer(api_base={mask_url(self.api_base)!r}, model={self.model!r})"

    def served_model(self) -> str:
        """``cfg.api_model``, checked against ``GET /models``; or the one model the server lists."""
        response = self.client.get_sync("models")
        names = [m.get("id") for m in (response.json().get("data") or []) if isinstance(m, dict)]
        if self.cfg.api_model:
            if names and self.cfg.api_model not in names:
                raise APIError(f"{mask_url(self.api_base)} does not serve signal.api_model {self.cfg.api_model!r}; it serves {names}")
            self.model = self.cfg.api_model
        elif len(names) == 1:
            self.model = names[0]
        else:
            raise APIError(f"{mask_url(self.api_base)} serves {names or 'no models'}; name one as signal.api_model")
        self.client.model = self.model
        return self.model

    # ------------------------------------------------------------------------------------------

    def score(
        self, prompts: Sequence[str | list[int]], *, add_special_tokens: bool, temperature: float
    ) -> list[Scored | str]:
        """One :class:`Scored` per prompt, or the reason (a string) the server refused that prompt."""
        return run_sync(self._score_all(list(prompts), add_special_tokens, temperature))

    async def _score_all(self, prompts: list[str | list[int]], add_special_tokens: bool, temperature: float) -> list[Any]:
        size = self.cfg.api_batch_size
        batches = [prompts[i : i + size] for i in range(0, len(prompts), size)]
        semaphore = asyncio.Semaphore(self.cfg.concurrency)
        async with self.client.async_client(self.cfg.concurrency) as client:

            async def one(batch: list[str | list[int]]) -> list[Any]:
                async with semaphore:
                    body = self._body(batch, add_special_tokens, temperature)
                    return await self.client.post(
                        client, "completions", body, lambda response: self._parse(response, len(batch)), label="scoring request"
                    )

            tasks = [asyncio.ensure_future(one(b)) for b in batches]
            try:
                results = await asyncio.gather(*tasks)
            except BaseException:
                for task in tasks:  # the first fatal error stops the shard
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise
        return [r for batch in results for r in batch]

    def _body(self, batch: list[str | list[int]], add_special_tokens: bool, temperature: float) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "prompt": batch[0] if len(batch) == 1 else batch,
            "max_tokens": 1,  # vLLM refuses 0; the one generated token is dropped
            "temperature": temperature,
            "add_special_tokens": add_special_tokens,  # vLLM extension: the client's ids decide specials
        }
        if self.cfg.logprobs_mode == "echo":
            body.update(echo=True, logprobs=self.cfg.k, return_tokens_as_token_ids=True)
        else:
            body.update(prompt_logprobs=self.cfg.k, return_token_ids=True)
        return body

    def _parse(self, response: Any, n: int) -> list[Scored | str]:
        """A 200's choices, one per prompt; a 4xx (the client let it through) refuses these prompts, named."""
        status = response.status_code
        if status != 200:  # about these prompts (too long, too many log-probs asked)
            return [f"HTTP {status}: {self.client.redact(error_detail(response))}"] * n
        try:
            data = response.json()
            choices = sorted(data["choices"], key=lambda c: c.get("index", 0))
            model = str(data.get("model") or self.model)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise RetryableError(f"malformed response ({type(e).__name__}: {e})") from None
        if len(choices) != n:
            raise ServedTeacherError(f"{mask_url(self.client.url('completions'))} answered {len(choices)} choices for {n} prompts")
        return [self._choice(c, model) for c in choices]

    def _choice(self, choice: dict[str, Any], model: str) -> Scored | str:
        if self.cfg.logprobs_mode == "prompt_logprobs":
            entries = choice.get("prompt_logprobs")
            if not isinstance(entries, list):
                return "no log-probs in the answer (prompt_logprobs missing: does the server support vLLM's prompt_logprobs?)"
            positions = [
                None if not isinstance(e, dict) else {int(t): float(v["logprob"] if isinstance(v, dict) else v) for t, v in e.items()}
                for e in entries
            ]
            ids = choice.get("prompt_token_ids")
            return Scored([int(t) for t in ids] if isinstance(ids, list) else None, positions, model)
        logprobs = choice.get("logprobs")
        if not isinstance(logprobs, dict) or not isinstance(logprobs.get("top_logprobs"), list):
            return "no log-probs in the answer (logprobs missing: does the server support echo with logprobs?)"
        tokens = [self._token_id(t) for t in logprobs.get("tokens") or []]
        positions = [
            None if not isinstance(e, dict) else {i: float(v) for t, v in e.items() if (i := self._token_id(t)) is not None}
            for e in logprobs["top_logprobs"]
        ]
        return Scored(tokens, positions, model)

    def _token_id(self, name: str) -> int | None:
        """A token named ``token_id:N`` (vLLM's return_tokens_as_token_ids) or by its text."""
        if name.startswith("token_id:"):
            return int(name.split(":", 1)[1])
        if self.tokenizer is None:
            return None
        if self._piece_ids is None:
            table: dict[str, int | None] = {}
            for i in range(len(self.tokenizer)):
                piece = self.tokenizer.decode([i])
                table[piece] = None if piece in table else i  # ambiguous text names no id
            self._piece_ids = table
        return self._piece_ids.get(name)
