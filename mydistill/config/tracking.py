"""MLflow tracking and the prices of the cost report."""

from __future__ import annotations

from pydantic import Field, field_serializer, field_validator

from mydistill.config.generation import mask_url, warn_if_credentials
from mydistill.config.section import Section


class CostsConfig(Section):
    """Prices that turn a run's measured device time and tokens into money (each optional)."""

    gpu_hour: float | None = Field(None, ge=0, description="Price of one GPU-hour (training and local teacher stages on GPUs).")
    cpu_hour: float | None = Field(None, ge=0, description="Price of one CPU worker process-hour.")
    api_prompt_per_1k_tokens: float | None = Field(None, ge=0, description="API teacher: price per 1,000 prompt tokens.")
    api_completion_per_1k_tokens: float | None = Field(
        None, ge=0, description="API teacher: price per 1,000 completion tokens."
    )
    currency: str = Field("USD", description="What the prices are in (shown beside the total).")


class TrackingConfig(Section):
    experiment: str = Field("mydistill", description="MLflow experiment name.")
    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI. Empty: $MLFLOW_TRACKING_URI, else the project-local sqlite store."
    )
    artifact_location: str | None = Field(
        None,
        description="Root for the artifacts of experiments mydistill creates (a folder, s3://…). Empty: beside a "
        "sqlite store, else where the tracking server puts them. Experiments that exist keep theirs.",
    )

    @field_validator("tracking_uri")
    @classmethod
    def _warn_on_credentials(cls, v: str | None) -> str | None:
        warn_if_credentials(v, "tracking.tracking_uri")
        return v

    @field_serializer("tracking_uri")
    def _tracking_uri_without_credentials(self, v: str | None) -> str | None:
        return mask_url(v)
