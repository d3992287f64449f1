"""GKD's on-policy mixture (``distill.on_policy``) and its colocated vLLM engine."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from mydistill.config.section import optional_fields_as_plain

from mydistill.config.losses import Divergence

# what the sampler itself passes to vllm.LLM; engine_kwargs may not change these
_VLLM_FIXED_ARGS = ("model", "tokenizer", "skip_tokenizer_init", "load_format", "distributed_executor_backend")


class OnPolicyVLLMConfig(BaseModel):
    """The colocated vLLM engine of ``distill.on_policy.backend: vllm``."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, json_schema_extra=optional_fields_as_plain)

    gpu_memory_utilization: float = Field(
        0.3,
        gt=0,
        le=1,
        allow_inf_nan=False,
        description="Fraction of the GPU's memory the engine may take (its copy of the student and its KV cache); "
        "the rest is left to training on the same GPU.",
    )
    max_model_len: int | None = Field(
        None, gt=0, description="Longest prompt + sampled response the engine plans its KV cache for; empty: the "
        "student's max_position_embeddings.",
    )
    dtype: str = Field(
        "auto", description="The engine's weight dtype ('auto': the student config's torch_dtype; e.g. 'bfloat16')."
    )
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Further vllm.LLM arguments, e.g. {enforce_eager: true, max_num_seqs: 64}.",
    )

    @field_validator("engine_kwargs")
    @classmethod
    def _fixed_args_stay(cls, value: dict[str, Any]) -> dict[str, Any]:
        fixed = sorted(set(value) & set(_VLLM_FIXED_ARGS))
        if fixed:
            raise ValueError(
                f"{', '.join(fixed)} cannot be set here: the sampler builds the engine from the student's config "
                "with random weights and pushes the student's own weights into it before every sampling call"
            )
        return value


class OnPolicyConfig(BaseModel):
    """GKD's on-policy mixture (``distill.on_policy``)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, json_schema_extra=optional_fields_as_plain)

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
    backend: Literal["hf", "vllm"] = Field(
        "hf",
        description="What samples the student's responses: 'hf' (Hugging Face generate on the training copy, "
        "CPU or GPU) or 'vllm' (a vLLM engine on the same GPU, refreshed with the student's weights before "
        "every on-policy batch; needs the vllm package).",
    )
    vllm: OnPolicyVLLMConfig = Field(
        default_factory=OnPolicyVLLMConfig, description="The colocated vLLM engine (backend: vllm only)."
    )
