"""Distilling from a teacher whose tokenizer is not the student's (``distill.cross_tokenizer``)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from mydistill.config.section import optional_fields_as_plain

CrossTokenizerMethod = Literal["none", "sequence", "uld"]


class CrossTokenizerConfig(BaseModel):
    """How to distil from a teacher whose tokenizer is not the student's (``distill.cross_tokenizer``)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, json_schema_extra=optional_fields_as_plain)

    method: CrossTokenizerMethod = Field(
        "none",
        description="'none': teacher and student must share a tokenizer (checked before training); "
        "'sequence': CE on the teacher's text only; 'uld': Universal Logit Distillation (CE + weight * ULD).",
    )
    uld_weight: float = Field(
        1.0, ge=0, allow_inf_nan=False, description="λ in CE + λ ULD (the paper uses values around 1)."
    )
    uld_temperature: float = Field(1.0, gt=0, allow_inf_nan=False, description="Softmax temperature for both sides of ULD.")
    uld_top_k: int | None = Field(
        None, gt=0, description="Compare only the top-k sorted probabilities (saves memory at large V); null: all."
    )
