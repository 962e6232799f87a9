"""The loaded models."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response

from service.api.body import wants_msgpack
from service.api.deps import RegistryDep, error_docs, get_owner
from service.api.replies import reply
from service.api.schemas.models import ModelList, model_info

router = APIRouter(prefix="/v1", tags=["models"], dependencies=[Depends(get_owner)])


@router.get("/models", response_model=ModelList, responses=error_docs(401))
async def list_models(request: Request, registry: RegistryDep) -> Response:
    """Every loaded model: name, version, task family, dimensions, bounds, window, memory scope, metrics."""
    return reply(
        ModelList(models=[model_info(info) for info in registry.models()]),
        msgpack=wants_msgpack(request.scope),
    )
