"""What every config section shares: unknown keys and bad assignments are errors."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

ModelDtype = Literal["auto", "float32", "bfloat16", "float16"]


class Section(BaseModel):
    """Base of every section: an unknown key or a bad assignment is a validation error."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
