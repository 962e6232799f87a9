"""Sessions: create, inspect, delete, reset, snapshot and restore."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from service.api.body import parse_body, wants_msgpack
from service.api.deps import OwnerDep, RegistryDep, SettingsDep, body_doc, error_docs
from service.api.replies import reply
from service.api.schemas.models import model_info
from service.api.schemas.sessions import (
    CreateSessionRequest,
    CreateSessionResponse,
    CreateSessionsResponse,
    ResetRequest,
    SessionInfo,
    SessionState,
    session_state,
    snapshot_of,
)
from service.core import snapshots

router = APIRouter(prefix="/v1/sessions", tags=["sessions"])


@router.post(
    "",
    status_code=201,
    response_model=CreateSessionResponse | CreateSessionsResponse,
    responses={
        201: {
            "content": {
                "application/json": {
                    "examples": {
                        name: {"value": model.model_config["json_schema_extra"]["examples"][0]}  # type: ignore[index]
                        for name, model in (
                            ("one", CreateSessionResponse),
                            ("count", CreateSessionsResponse),
                        )
                    }
                }
            }
        },
        **error_docs(400, 401, 404, 413, 415, 422, 429, 503),
    },
    openapi_extra=body_doc(CreateSessionRequest, required=False),
)
async def create_session(
    request: Request, registry: RegistryDep, settings: SettingsDep, owner: OwnerDep
) -> Response:
    """Create a session: a slot of memory on the device for one robot or environment; with ``count``,
    that many sessions at once (``session_ids`` in the reply)."""
    body = await parse_body(request, CreateSessionRequest, settings.max_body_bytes, empty_ok=True)
    if body.count is not None:
        engine, session_ids = registry.create_sessions(body, body.count, owner)
        many = CreateSessionsResponse(
            session_ids=session_ids,
            model=model_info(engine.info(default=engine.name == registry.default)),
            ttl_s=float(engine.limits.session_ttl_s if body.ttl_s is None else body.ttl_s),
        )
        return reply(many, status=201, msgpack=wants_msgpack(request.scope))
    engine, session_id = registry.create_session(body, owner)
    ttl_s = float(engine.table.ttl_s[engine.table.get(session_id)])
    created = CreateSessionResponse(
        session_id=session_id,
        model=model_info(engine.info(default=engine.name == registry.default)),
        ttl_s=ttl_s,
    )
    return reply(created, status=201, msgpack=wants_msgpack(request.scope))


@router.get("/{session_id}", response_model=SessionInfo, responses=error_docs(401, 404))
async def get_session(session_id: str, request: Request, registry: RegistryDep, owner: OwnerDep) -> Response:
    """A session's step and episode counts, times and model version."""
    return reply(registry.session_info(session_id, owner), msgpack=wants_msgpack(request.scope))


@router.delete("/{session_id}", status_code=204, response_class=Response, responses=error_docs(401, 404))
async def delete_session(session_id: str, registry: RegistryDep, owner: OwnerDep) -> Response:
    """End a session and free its slot."""
    registry.delete_session(session_id, owner)
    return Response(status_code=204)


@router.post(
    "/{session_id}/reset",
    response_model=SessionInfo,
    responses=error_docs(400, 401, 404, 413, 415, 422),
    openapi_extra=body_doc(ResetRequest, required=False),
)
async def reset_session(
    session_id: str, request: Request, registry: RegistryDep, settings: SettingsDep, owner: OwnerDep
) -> Response:
    """Start a new episode (memory kept for trial-scope models) or a new trial (memory cleared)."""
    body = await parse_body(request, ResetRequest, settings.max_body_bytes, empty_ok=True)
    return reply(registry.reset_session(session_id, body.scope, owner), msgpack=wants_msgpack(request.scope))


@router.get("/{session_id}/state", response_model=SessionState, responses=error_docs(401, 404))
async def get_state(session_id: str, request: Request, registry: RegistryDep, owner: OwnerDep) -> Response:
    """A portable snapshot of the session: model name and version, window, previous action, counters.

    Steps still waiting for their forward pass are not in it: ``steps`` says which step comes next.
    """
    return reply(
        session_state(await snapshots.get_state(registry, session_id, owner)),
        msgpack=wants_msgpack(request.scope),
    )


@router.put(
    "/{session_id}/state",
    response_model=SessionInfo,
    responses={
        201: {
            "model": SessionInfo,
            "description": "No session had this id: it was created from the snapshot.",
        },
        **error_docs(400, 401, 404, 409, 413, 415, 422, 429, 503),
    },
    openapi_extra=body_doc(SessionState),
)
async def put_state(
    session_id: str, request: Request, registry: RegistryDep, settings: SettingsDep, owner: OwnerDep
) -> Response:
    """Restore a snapshot: overwrite the session, or create it under this id if there is none (201).

    A snapshot of another model version gets 409 ``model_version_mismatch``; one that does not fit the
    model (shapes, non-finite numbers) gets 422 and changes nothing.
    """
    body = await parse_body(request, SessionState, settings.max_body_bytes)
    created = await snapshots.put_state(registry, session_id, snapshot_of(body), owner)
    info = registry.session_info(session_id, owner)
    return reply(info, status=201 if created else 200, msgpack=wants_msgpack(request.scope))
