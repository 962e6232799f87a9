"""Acting: one step of one session, or one step of many sessions in one request.

These handlers take the bare ``Request``: the fast path (``service.api.fastpath``) calls them
directly, ahead of FastAPI's routing and dependency machinery, which costs more per request than a
session's share of the batched step. They are registered as routes too, which documents them in the
OpenAPI schema with their request and response models.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request, Response

from service.api.body import parse_act_batch, parse_body, wants_msgpack
from service.api.deps import authenticate, body_doc, body_doc_one_of, error_docs, registry_of, settings_of
from service.api.replies import columnar_reply, reply
from service.api.schemas.act import (
    ActBatchRequest,
    ActBatchResponse,
    ActColumnarRequest,
    ActColumnarResponse,
    ActRequest,
    ActResponse,
)
from service.api.schemas.common import ErrorBody
from service.core import acting
from service.core.errors import ServiceError
from service.core.records import ActResult, ColumnarTick

router = APIRouter(tags=["act"])


def act_response(result: ActResult) -> ActResponse:
    """The body of a step's answer (read from the record's attributes: cheaper than keywords)."""
    return ActResponse.model_validate(result, from_attributes=True)


@router.post(
    "/v1/act",
    response_model=ActResponse,
    responses=error_docs(400, 401, 404, 409, 413, 415, 422, 429, 503),
    openapi_extra=body_doc(ActRequest),
)
async def act(request: Request) -> Response:
    """Step one session (created first when ``session_id`` is omitted) and return its action.

    JSON or MessagePack (``Content-Type: application/msgpack``; arrays as lists or msgpack-numpy maps).
    """
    started = time.perf_counter_ns()
    owner = authenticate(request.scope)
    body = await parse_body(request, ActRequest, settings_of(request).max_body_bytes)
    result = await acting.act(registry_of(request), body, started, owner)
    return reply(result, msgpack=wants_msgpack(request.scope))


router.add_api_route(
    "/act",
    act,
    methods=["POST"],
    summary="Act (alias of /v1/act)",
    response_model=ActResponse,
    responses=error_docs(400, 401, 404, 409, 413, 415, 422, 429, 503),
    openapi_extra=body_doc(ActRequest),
)


def _one_of_examples(*models: type[ActBatchResponse | ActColumnarResponse]) -> dict[str, Any]:
    examples = {}
    for model in models:
        extra = model.model_config.get("json_schema_extra")
        assert isinstance(extra, dict)
        examples[model.__name__] = {"value": extra["examples"][0]}  # type: ignore[index]
    return {"content": {"application/json": {"examples": examples}}}


@router.post(
    "/v1/act/batch",
    response_model=ActBatchResponse | ActColumnarResponse,
    responses={
        200: _one_of_examples(ActBatchResponse, ActColumnarResponse),
        **error_docs(400, 401, 404, 413, 415, 422, 503),
    },
    openapi_extra=body_doc_one_of(ActBatchRequest, ActColumnarRequest),
)
async def act_batch(request: Request) -> Response:
    """Step many sessions in one request (a simulator's tick): as a list of act items, each answered
    by its own action or error in order; or as columns (``session_ids``, ``observations [B, obs_dim]``,
    ...), answered by columns, with the rows that failed listed in ``errors`` (their actions NaN in
    MessagePack, ``null`` in JSON)."""
    started = time.perf_counter_ns()
    owner = authenticate(request.scope)
    items = await parse_act_batch(request, settings_of(request).max_body_bytes)
    if isinstance(items, ColumnarTick):
        result = await acting.act_columnar(registry_of(request), items, started, owner)
        return columnar_reply(result, msgpack=wants_msgpack(request.scope))
    valid = [item for item in items if not isinstance(item, ServiceError)]
    results = iter(await acting.act_batch(registry_of(request), valid, started, owner))
    answers: list[ActResponse | ErrorBody] = []
    for item in items:
        outcome = item if isinstance(item, ServiceError) else next(results)
        answers.append(
            ErrorBody.model_validate(outcome.body())
            if isinstance(outcome, ServiceError)
            else act_response(outcome)
        )
    return reply(ActBatchResponse.model_construct(items=answers), msgpack=wants_msgpack(request.scope))
