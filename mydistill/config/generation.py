"""Configuration of the generate stage (the ``generate:`` section of the pipeline YAML)."""

from __future__ import annotations

import logging
import re
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, field_serializer, field_validator, model_validator

from mydistill.config.section import optional_fields_as_plain

logger = logging.getLogger(__name__)

DEFAULT_RATIONALE_TEMPLATE = (
    "{prompt}\n\n"
    "Think step by step. First write your reasoning after 'Rationale:', "
    "then give the final answer after 'Answer:'."
)
# The answer follows the *last* "Answer:" (or "Final answer:"): the answer group may not contain
# another "answer:". The rationale is everything before it, without a leading "Rationale:" label.
DEFAULT_RATIONALE_PATTERN = (
    r"(?is)^\s*(?:rationale\s*:)?\s*(?P<rationale>.*?\S)\s*(?:final\s+)?answer\s*:\s*"
    r"(?P<answer>(?:(?!answer\s*:).)*?\S)\s*$"
)

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# Fields that shape the generated text. A partly written output folder may only be resumed with
# exactly these values; the others (batching, concurrency, retries, device) are operational.
CONTENT_FIELDS = (
    "backend",
    "max_new_tokens",
    "temperature",
    "top_p",
    "num_samples",
    "seed",
    "max_prompt_tokens",
    "overlong",
    "rationale",
    "rationale_template",
    "rationale_pattern",
    "api_model",
)


def _range_error(field: str, allowed: str, value: Any) -> ValueError:
    return ValueError(f"{field} must be {allowed}, got {value!r}")


