"""Typed dependencies shared by the routes, and the OpenAPI helpers for bodies parsed by hand."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request
from pydantic import BaseModel
from starlette.requests import HTTPConnection
from starlette.types import Scope

from service.api.schemas.common import ErrorBody
from service.auth import Authenticator
from service.config import Settings
from service.core.errors import ServiceError
from service.core.registry import ModelRegistry


def settings_of(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def registry_of(request: HTTPConnection) -> ModelRegistry:
    registry: ModelRegistry | None = request.app.state.registry
    if registry is None:
        raise ServiceError("not_ready", "The service is starting: models are not loaded yet.")
    return registry


def authenticate(scope: Scope, *, api_key_scheme: bool = False) -> str | None:
    """The caller's principal, or 401: the one check every route, the fast path and the streams run."""
    auth: Authenticator = scope["app"].state.auth
    return auth.check(scope, api_key_scheme=api_key_scheme)


# ``async``: FastAPI would run plain functions in its thread pool, a thread hop per request.
async def get_settings(request: Request) -> Settings:
    return settings_of(request)


async def get_registry(request: Request) -> ModelRegistry:
    return registry_of(request)


async def get_owner(request: Request) -> str | None:
    return authenticate(request.scope)


SettingsDep = Annotated[Settings, Depends(get_settings)]
OwnerDep = Annotated[str | None, Depends(get_owner)]
RegistryDep = Annotated[ModelRegistry, Depends(get_registry)]

#: Extra request-body schemas for the OpenAPI document, merged into ``components`` by the app.
BODY_SCHEMAS: dict[str, dict[str, Any]] = {}


def body_doc(model: type[BaseModel], *, required: bool = True) -> dict[str, Any]:
    """``openapi_extra`` documenting a body that a route parses itself (see ``service.api.body``)."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    BODY_SCHEMAS.update(schema.pop("$defs", {}))
    BODY_SCHEMAS[model.__name__] = schema
    ref: dict[str, Any] = {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}
    extra = model.model_config.get("json_schema_extra")
    examples = extra.get("examples") if isinstance(extra, dict) else None
    if isinstance(examples, list) and examples:
        ref["example"] = examples[0]
    return {
        "requestBody": {
            "required": required,
            "content": {"application/json": ref, "application/msgpack": ref},
        }
    }


def body_doc_one_of(*models: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` for a body that may take any of several forms (each with its example)."""
    refs, examples = [], {}
    for model in models:
        body_doc(model)
        refs.append({"$ref": f"#/components/schemas/{model.__name__}"})
        extra = model.model_config.get("json_schema_extra")
        found = extra.get("examples") if isinstance(extra, dict) else None
        if isinstance(found, list) and found:
            examples[model.__name__] = {"summary": (model.__doc__ or "").split("\n")[0], "value": found[0]}
    media = {"schema": {"oneOf": refs}, "examples": examples}
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": media, "application/msgpack": media},
        }
    }


def error_docs(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses`` entries: these statuses answer with the error body."""
    return {status: {"model": ErrorBody} for status in statuses}
