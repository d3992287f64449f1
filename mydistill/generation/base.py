"""The interface every teacher backend implements, and the pieces they share.

A backend turns prepared prompts into completions. The stage (:mod:`.stage`) owns everything
around it: reading prompts, resume, shards, statuses, the manifest. So a new backend only has to
implement :meth:`TeacherBackend.generate` (and, when it has a local tokenizer, use
:class:`ChatFormatter` so overlong prompts can be counted and truncated before any request).
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

FinishReason = Literal["stop", "length", "error"]
ProgressCallback = Callable[[int], None]


@dataclass(frozen=True)
class Sampling:
    """Decoding parameters shared by all backends (OpenAI semantics: no top-k, no penalties)."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    # Generate exactly max_new_tokens (benchmarks need equal lengths); never set by the stage.
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class PreparedPrompt:
    """One prompt as a backend sends it.

    ``message`` is the user message (the rationale template already applied); ``text`` and
    ``token_ids`` are its chat-formatted form when a local tokenizer is known (hf, vllm, and
    openai when a tokenizer was passed), else None.
    """

    key: str
    message: str
    text: str | None = None
    token_ids: list[int] | None = None
    truncated: bool = False

    @property
    def num_tokens(self) -> int | None:
        return None if self.token_ids is None else len(self.token_ids)


@dataclass
class GenerationRequest:
    """Make ``len(sample_indices)`` responses for one prompt."""

    prompt: PreparedPrompt
    sample_indices: tuple[int, ...] = (0,)


@dataclass
class Completion:
    text: str
    finish_reason: FinishReason
    prompt_tokens: int | None = None
    completion_tokens: int = 0
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class TeacherBackend(ABC):
    """Generates responses for batches of prepared prompts.

    ``formatter`` is the local chat formatter, or None when prompts are formatted remotely
    (an API without a local tokenizer): then no token counts are known before generation.
    """

    name: str = "base"
    formatter: ChatFormatter | None = None

    def context_window(self, max_new_tokens: int) -> int | None:
        """Longest prompt (in tokens) the teacher accepts with ``max_new_tokens`` to generate."""
        return None

    def prepare(self, key: str, message: str) -> PreparedPrompt:
        if self.formatter is None:
            return PreparedPrompt(key=key, message=message)
        return self.formatter.prepare(key, message)

    def truncate(self, prompt: PreparedPrompt, max_tokens: int) -> PreparedPrompt | None:
        """``prompt`` cut from the left to at most ``max_tokens`` formatted tokens (None if impossible)."""
        if self.formatter is None:
            return prompt
        return self.formatter.truncate_left(prompt, max_tokens)

    @abstractmethod
    def generate(
        self,
        requests: Sequence[GenerationRequest],
        sampling: Sampling,
        on_progress: ProgressCallback | None = None,
    ) -> list[list[Completion]]:
        """One list of completions per request, in request order, one per sample index.

        A failure that concerns a single prompt is returned as a Completion with
        finish_reason='error'; a failure of the teacher itself (unreachable API, bad credentials)
        is raised, so the stage stops and keeps what it has written.
        ``on_progress(k)`` is called as k more completions are done.
        """

    def close(self) -> None:  # noqa: B027 - optional hook, deliberately not abstract
        """Release the model / connections (optional)."""


class ChatFormatter:
    """Formats prompts with a tokenizer's chat template and counts / truncates them in tokens."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.has_template = bool(getattr(tokenizer, "chat_template", None))

    def format(self, message: str) -> str:
        # the same text the student is trained on (mydistill.tokenization), so prompts at
        # generation and training time never differ
        from mydistill.tokenization import format_prompt

        return format_prompt(self.tokenizer, message)

    def encode(self, text: str) -> list[int]:
        # A chat template writes its own BOS (if any) into the text; a raw prompt gets the
        # tokenizer's usual special tokens, as in a plain tokenizer(prompt) call.
        return list(self.tokenizer(text, add_special_tokens=not self.has_template)["input_ids"])

    def prepare(self, key: str, message: str) -> PreparedPrompt:
        text = self.format(message)
        return PreparedPrompt(key=key, message=message, text=text, token_ids=self.encode(text))

    def truncate_left(self, prompt: PreparedPrompt, max_tokens: int) -> PreparedPrompt | None:
        """Drop tokens from the start of the *message* (not of the template) until it fits."""
        assert prompt.token_ids is not None
        if len(prompt.token_ids) <= max_tokens:
            return prompt
        message_ids = self.tokenizer(prompt.message, add_special_tokens=False)["input_ids"]
        overhead = len(prompt.token_ids) - len(message_ids)
        keep = max_tokens - overhead
        # Re-tokenising decoded text can shift a token or two at the cut: shrink until it fits.
        while keep > 0:
            message = self.tokenizer.decode(message_ids[-keep:], skip_special_tokens=False)
            candidate = self.prepare(prompt.key, message)
            if len(candidate.token_ids or ()) <= max_tokens:
                candidate.truncated = True
                return candidate
            keep -= max(1, len(candidate.token_ids or ()) - max_tokens)
        return None


def stable_seed(*parts: Any) -> int:
    """A 31-bit seed derived from ``parts`` (stable across processes, unlike hash())."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def eos_token_ids(tokenizer: Any, generation_config: Any = None) -> list[int]:
    """Every token id that ends a response: the generation config's eos ids plus the tokenizer's."""
    ids: list[int] = []
    for source in (getattr(generation_config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if source is None:
            continue
        for i in source if isinstance(source, (list, tuple)) else [source]:
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    return ids
