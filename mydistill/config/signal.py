"""The ``signal:`` section of the pipeline config: the optional offline teacher-signal stage.

Example::

    signal:
      enabled: true
      k: 64
      mode: auto            # sampled for forward_kl, else topk; or name one of them
      extra_uris: [s3://bucket/signal-other-teacher]   # combined per token, distill.loss.teacher_weights

    signal:                 # a served teacher (vLLM, SGLang, a provider) scores the mix instead
      enabled: true
      backend: openai
      api_base: http://teacher:8000/v1
      k: 20                 # vLLM's default --max-logprobs
      logprobs_mode: prompt_logprobs
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_serializer, field_validator, model_validator

from mydistill.config.section import optional_fields_as_plain

from mydistill.config.generation import _ENV_NAME, mask_url, warn_if_credentials

SignalMode = Literal["topk", "sampled"]


class SignalConfig(BaseModel):
    """Run the teacher once over the training mix and store its sparse distribution per response token."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, json_schema_extra=optional_fields_as_plain)

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

    # a served teacher (backend: openai) -------------------------------------------------------
    backend: Literal["local", "openai"] = Field(
        "local",
        description="'local': load the teacher folder and run it here. 'openai': ask an OpenAI-compatible "
        "completions endpoint (vLLM, SGLang, a provider) for the top-k log-probs of every response token "
        "(top-k only: a server lists no tail to sample from).",
    )
    api_base: str | None = Field(
        None, description="Base URL of the completions API including the version, e.g. http://host:8000/v1 (backend: openai)."
    )
    api_model: str | None = Field(
        None, description="Model name sent to the API; empty: the one model the server lists under /models."
    )
    api_key_env: str = Field(
        "OPENAI_API_KEY",
        description="Name of the environment variable holding the API key (never the key itself); unset variable: "
        "no Authorization header.",
    )
    logprobs_mode: Literal["echo", "prompt_logprobs"] = Field(
        "echo",
        description="How the server is asked for the log-probs of the text it is sent: 'echo' (OpenAI's "
        "echo: true + logprobs: k, answered by most servers) or 'prompt_logprobs' (vLLM's prompt_logprobs: k "
        "extra parameter).",
    )
    api_prompt: Literal["text", "token_ids"] = Field(
        "text",
        description="Send each example as 'text' (the server tokenizes it; every record is checked against the "
        "student's tokens) or as the student's 'token_ids' (vLLM and this project's server accept them; no "
        "re-tokenization, still checked).",
    )
    api_batch_size: int = Field(
        1, gt=0, description="Examples per completions request (a list prompt); 1: one request per example."
    )
    api_shard_size: int = Field(
        1000, gt=0, description="Examples per store shard (backend: openai): each is committed atomically and is "
        "the unit of resume after a crash.",
    )
    concurrency: int = Field(8, gt=0, description="Most API requests in flight at once (backend: openai).")
    timeout_s: float = Field(120.0, gt=0, description="Timeout of one API request in seconds.")
    max_retries: int = Field(
        5, ge=0, description="Retries of one request on 408, 409, 429, 500, 502-504, timeouts and connection errors."
    )
    backoff_s: float = Field(
        1.0, gt=0, description="First retry delay in seconds, doubling with jitter up to 60 s; a Retry-After "
        "header from the server takes precedence.",
    )
    probe_tolerance: float = Field(
        0.05, gt=0, description="Largest change (nats) of the served teacher's log-probs on the fixed probe text "
        "before a resumed or re-run store is refused as made by another model.",
    )

    @field_validator("api_key_env")
    @classmethod
    def _api_key_env(cls, v: str) -> str:
        if not _ENV_NAME.match(v):
            raise ValueError(
                "signal.api_key_env must be the NAME of an environment variable (letters, digits, '_'), not the key "
                "itself; export the key in that variable"
            )
        return v

    @field_validator("api_base")
    @classmethod
    def _api_base(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError(f"signal.api_base must start with http:// or https://, got {mask_url(v)!r}")
        warn_if_credentials(v, "signal.api_base")
        return v.rstrip("/") if v else v

    @field_serializer("api_base")
    def _api_base_without_credentials(self, v: str | None) -> str | None:
        return mask_url(v)

    @model_validator(mode="after")
    def _room_for_exact_tokens(self) -> SignalConfig:
        if self.mode == "sampled":
            self.exact_tokens("sampled")
        return self

    @model_validator(mode="after")
    def _served_teacher(self) -> SignalConfig:
        if self.backend == "openai":
            if not self.api_base:
                raise ValueError("signal.api_base is required with signal.backend: openai (e.g. http://127.0.0.1:8000/v1)")
            if self.mode == "sampled":
                raise ValueError(
                    "signal.mode: sampled needs the teacher's whole distribution to draw the tail from, and a served "
                    "teacher returns only its top-k log-probs; use mode topk (or auto) with backend openai"
                )
        return self

    def source_params(self) -> dict[str, object]:
        """What names the teacher besides its folder: the served model (empty for the local backend)."""
        if self.backend == "local":
            return {}
        return {"backend": self.backend, "api_base": mask_url(self.api_base), "api_model": self.api_model}

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
        (the loss is linear in the teacher's probabilities there), and 'topk' for every other one and
        for a served teacher (which lists no tail to sample from).
        """
        if self.mode != "auto":
            return self.mode
        return "sampled" if divergence == "forward_kl" and self.backend == "local" else "topk"
