"""What every body shares: strict requests, counters that take integral floats, the error body.

Request models are strict: a string where a number belongs is a ``wrong_type`` error rather than a
silent conversion, and an unknown field is an ``unknown_field`` error rather than a silently ignored
typo (``"episode_star": true``).
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, create_model

from service.core.records import SEED_LIMIT

#: The most sessions one ``POST /v1/sessions`` creates.
MAX_CREATE = 65_536
LAST_SECOND = 253_402_300_799.0  # 9999-12-31T23:59:59Z, the last instant an ISO 8601 date can show
SessionId = Annotated[str, Field(min_length=1, max_length=128)]


def integral(value: object) -> object:
    """An integral float as its integer: JSON Schema's ``integer`` includes ``4.0``, strict mode would not."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


# The validator wraps the constrained type (rather than sitting beside the constraint) so that the
# constraints stay JSON Schema's ``minimum``/``exclusiveMaximum`` in the document. Counters are
# int64, as the session table holds them (and MessagePack carries no wider integer).
Count = Annotated[Annotated[int, Field(ge=0, lt=1 << 63)], BeforeValidator(integral)]
Seed = Annotated[Annotated[int, Field(ge=0, lt=SEED_LIMIT)], BeforeValidator(integral)]


def example(**body: Any) -> ConfigDict:
    """A model's config with one example body, shown in the API document (``examples``)."""
    return ConfigDict(json_schema_extra={"examples": [body]})


def record_body(record: type[Any], doc: str, config: ConfigDict) -> type[BaseModel]:
    """A reply body with the fields of one of the core's records (names, types and defaults, in order)."""
    types = typing.get_type_hints(record)
    fields: dict[str, Any] = {
        f.name: (types[f.name], ... if f.default is dataclasses.MISSING else f.default)
        for f in dataclasses.fields(record)
    }
    return create_model(record.__name__, __config__=config, __doc__=doc, **fields)


class Request(BaseModel):
    """A request body: strict types, no unknown fields."""

    model_config = ConfigDict(strict=True, extra="forbid")


class ErrorObject(BaseModel):
    code: str
    message: str
    detail: dict[str, Any] = Field(default_factory=dict)


class ErrorBody(BaseModel):
    """Every error reply: ``{"error": {"code", "message", "detail"}}``."""

    model_config = example(
        error={
            "code": "step_conflict",
            "message": "Step 9 does not follow the session's history: the next step is 8.",
            "detail": {"expected_step": 8, "got_step": 9},
        }
    )

    error: ErrorObject


class Status(BaseModel):
    model_config = example(status="ready")

    status: str
