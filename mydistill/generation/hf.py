"""Batched generation with Hugging Face transformers (the default backend).

Why it is fast compared with one ``model.generate`` call per prompt: prompts are sorted by length
and decoded in left-padded batches, so each decoding step runs ``batch_size`` sequences through
the model for roughly the price of one (the KV cache keeps each step to one new token). Sorting
keeps padding — work spent on nothing — small.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import Any

from mydistill.generation.base import (
    ChatFormatter,
    Completion,
    GenerationRequest,
    ProgressCallback,
    Sampling,
    TeacherBackend,
    eos_token_ids,
    stable_seed,
)

logger = logging.getLogger(__name__)


def resolve_device(device: str = "auto") -> str:
    import torch

    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_tokenizer(teacher: str) -> Any:
    from mydistill.models import load_tokenizer as load

    return load(teacher)


def load_teacher(teacher: str, *, device: str = "auto", dtype: str = "auto") -> Any:
    """The teacher model from a local or ``s3://`` folder written by ``save_pretrained``, in eval mode."""
    from mydistill.models import load_model

    device = resolve_device(device)
    return load_model(teacher, dtype=dtype, device=device).eval()


def _is_oom(error: BaseException) -> bool:
    import torch

    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


class HFBackend(TeacherBackend):
    """Left-padded, length-sorted, batched ``model.generate`` with the KV cache.

    ``model`` / ``tokenizer`` may be passed already loaded; otherwise they are loaded from
    ``teacher`` (the tokenizer at once, the model on first use so that a resumed run with nothing
    left to do never loads it).
    """

    name = "hf"

    def __init__(
        self,
        teacher: str | None = None,
        *,
        model: Any = None,
        tokenizer: Any = None,
        batch_size: int = 64,
        device: str = "auto",
        dtype: str = "auto",
    ):
        if teacher is None and (model is None or tokenizer is None):
            raise ValueError("HFBackend needs a teacher folder, or both model and tokenizer")
        self.teacher = teacher
        self.batch_size = batch_size
        self.device = device
        self.dtype = dtype
        self._model = model
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(teacher)  # type: ignore[arg-type]
        self.formatter = ChatFormatter(self.tokenizer)

    # ------------------------------------------------------------------------------------------

    @property
    def model(self) -> Any:
        if self._model is None:
            logger.info("loading teacher %s", self.teacher)
            self._model = load_teacher(self.teacher, device=self.device, dtype=self.dtype)  # type: ignore[arg-type]
        elif self.device != "auto" and str(self._model.device) != self.device:
            self._model = self._model.to(self.device)
        return self._model

    def _model_config(self) -> Any:
        if self._model is not None:
            return self._model.config
        from transformers import AutoConfig

        from mydistill.io import localize

        return AutoConfig.from_pretrained(localize(self.teacher))  # type: ignore[arg-type]

    def context_window(self, max_new_tokens: int) -> int | None:
        config = self._model_config()
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        limit = getattr(text_config, "max_position_embeddings", None)
        return None if limit is None else int(limit) - max_new_tokens

    # ------------------------------------------------------------------------------------------

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        sampling: Sampling,
        on_progress: ProgressCallback | None = None,
    ) -> list[list[Completion]]:
        # One row per sequence to decode. Greedy samples are identical, so a prompt decodes once
        # and its result is copied to every sample index asked for.
        rows: list[tuple[int, int | None]] = []
        for r, request in enumerate(requests):
            if request.prompt.token_ids is None:
                raise ValueError(f"prompt {request.prompt.key!r} was not tokenized (use HFBackend.prepare)")
            if sampling.greedy:
                rows.append((r, None))
            else:
                rows.extend((r, slot) for slot in range(len(request.sample_indices)))
        # Longest first: an out-of-memory shows up in the first batch, not after an hour.
        rows.sort(key=lambda row: -len(requests[row[0]].prompt.token_ids or ()))

        results: list[list[Completion | None]] = [[None] * len(q.sample_indices) for q in requests]
        start = 0
        while start < len(rows):
            batch = rows[start : start + self.batch_size]
            fits: list[int] = []
            completions = self._generate_rows(
                [requests[r].prompt.token_ids for r, _ in batch], sampling, requests, batch, fits
            )
            if 0 in fits:
                # Out of memory somewhere in this batch: go on with the largest part that fitted.
                # Rows come longest first, so later batches need less memory than this one did.
                fitted = max(1, max(fits))
                if fitted < self.batch_size:
                    logger.warning("out of memory with %d sequences per batch; continuing with %d", len(batch), fitted)
                    self.batch_size = fitted
            done = 0
            for (r, slot), completion in zip(batch, completions, strict=True):
                slots = range(len(requests[r].sample_indices)) if slot is None else [slot]
                for s in slots:
                    results[r][s] = Completion(**{**completion.__dict__, "extra": dict(completion.extra)})
                    done += 1
            start += len(batch)
            if on_progress:
                on_progress(done)
        return [[c for c in per_request if c is not None] for per_request in results]

    def _generate_rows(
        self,
        token_ids: list[Any],
        sampling: Sampling,
        requests: Sequence[GenerationRequest],
        batch: list[tuple[int, int | None]],
        fits: list[int],
    ) -> list[Completion]:
        """Decode one batch; on out-of-memory split it in halves (down to one row, which is then failed).

        ``fits`` collects the size of every part that decoded, and a 0 for every part that ran out
        of memory.
        """
        try:
            seed = stable_seed(sampling.seed, *(requests[r].prompt.key for r, _ in batch[:4]), len(batch))
            completions = self._generate_batch(token_ids, sampling, seed)
        except Exception as e:  # only out-of-memory is handled, the rest re-raised
            if not _is_oom(e):
                raise
            _empty_cache()
            fits.append(0)
            if len(token_ids) == 1:
                key = requests[batch[0][0]].prompt.key
                logger.error("out of memory on a single prompt (%s); marked failed", key)
                return [
                    Completion(
                        text="", finish_reason="error", prompt_tokens=len(token_ids[0]), error=f"out of memory: {e}"
                    )
                ]
            half = len(token_ids) // 2
            return self._generate_rows(token_ids[:half], sampling, requests, batch[:half], fits) + self._generate_rows(
                token_ids[half:], sampling, requests, batch[half:], fits
            )
        fits.append(len(token_ids))
        return completions

    def _generate_batch(self, token_ids: list[Any], sampling: Sampling, seed: int) -> list[Completion]:
        import torch
        from transformers import GenerationConfig

        model, tokenizer = self.model, self.tokenizer
        eos_ids = eos_token_ids(tokenizer, model.generation_config)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos_ids[0] if eos_ids else 0)

        # Left padding: every prompt ends at the same column, so the new tokens line up after it.
        width = max(len(ids) for ids in token_ids)
        input_ids = torch.full((len(token_ids), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(token_ids), width), dtype=torch.long)
        for i, ids in enumerate(token_ids):
            input_ids[i, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention_mask[i, width - len(ids) :] = 1

        sample = not sampling.greedy
        config = GenerationConfig(
            max_new_tokens=sampling.max_new_tokens,
            min_new_tokens=sampling.max_new_tokens if sampling.ignore_eos else None,
            do_sample=sample,
            temperature=sampling.temperature if sample else 1.0,
            top_p=sampling.top_p if sample else 1.0,
            # OpenAI / vLLM semantics: temperature and top-p only (transformers defaults to top_k=50)
            top_k=0 if sample else None,
            num_beams=1,
            use_cache=True,
            pad_token_id=pad_id,
            eos_token_id=eos_ids or None,
        )
        device = model.device
        with torch.inference_mode(), _neutral_generation_config(model), _seeded(seed, device):
            out = model.generate(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), generation_config=config
            )
        new_tokens = out[:, width:].tolist()
        del out

        cut: list[list[int]] = []
        completions: list[Completion] = []
        eos = set(eos_ids)
        for ids, row in zip(token_ids, new_tokens, strict=True):
            stop = next((i for i, t in enumerate(row) if t in eos), None)
            if stop is None:
                cut.append(row)
                # A row that is shorter than max_new_tokens without an eos cannot happen unless
                # the model's own length limit stopped it; either way the response was cut.
                completions.append(
                    Completion(text="", finish_reason="length", prompt_tokens=len(ids), completion_tokens=len(row))
                )
            else:
                cut.append(row[:stop])
                # The eos token counts as generated, as in the OpenAI / vLLM usage numbers.
                completions.append(
                    Completion(text="", finish_reason="stop", prompt_tokens=len(ids), completion_tokens=stop + 1)
                )
        for completion, text in zip(
            completions, self.tokenizer.batch_decode(cut, skip_special_tokens=True), strict=True
        ):
            completion.text = text
        return completions


@contextlib.contextmanager
def _neutral_generation_config(model: Any) -> Iterator[None]:
    """Hide the teacher's saved generation defaults (repetition_penalty, top_k, min_p, ...) during generate.

    transformers fills every parameter we leave unset from ``model.generation_config``; the stage
    promises that only the sampling parameters in its config apply, on every backend alike.
    """
    from transformers import GenerationConfig

    saved = model.generation_config
    model.generation_config = GenerationConfig(
        bos_token_id=saved.bos_token_id, eos_token_id=saved.eos_token_id, pad_token_id=saved.pad_token_id
    )
    try:
        yield
    finally:
        model.generation_config = saved


@contextlib.contextmanager
def _seeded(seed: int, device: Any) -> Iterator[None]:
    """Seed torch for one batch without disturbing the caller's random state."""
    import torch

    devices = [device] if getattr(device, "type", str(device)).startswith("cuda") else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _empty_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