class GenerateConfig(BaseModel):
    """How the teacher generates responses: backend, sampling, batching, resume, API access."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=optional_fields_as_plain)

    backend: Literal["hf", "vllm", "openai"] = Field(
        "hf",
        description="Teacher backend: 'hf' (batched transformers, default), 'vllm' (GPU, optional extra) "
        "or 'openai' (any OpenAI-compatible HTTP API: a hosted model, a vLLM or TGI server).",
    )
    reuse_responses: bool = Field(
        True,
        description="Reuse teacher responses from earlier runs (same teacher fingerprint, same content settings, "
        "same prompt), kept under <work_dir>/response-cache: only new prompts go to the teacher.",
    )
    max_new_tokens: int = Field(32, description="Most tokens generated per response (>= 1).")
    temperature: float = Field(0.0, description="Sampling temperature (>= 0); 0 means greedy decoding.")
    top_p: float = Field(1.0, description="Nucleus sampling: keep the smallest token set with this mass, in (0, 1].")
    num_samples: int = Field(1, description="Responses per prompt (>= 1); each gets its own sample_index.")
    batch_size: int = Field(
        64, description="Sequences per forward batch for the hf backend (>= 1); halved automatically on out-of-memory."
    )
    seed: int = Field(0, description="Random seed for sampling (>= 0); batches and API requests derive theirs from it.")
    shard_size: int = Field(
        1000,
        description="Records per output shard (>= 1); each shard is committed atomically and is the unit of resume.",
    )
    max_prompt_tokens: int | None = Field(
        None,
        description="Longest prompt (chat-formatted, in teacher tokens) to send; None = the teacher's context "
        "window minus max_new_tokens.",
    )
    overlong: Literal["truncate", "skip", "error"] = Field(
        "skip",
        description="What to do with a prompt longer than the window: 'truncate' (drop tokens from the left of the "
        "prompt), 'skip' (no record; counted in the manifest) or 'error' (stop before generating anything).",
    )
    rationale: bool = Field(
        False,
        description="Distilling step-by-step: wrap each prompt in rationale_template and parse the response into "
        "'rationale' and 'answer'; responses that do not parse get status 'unparsed'.",
    )
    rationale_template: str = Field(
        DEFAULT_RATIONALE_TEMPLATE,
        description="Rationale-mode user message; '{prompt}' is replaced by the prompt (other braces are literal).",
    )
    rationale_pattern: str = Field(
        DEFAULT_RATIONALE_PATTERN,
        description="Regular expression (Python syntax, re.search) with named groups 'rationale' and 'answer'.",
    )
    api_base: str | None = Field(
        None, description="Base URL of the OpenAI-compatible API including the version, e.g. http://host:8000/v1."
    )
    api_model: str | None = Field(
        None, description="Model name sent to the API; defaults to the teacher argument of generate_responses."
    )
    api_key_env: str = Field(
        "OPENAI_API_KEY",
        description="Name of the environment variable holding the API key (the key itself never goes in a config). "
        "Unset variable = no Authorization header (fine for a local server).",
    )
    api_max_tokens_param: Literal["max_tokens", "max_completion_tokens"] = Field(
        "max_tokens",
        description="Request field that carries max_new_tokens: 'max_tokens' (vLLM, TGI, most servers) or "
        "'max_completion_tokens' (newer OpenAI models).",
    )
    concurrency: int = Field(8, description="Most API requests in flight at once (>= 1).")
    timeout_s: float = Field(60.0, description="Timeout of one API request in seconds (> 0).")
    max_retries: int = Field(
        5,
        description="Retries of one API request on 429, 408, 409, 500, 502-504, timeouts and connection errors (>= 0).",
    )
    backoff_s: float = Field(
        1.0,
        description="First retry delay in seconds (> 0), doubling with jitter up to 60 s; a Retry-After header "
        "from the server takes precedence.",
    )
    device: str = Field(
        "auto", description="Torch device for hf/vllm: 'auto' (cuda if available, else cpu), 'cpu', 'cuda:0', ..."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Teacher weights dtype: 'auto' = teacher.dtype, whose 'auto' is bfloat16 on a GPU that "
        "supports it, else float32.",
    )

    # ------------------------------------------------------------------------------------------
    # checks: each message names the field and what is allowed

    @field_validator("max_new_tokens", "num_samples", "batch_size", "shard_size", "concurrency")
    @classmethod
    def _at_least_one(cls, v: int, info: Any) -> int:
        if v < 1:
            raise _range_error(info.field_name, ">= 1", v)
        return v

    @field_validator("seed", "max_retries")
    @classmethod
    def _non_negative_int(cls, v: int, info: Any) -> int:
        if v < 0:
            raise _range_error(info.field_name, ">= 0", v)
        return v

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v: float) -> float:
        if not v >= 0:
            raise _range_error("temperature", ">= 0 (0 = greedy)", v)
        return v

    @field_validator("top_p")
    @classmethod
    def _top_p(cls, v: float) -> float:
        if not 0 < v <= 1:
            raise _range_error("top_p", "in (0, 1]", v)
        return v

    @field_validator("timeout_s", "backoff_s")
    @classmethod
    def _positive(cls, v: float, info: Any) -> float:
        if not v > 0:
            raise _range_error(info.field_name, "> 0 seconds", v)
        return v

    @field_validator("max_prompt_tokens")
    @classmethod
    def _max_prompt_tokens(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise _range_error("max_prompt_tokens", ">= 1 or null (= the teacher's window)", v)
        return v

    @field_validator("rationale_template")
    @classmethod
    def _template(cls, v: str) -> str:
        if "{prompt}" not in v:
            raise ValueError("rationale_template must contain the placeholder '{prompt}'")
        return v

    @field_validator("rationale_pattern")
    @classmethod
    def _pattern(cls, v: str) -> str:
        try:
            compiled = re.compile(v)
        except re.error as e:
            raise ValueError(f"rationale_pattern is not a valid regular expression: {e}") from None
        missing = {"rationale", "answer"} - set(compiled.groupindex)
        if missing:
            raise ValueError(
                "rationale_pattern must have named groups (?P<rationale>...) and (?P<answer>...); "
                f"missing {sorted(missing)}"
            )
        return v

    @field_validator("api_key_env")
    @classmethod
    def _api_key_env(cls, v: str) -> str:
        if not _ENV_NAME.match(v):
            # Catch the classic mistake of pasting the key itself here.
            raise ValueError(
                "api_key_env must be the NAME of an environment variable (letters, digits, '_'), "
                "not the key itself; export the key in that variable"
            )
        return v

    @field_validator("api_base")
    @classmethod
    def _api_base(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError(f"api_base must start with http:// or https://, got {mask_url(v)!r}")
        warn_if_credentials(v, "generate.api_base")
        return v.rstrip("/") if v else v

    @field_serializer("api_base")
    def _api_base_without_credentials(self, v: str | None) -> str | None:
        # whatever records the config (MLflow params, config.json, Prefect's flow parameters, manifests)
        # never sees a user:password@ in the URL
        return mask_url(v)

    @model_validator(mode="after")
    def _cross_field(self) -> GenerateConfig:
        if self.backend == "openai" and not self.api_base:
            raise ValueError("api_base is required when backend='openai' (e.g. http://127.0.0.1:8000/v1)")
        if self.num_samples > 1 and self.temperature == 0:
            logger.warning("num_samples=%d with temperature=0: greedy samples are identical", self.num_samples)
        return self

    # ------------------------------------------------------------------------------------------

    def content_params(self) -> dict[str, Any]:
        """The fields that decide what is generated (see CONTENT_FIELDS); rationale fields only in rationale mode."""
        params = {name: getattr(self, name) for name in CONTENT_FIELDS}
        if not self.rationale:
            params.pop("rationale_template")
            params.pop("rationale_pattern")
        if self.backend != "openai":
            params.pop("api_model")
        return params

    def public_dict(self) -> dict[str, Any]:
        """The config as recorded in manifests and params (credentials in api_base masked by its serializer)."""
        return self.model_dump()


def warn_if_credentials(url: str | None, field: str) -> None:
    """Log (once per URL and process) that ``url`` carries user:password@ credentials."""
    if url and (urlsplit(url).username or urlsplit(url).password) and (field, url) not in _WARNED:
        _WARNED.add((field, url))
        logger.warning(
            "%s carries credentials (%s): they are masked wherever the config is recorded, and a run started from "
            "the recorded config will not have them. Pass credentials by environment instead (generate.api_key_env "
            "for the API key, AWS_* for S3, MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD for MLflow).",
            field, mask_url(url),
        )


_WARNED: set[tuple[str, str]] = set()


def strip_userinfo(url: str) -> str:
    """``url`` without its user:password@ part."""
    parts = urlsplit(url)
    if not (parts.username or parts.password):
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def mask_url(url: str | None) -> str | None:
    """``url`` with any user:password part replaced by ``***``."""
    if not url:
        return url
    parts = urlsplit(url)
    if parts.username or parts.password:
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
        return urlunsplit((parts.scheme, f"***@{host}", parts.path, parts.query, parts.fragment))
    return url
