"""Sessions: create, inspect, delete, reset."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from service.api.body import parse_body
from service.api.deps import RegistryDep, SettingsDep, body_doc, error_docs
from service.api.replies import json_reply
from service.schemas import CreateSessionRequest, CreateSessionResponse, ResetRequest, SessionInfo

router = APIRouter(prefix="/v1/sessions", tags=["sessions"])


@router.post(
    "",
    status_code=201,
    response_model=CreateSessionResponse,
    responses=error_docs(400, 404, 413, 415, 422, 429),
    openapi_extra=body_doc(CreateSessionRequest, required=False),
)
async def create_session(request: Request, registry: RegistryDep, settings: SettingsDep) -> Response:
    """Create a session: a slot of memory on the device for one robot or environment."""
    body = await parse_body(request, CreateSessionRequest, settings.max_body_bytes, empty_ok=True)
    engine, session_id = registry.create_session(body)
    ttl_s = float(engine.table.ttl_s[engine.table.get(session_id)])
    reply = CreateSessionResponse(
        session_id=session_id, model=engine.info(default=engine.name == registry.default), ttl_s=ttl_s
    )
    return json_reply(reply, status=201)


@router.get("/{session_id}", response_model=SessionInfo, responses=error_docs(404))
async def get_session(session_id: str, registry: RegistryDep) -> Response:
    """A session's step and episode counts, times and model version."""
    return json_reply(registry.session_info(session_id))


@router.delete("/{session_id}", status_code=204, response_class=Response, responses=error_docs(404))
async def delete_session(session_id: str, registry: RegistryDep) -> Response:
    """End a session and free its slot."""
    registry.delete_session(session_id)
    return Response(status_code=204)


@router.post(
    "/{session_id}/reset",
    response_model=SessionInfo,
    responses=error_docs(400, 404, 413, 415, 422),
    openapi_extra=body_doc(ResetRequest, required=False),
)
async def reset_session(
    session_id: str, request: Request, registry: RegistryDep, settings: SettingsDep
) -> Response:
    """Start a new episode (memory kept for trial-scope models) or a new trial (memory cleared)."""
    body = await parse_body(request, ResetRequest, settings.max_body_bytes, empty_ok=True)
    return json_reply(registry.reset_session(session_id, body.scope))
