"""Turning (prompt, response) records into model inputs through the tokenizer's chat template.

Loss is taken only on response tokens: the prompt (and any template text before the response)
gets label ``IGNORE_INDEX``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

IGNORE_INDEX = -100
# Manifest key of a checkpoint trained to answer prompts behind a task prefix (distilling
# step-by-step's label prefix); training from it (fine-tuning) and evaluating it use the same prefix.
PROMPT_PREFIX_KEY = "prompt_prefix"


def with_prefix(prefix: str, prompt: str) -> str:
    """The user message of a task-prefixed example: the prefix, then the prompt (inside the chat turn)."""
    return prefix + prompt


def prompt_prefix_of(model_uri: str | None) -> str:
    """The task prefix the checkpoint at ``model_uri`` answers after ('' for any other model)."""
    if not model_uri:
        return ""
    from mydistill import io

    return str((io.read_manifest(model_uri) or {}).get(PROMPT_PREFIX_KEY) or "")


def format_prompt(tokenizer: Any, prompt: str) -> str:
    """The text the model sees before its response: the chat template with a generation prompt."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
    return prompt + "\n"


def format_response(tokenizer: Any, prompt: str, response: str) -> str:
    """The text after :func:`format_prompt` for a whole exchange (response plus end-of-turn)."""
    if getattr(tokenizer, "chat_template", None):
        prefix = format_prompt(tokenizer, prompt)
        full = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
            tokenize=False,
        )
        if not full.startswith(prefix):
            raise ValueError(
                "the tokenizer's chat template renders the prompt differently with and without the "
                "assistant turn, so response tokens cannot be located; use a template whose "
                "generation prompt is a prefix of the full conversation"
            )
        return full[len(prefix) :]
    return response + (tokenizer.eos_token or "")


@dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]


def tokenize_example(tokenizer: Any, prompt: str, response: str, max_length: int) -> TokenizedExample:
    """Token ids for prompt+response with labels masked to the response.

    The two parts are tokenized separately so no merge crosses the boundary and the mask is
    exact. Overlong examples lose the end of the response (the prompt is kept whole); an example
    whose prompt alone fills ``max_length`` keeps no response tokens and is rejected.
    """
    # A chat template writes its own BOS (if any) into the text; a plain prompt gets the
    # tokenizer's usual special tokens, as at generation time (mydistill.generation.base).
    has_template = bool(getattr(tokenizer, "chat_template", None))
    prompt_ids = tokenizer(format_prompt(tokenizer, prompt), add_special_tokens=not has_template)["input_ids"]
    response_ids = tokenizer(format_response(tokenizer, prompt, response), add_special_tokens=False)["input_ids"]
    if len(prompt_ids) >= max_length:
        raise ValueError(
            f"prompt of {len(prompt_ids)} tokens leaves no room for a response within "
            f"max_length={max_length}: {prompt[:60]!r}"
        )
    response_ids = response_ids[: max_length - len(prompt_ids)]
    return TokenizedExample(
        input_ids=prompt_ids + response_ids,
        labels=[IGNORE_INDEX] * len(prompt_ids) + response_ids,
    )


def collate(examples: Sequence[TokenizedExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: ``input_ids``, ``attention_mask`` and ``labels`` of shape (B, T)."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Labels aligned with hidden states: position i predicts token i+1; the last predicts nothing."""
    shifted = torch.full_like(labels, IGNORE_INDEX)
    shifted[..., :-1] = labels[..., 1:]
    return shifted


def tokenizer_sha256(tokenizer: Any) -> str:
    """A hash of what decides token ids: vocabulary, merges, normalizer and pre-tokenizer, added and
    special tokens, and the chat template (which decides what text is tokenized).

    Padding/truncation settings are left out: they do not change which id a string gets. Stable
    across ``save_pretrained`` / ``from_pretrained``.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec: dict[str, Any] = json.loads(backend.to_str())
        spec.pop("truncation", None)
        spec.pop("padding", None)
    else:
        spec = {"vocab": sorted(tokenizer.get_vocab().items())}
    special = {name: str(getattr(tokenizer, name, None)) for name in ("bos_token", "eos_token", "pad_token", "unk_token")}
    content = {"tokenizer": spec, "special": special, "chat_template": getattr(tokenizer, "chat_template", None)}
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


def length_report(
    records: Sequence[dict[str, Any]], tokenizer: Any, *, max_length: int | None = None, percentile: float = 0.99,
    cap: int = 1024, prompt_prefix: str = "",
) -> dict[str, Any]:
    """The ``max_length`` a training set needs and what does not fit in it.

    With ``max_length`` None it is chosen from the data: the ``percentile`` of prompt+response
    token counts (template and end-of-turn included), raised to fit the longest prompt with room
    for a response token, and capped at ``cap``. Counts ``truncated_responses`` (the response is
    cut) and ``dropped_prompts`` (the prompt alone fills ``max_length``: no response is left).
    """
    has_template = bool(getattr(tokenizer, "chat_template", None))
    prompts, totals = [], []
    for r in records:
        prompt = with_prefix(prompt_prefix, r["prompt"])
        p = len(tokenizer(format_prompt(tokenizer, prompt), add_special_tokens=not has_template)["input_ids"])
        t = p + len(tokenizer(format_response(tokenizer, prompt, r["response"]), add_special_tokens=False)["input_ids"])
        prompts.append(p)
        totals.append(t)
    ordered = sorted(totals) or [0]
    at_percentile = ordered[min(len(ordered) - 1, int(percentile * len(ordered)))]
    chosen = max_length or min(cap, max(at_percentile, max(prompts, default=0) + 1, 2))
    return {
        "max_length": chosen,
        "chosen_from_data": max_length is None,
        "examples": len(totals),
        "tokens_p50": ordered[len(ordered) // 2],
        f"tokens_p{round(percentile * 100)}": at_percentile,
        "tokens_max": ordered[-1],
        "truncated_responses": sum(p < chosen < t for p, t in zip(prompts, totals, strict=True)),
        "dropped_prompts": sum(p >= chosen for p in prompts),
    }
