"""`GET /v1/model`: the public manifest of the model being served."""

from __future__ import annotations

from fastapi import APIRouter

from service.api.errors import ApiError
from service.api.routes.deps import ApiKey, ReplicaDep, error_responses
from service.api.schemas import ModelInfo

router = APIRouter()


@router.get(
    "/v1/model",
    response_model=ModelInfo,
    tags=["model"],
    responses=error_responses("unauthenticated", "not_ready"),
)
async def model_info(rep: ReplicaDep, api_key: ApiKey) -> ModelInfo:
    """The public manifest of the model being served (else the newest this replica holds)."""
    rep.check_api_key(api_key)
    serving = rep.registry.newest_common(rep.peer.peer_versions)
    shown = serving or rep.registry.latest
    if shown is None:
        raise ApiError("not_ready", f"no model loaded: {rep.registry.last_error}")
    info = shown.public_info()
    return ModelInfo(
        party=rep.party,
        serving_version=serving.version if serving else None,
        scores_enabled=rep.settings.scores_enabled,
        max_batch=rep.settings.max_batch,
        **info,
    )
