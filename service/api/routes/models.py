"""The loaded models."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response

from service.api.deps import RegistryDep, error_docs, get_owner
from service.api.replies import json_reply
from service.schemas import ModelList

router = APIRouter(prefix="/v1", tags=["models"], dependencies=[Depends(get_owner)])


@router.get("/models", response_model=ModelList, responses=error_docs(401))
async def list_models(registry: RegistryDep) -> Response:
    """Every loaded model: name, version, task family, dimensions, bounds, window, memory scope, metrics."""
    return json_reply(ModelList(models=registry.models()))
