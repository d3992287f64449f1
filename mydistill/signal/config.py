"""The ``signal:`` section of the pipeline config: the optional offline teacher-signal stage.

Example::

    signal:
      enabled: true
      k: 64
      mode: topk            # or sampled (unbiased: k exact + sampled_tokens importance-sampled)
      extra_uris: [s3://bucket/signal-other-teacher]   # combined per token, distill.loss.teacher_weights
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class SignalConfig(BaseModel):
    """Run the teacher once over the training mix and store its sparse distribution per response token."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    enabled: bool = Field(
        False,
        description="Compute the teacher-signal store between mix and distill; distill then reads it instead "
        "of running the teacher.",
    )
    k: int = Field(64, gt=0, description="Top tokens kept exactly per response token.")
    mode: Literal["topk", "sampled"] = Field(
        "topk",
        description="'topk': the k most likely tokens and the residual mass (biased, any divergence). "
        "'sampled': k exact plus `sampled_tokens` importance-sampled tail tokens (unbiased for forward_kl).",
    )
    sampled_tokens: int = Field(
        32, gt=0, description="Tail slots drawn per token in 'sampled' mode (draws with replacement, m)."
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
    dtype: str = Field("auto", description="Teacher dtype: 'auto' (bf16/fp16 on GPU, fp32 on CPU) or a torch dtype name.")
    seed: int = Field(0, description="Seed of the tail draws in 'sampled' mode.")
