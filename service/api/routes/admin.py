"""Admin routes: load, activate (with canary or migration) and retire model versions at runtime.

They need an admin key (``TRMRL_ADMIN_KEYS``); without admin keys configured they answer 404, as if
they did not exist, and do nothing. An API key gets 403.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request, Response

from service.api.body import MSGPACK_TYPES, _content_headers, parse_body, read_body, wants_msgpack
from service.api.deps import RegistryDep, SettingsDep, body_doc, error_docs
from service.api.replies import reply
from service.api.schemas.models import ActivateRequest, ActivateResponse, LoadModelRequest, LoadModelResponse
from service.core import migration
from service.core.errors import ServiceError
from service.lifecycle import check_name, load_engine, resolve_under, store_upload, write_manifest

router = APIRouter(prefix="/v1/admin", tags=["admin"])

ARCHIVE_TYPES = frozenset(
    {"application/gzip", "application/x-gzip", "application/x-tar", "application/octet-stream"}
)


def _admin(request: Request) -> None:
    request.app.state.auth.check_admin(request.scope)


@router.post(
    "/models",
    status_code=201,
    response_model=LoadModelResponse,
    responses=error_docs(400, 401, 403, 404, 409, 413, 415, 422),
    openapi_extra={
        **body_doc(LoadModelRequest),
        "parameters": [
            {
                "name": "name",
                "in": "query",
                "required": False,
                "schema": {"type": "string"},
                "description": "The model's name, when the body is a checkpoint archive.",
            }
        ],
    },
)
async def load_model(request: Request, registry: RegistryDep, settings: SettingsDep) -> Response:
    """Load a new version of a model beside the current one (not active yet).

    JSON ``{"name", "checkpoint": "<path under TRMRL_CHECKPOINT_ROOT>"}``, or a checkpoint archive
    (``.tar.gz``) as the body with ``?name=``. A corrupt or foreign checkpoint gets 422 and the
    service keeps serving what it served.
    """
    _admin(request)
    kind, declared = _content_headers(request)
    if kind in ARCHIVE_TYPES:
        name = check_name(request.query_params.get("name", ""))
        body = await read_body(request, declared, settings.max_upload_bytes)
        path = await asyncio.to_thread(store_upload, settings.state_dir, body)
    elif kind == "application/json" or kind in MSGPACK_TYPES:
        spec = await parse_body(request, LoadModelRequest, settings.max_body_bytes)
        name = check_name(spec.name)
        path = resolve_under(settings.admin_root(), spec.checkpoint)
    else:
        raise ServiceError(
            "unsupported_media_type",
            f"Content type {kind!r} is not supported; send JSON or a checkpoint archive (application/gzip).",
            {"content_type": kind},
        )
    engine = await asyncio.to_thread(load_engine, registry, name, path)
    registry.add_version(engine, path)
    engine.recorder = registry.recorder
    await engine.start()
    metrics = request.app.state.metrics
    metrics.watch(engine)
    await asyncio.to_thread(write_manifest, registry, settings.state_dir)
    loaded = LoadModelResponse(
        name=name,
        version=engine.version,
        active=registry.engines[name] is engine,
        task_family=engine.checkpoint.info.task_family,
    )
    return reply(loaded, status=201, msgpack=wants_msgpack(request.scope))


@router.post(
    "/models/{name}/activate",
    response_model=ActivateResponse,
    responses=error_docs(400, 401, 403, 404, 409, 413, 415, 422, 429, 503),
    openapi_extra=body_doc(ActivateRequest),
)
async def activate(name: str, request: Request, registry: RegistryDep, settings: SettingsDep) -> Response:
    """New sessions of ``name`` go to ``version`` (or its ``canary`` share of them); with
    ``migrate_sessions``, every live session of the other versions moves to it between two of its
    steps, its memory intact. Rolling back is activating the previous version."""
    _admin(request)
    spec = await parse_body(request, ActivateRequest, settings.max_body_bytes)
    moved = await migration.activate(
        registry, name, spec.version, canary=spec.canary, migrate=spec.migrate_sessions
    )
    await asyncio.to_thread(write_manifest, registry, settings.state_dir)
    canary = registry.canary.get(name)
    done = ActivateResponse(
        name=name,
        active_version=registry.engines[name].version,
        canary_version=None if canary is None else canary[0],
        canary_share=0.0 if canary is None else canary[1],
        migrated_sessions=moved,
        pause_ms=round(registry.last_pause_s * 1e3, 3) if moved else 0.0,
    )
    return reply(done, msgpack=wants_msgpack(request.scope))


@router.delete(
    "/models/{name}/versions/{version}",
    status_code=204,
    response_class=Response,
    responses=error_docs(401, 403, 404, 409),
)
async def retire(
    name: str, version: str, request: Request, registry: RegistryDep, settings: SettingsDep
) -> Response:
    """Unload a version: 409 ``version_in_use`` while it is active, a canary, or holds sessions."""
    _admin(request)
    await registry.retire(name, version)
    await asyncio.to_thread(write_manifest, registry, settings.state_dir)
    return Response(status_code=204)
