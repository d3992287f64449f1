"""What every config section shares: unknown keys and bad assignments are errors."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

ModelDtype = Literal["auto", "float32", "bfloat16", "float16"]


def optional_fields_as_plain(schema: dict[str, Any]) -> None:
    """JSON schema of a section: an optional field (``X | None = None``) is written as ``X``, not
    required and without a default, instead of ``anyOf: [X, null]`` with ``default: null``.

    A form drawn from the schema (the Prefect UI's run form) then shows a plain input for it, not a
    type switch reading 'Property is type "None"'; left empty, the field stays unset (None).
    Prefect's validators take a typed, not-required field without a default as nullable (its
    convention for optional parameters), so a null from the preset still validates; pydantic's
    own validation does not read this schema. Optional *sections* (``demo``, ``judge``…) keep the
    switch: there, on or off is the choice.
    """
    for field in schema.get("properties", {}).values():
        branches = field.get("anyOf")
        if not branches or {"type": "null"} not in branches or "default" not in field or field["default"] is not None:
            continue
        typed = [b for b in branches if b != {"type": "null"}]
        if len(typed) == 1 and "type" in typed[0]:
            del field["anyOf"], field["default"]
            field.update(typed[0])
            if "enum" in field:  # the choice list keeps "none" among its values, or null would not validate
                field["enum"] = [*field["enum"], None]


def dump_without_unset(model: BaseModel) -> dict[str, Any]:
    """``model.model_dump(mode="json")`` less the optional fields left at their None default (in
    nested sections too): what a deployment stores as its parameters. Prefect checks a deployment's
    parameters against the plain JSON schema, where such a field (see
    :func:`optional_fields_as_plain`) does not take null; left out, it is None again when the flow
    run validates the config. Nothing is lost: a None that differs from its field's default stays."""
    dumped = model.model_dump(mode="json")
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        if value is None and field.default is None:
            dumped.pop(name, None)
        elif isinstance(value, BaseModel):
            dumped[name] = dump_without_unset(value)
        elif isinstance(value, list) and value and all(isinstance(v, BaseModel) for v in value):
            dumped[name] = [dump_without_unset(v) for v in value]
    return dumped


class Section(BaseModel):
    """Base of every section: an unknown key or a bad assignment is a validation error."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, json_schema_extra=optional_fields_as_plain)
