"""On-policy distillation: with probability λ a batch's responses come from the student itself.

Generalized Knowledge Distillation (Agarwal et al. 2024, "On-Policy Distillation of Language
Models: Learning from Self-Generated Mistakes", arXiv 2306.13649, Algorithm 1): for each batch,
with probability λ (``fraction``) keep the prompts, sample the responses from the *current*
student, let the teacher score every sampled token, and minimise the chosen divergence between
the teacher's and the student's next-token distributions on those tokens; otherwise train on the
fixed data as usual. The student so learns on the sequences it will actually produce, the
train/inference mismatch that makes pure off-policy students drift on long outputs.

On a student-sampled batch the loss is the divergence alone (``alpha = 1``): the sampled tokens
are not labels, and cross-entropy on them would only reinforce the student's own guesses. The
divergence is ``distill.loss.divergence`` unless ``on_policy.divergence`` overrides it (GKD's
paper favours ``generalized_jsd``; TRL's GKDTrainer defaults to β = 0.5).

Sampling uses Hugging Face ``generate`` on the student (CPU or GPU), with the exact sampled token
ids (no decode/re-encode round trip).
"""

from __future__ import annotations

import contextlib
import copy
import random
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from mydistill.losses.config import Divergence
from mydistill.tokenization import IGNORE_INDEX, TokenizedExample, collate


class OnPolicyConfig(BaseModel):
    """GKD's on-policy mixture (``distill.on_policy``)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    fraction: float = Field(
        0.0,
        ge=0,
        le=1,
        allow_inf_nan=False,
        description="λ: probability that a batch's responses are sampled from the current student (0: off).",
    )
    max_new_tokens: int = Field(32, gt=0, description="Longest response sampled from the student.")
    temperature: float = Field(1.0, gt=0, allow_inf_nan=False, description="Student sampling temperature (GKD uses 1).")
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False, description="Nucleus sampling threshold (1: off).")
    divergence: Divergence | None = Field(
        None, description="Divergence on student-sampled batches; null: distill.loss.divergence."
    )
    seed: int = Field(0, description="Seed of the λ draws and the student's sampling.")


def prompt_ids_of(batch: dict[str, Tensor]) -> list[list[int]]:
    """Each row's prompt (everything before the first labelled token) from a collated batch."""
    out = []
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"], strict=True):
        labelled = (labels != IGNORE_INDEX).nonzero()
        end = int(labelled[0]) if len(labelled) else int(mask.sum())
        out.append(ids[:end].tolist())
    return out


def eos_ids_of(model: Any, tokenizer: Any) -> list[int]:
    from mydistill.generation.base import eos_token_ids

    return eos_token_ids(tokenizer, model.generation_config)


@torch.no_grad()
def sample_from_student(
    student: Any,
    prompt_ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    eos_token_ids: Sequence[int] = (),
    pad_token_id: int = 0,
    seed: int = 0,
    synced_gpus: bool = False,
) -> list[list[int]]:
    """Sample one response per prompt from ``student``; each is cut after its first eos (kept).

    Prompts are left-padded so that new tokens line up; the student is put in eval mode for the
    generation and back in its previous mode afterwards. ``synced_gpus``: keep stepping until every
    process is done (needed under ZeRO-3, where each forward is a collective).
    """
    from transformers import GenerationConfig

    device = next(student.parameters()).device
    width = max(len(p) for p in prompt_ids)
    input_ids = torch.full((len(prompt_ids), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, ids in enumerate(prompt_ids):
        input_ids[i, width - len(ids) :] = torch.tensor(list(ids), dtype=torch.long)
        attention_mask[i, width - len(ids) :] = 1
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=True,
        temperature=temperature,
        top_p=top_p,
        top_k=0,
        num_beams=1,
        pad_token_id=pad_token_id,
        eos_token_id=list(eos_token_ids) or None,
    )
    was_training = student.training
    student.eval()
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            out = student.generate(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), generation_config=config,
                synced_gpus=synced_gpus,
            )
    finally:
        student.train(was_training)
    eos = set(eos_token_ids)
    responses = []
    for row in out[:, width:].tolist():
        stop = next((i for i, t in enumerate(row) if t in eos), None)
        responses.append(row if stop is None else row[: stop + 1])
    return responses


def student_batch(prompt_ids: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_token_id: int) -> dict[str, Tensor]:
    """A collated batch of prompt + sampled response, labels on the response only."""
    examples = [
        TokenizedExample(input_ids=list(p) + list(r), labels=[IGNORE_INDEX] * len(p) + list(r))
        for p, r in zip(prompt_ids, responses, strict=True)
    ]
    return collate(examples, pad_token_id)


class OnPolicyMixer:
    """Decides per step whether the batch is on-policy and builds the student-sampled batch.

    ``draw()`` is True with probability ``cfg.fraction`` (its own seeded generator, so the data
    order of off-policy steps does not depend on λ); ``replace(batch, student, step)`` returns the
    batch with its responses sampled from ``student``; ``objective(obj)`` is ``obj`` with
    ``alpha = 1`` (and the on-policy divergence), sharing its learned modules.
    """

    def __init__(self, cfg: OnPolicyConfig, *, tokenizer: Any, eos_token_ids: Sequence[int]) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.eos_token_ids = list(eos_token_ids)
        self._rng = random.Random(cfg.seed)
        self._objectives: dict[int, Any] = {}
        self.sampled_batches = 0

    def draw(self) -> bool:
        return self.cfg.fraction > 0 and self._rng.random() < self.cfg.fraction

    def skip(self, steps: int) -> None:
        """Advance the draws past ``steps`` steps (a resumed run), without sampling anything."""
        for _ in range(steps):
            self.draw()

    def replace(self, batch: dict[str, Tensor], student: Any, step: int, *, synced_gpus: bool = False) -> dict[str, Tensor]:
        prompts = prompt_ids_of(batch)
        responses = sample_from_student(
            student,
            prompts,
            max_new_tokens=self.cfg.max_new_tokens,
            temperature=self.cfg.temperature,
            top_p=self.cfg.top_p,
            eos_token_ids=self.eos_token_ids,
            pad_token_id=self.pad_token_id,
            seed=self.cfg.seed * 1_000_003 + step,
            synced_gpus=synced_gpus,
        )
        self.sampled_batches += 1
        device = batch["input_ids"].device
        return {k: v.to(device) for k, v in student_batch(prompts, responses, self.pad_token_id).items()}

    @contextlib.contextmanager
    def active(self, objective: Any) -> Iterator[Any]:
        """Within the block ``objective`` (the trainer's own, wrapped by an engine) computes the
        on-policy loss: ``alpha = 1`` and the on-policy divergence; restored afterwards."""
        saved = objective.cfg
        objective.cfg = self.objective(objective).cfg
        try:
            yield objective
        finally:
            objective.cfg = saved

    def objective(self, objective: Any) -> Any:
        """``objective`` with alpha = 1 and the on-policy divergence; its modules (projections) are shared."""
        key = id(objective)
        if key not in self._objectives:
            update: dict[str, Any] = {"alpha": 1.0}
            if self.cfg.divergence is not None:
                update["divergence"] = self.cfg.divergence
            # a shallow copy shares _modules/_parameters, so hidden-state projections stay the trained ones
            on_policy = copy.copy(objective)
            on_policy.cfg = objective.cfg.model_copy(update=update)
            self._objectives[key] = on_policy
        return self._objectives[key]
