"""Status routes: liveness (`/v1/health`), readiness (`/v1/ready`) and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.api.routes.deps import ReplicaDep
from service.api.schemas import Readiness, ReplicaHealth

router = APIRouter()


@router.get("/v1/health", response_model=ReplicaHealth, tags=["status"])
async def health(rep: ReplicaDep) -> ReplicaHealth:
    """Liveness: the process answers; which party of which pair it is."""
    return ReplicaHealth(status="ok", party=rep.party, pair=rep.settings.pair)


@router.get(
    "/v1/ready",
    response_model=Readiness,
    tags=["status"],
    responses={503: {"model": Readiness, "description": "not ready; `reasons` says why"}},
)
async def ready(rep: ReplicaDep) -> JSONResponse:
    """Ready when the share is loaded, the peer is connected and both hold the same version."""
    r = rep.readiness()
    return JSONResponse(r.model_dump(), status_code=200 if r.ready else 503)


@router.get("/metrics", include_in_schema=False)
async def metrics(rep: ReplicaDep) -> Response:
    rep.readiness()
    rep.metrics.pending.set(rep.peer.pending)
    rep.metrics.prefetch_entries.set(len(rep.pool) + rep.pool.claimed)
    return Response(generate_latest(rep.metrics.registry), media_type=CONTENT_TYPE_LATEST)
