"""The ``signal:`` section of the pipeline config: the optional offline teacher-signal stage.

Example::

    signal:
      enabled: true
      k: 64
      mode: auto            # sampled for forward_kl, else topk; or name one of them
      extra_uris: [s3://bucket/signal-other-teacher]   # combined per token, distill.loss.teacher_weights
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

SignalMode = Literal["topk", "sampled"]


class SignalConfig(BaseModel):
    """Run the teacher once over the training mix and store its sparse distribution per response token."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    enabled: bool = Field(
        False,
        description="Compute the teacher-signal store between mix and distill; distill then reads it instead "
        "of running the teacher.",
    )
    k: int = Field(
        64,
        gt=0,
        description="Token entries stored per response token: in 'topk' mode the k most likely tokens; in "
        "'sampled' mode the k - sampled_tokens most likely plus sampled_tokens draws from the rest.",
    )
    mode: Literal["auto", "topk", "sampled"] = Field(
        "auto",
        description="'topk': the k most likely tokens and the residual mass (biased, any divergence). "
        "'sampled': k - sampled_tokens exact plus `sampled_tokens` importance-sampled tail tokens (unbiased for "
        "forward_kl only). "
        "'auto': 'sampled' when distill.loss.divergence is forward_kl, else 'topk' (the store's manifest "
        "records which).",
    )
    sampled_tokens: int = Field(
        32,
        gt=0,
        description="Of the k entries, the tail slots drawn per token in 'sampled' mode (draws with replacement, "
        "m); must be below k.",
    )
    temperature: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="The store holds softmax(teacher_logits / temperature). Empty: distill.loss.temperature, "
        "exact for that loss temperature (and what keeps 'sampled' unbiased); 1: usable at any loss "
        "temperature, the tail re-tempered under an even-spread assumption.",
    )
    batch_size: int = Field(32, gt=0, description="Examples per teacher forward pass.")
    chunk_tokens: int = Field(
        4096, gt=0, description="Response tokens projected to the vocabulary at once (bounds the logits' memory)."
    )
    shard_mb: int = Field(256, gt=0, description="Target shard size in MiB (each shard is committed atomically).")
    extra_uris: list[str] = Field(
        default_factory=list,
        description="Stores made elsewhere (other teachers, same data and tokenizer) mixed per token with "
        "this one; weights: distill.loss.teacher_weights (this store first).",
    )
    device: str = Field("auto", description="'auto' (cuda if available), 'cpu' or 'cuda' for the teacher pass.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Teacher dtype: 'auto' = teacher.dtype, whose 'auto' is bfloat16 on a GPU that supports it, else float32."
    )
    seed: int = Field(0, description="Seed of the tail draws in 'sampled' mode.")

    @model_validator(mode="after")
    def _room_for_exact_tokens(self) -> SignalConfig:
        if self.mode == "sampled":
            self.exact_tokens("sampled")
        return self

    def exact_tokens(self, mode: str) -> int:
        """How many of the k entries are the exact top tokens in a store of concrete ``mode``."""
        if mode != "sampled":
            return self.k
        if self.sampled_tokens >= self.k:
            raise ValueError(
                f"signal.sampled_tokens ({self.sampled_tokens}) must be below signal.k ({self.k}): a sampled store's "
                "k entries per token are k - sampled_tokens exact top tokens plus sampled_tokens draws from the rest"
            )
        return self.k - self.sampled_tokens

    def resolved_mode(self, divergence: str) -> SignalMode:
        """The concrete mode of a store made for a distill loss with ``divergence``.

        'auto' becomes 'sampled' for forward_kl, the one divergence a sampled store is unbiased for
        (the loss is linear in the teacher's probabilities there), and 'topk' for every other one.
        """
        if self.mode != "auto":
            return self.mode
        return "sampled" if divergence == "forward_kl" else "topk"
