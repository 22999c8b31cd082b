"""`POST /v1/predict`: one client request on this party's share; counted, timed and logged
here (never the shares), run by `Replica.predict`."""

from __future__ import annotations

import logging
import time

from fastapi import APIRouter, Header, Request

from service.api.errors import ApiError
from service.api.routes.deps import ApiKey, ReplicaDep, error_responses
from service.api.schemas import REQUEST_ID_HEADER, PredictRequest, PredictResponse

log = logging.getLogger("privdigit.replica")
router = APIRouter()


@router.post(
    "/v1/predict",
    response_model=PredictResponse,
    tags=["inference"],
    responses=error_responses(
        "bad_tensor",
        "share_mismatch",
        "request_id_mismatch",
        "unauthenticated",
        "scores_disabled",
        "replayed_request",
        "model_version_mismatch",
        "payload_too_large",
        "batch_too_large",
        "invalid_request",
        "busy",
        "internal",
        "peer_error",
        "not_ready",
        "dealer_unavailable",
        "peer_timeout",
    ),
)
async def predict(
    body: PredictRequest,
    request: Request,
    rep: ReplicaDep,
    api_key: ApiKey,
    request_id: str | None = Header(
        default=None,
        alias=REQUEST_ID_HEADER,
        description="optional copy of the body's request_id, so that an L7 load balancer "
        "can send both shares of a request to one replica pair; a different value is "
        "refused with 400 request_id_mismatch",
    ),
) -> PredictResponse:
    """Run the network on this party's share of a batch; returns this party's share."""
    started = time.perf_counter()
    try:
        rep.check_api_key(api_key)
        if request_id is not None and request_id != body.request_id:
            raise ApiError(
                "request_id_mismatch",
                f"the {REQUEST_ID_HEADER} header names another request than the body's request_id",
            )
        out = await rep.predict(body, request.client.host if request.client else "")
    except ApiError as exc:
        rep.metrics.errors.labels(exc.code).inc()
        rep.metrics.requests.labels(body.output, str(exc.status)).inc()
        log.info(
            "predict refused",
            extra={"fields": {"request_id": body.request_id, "code": exc.code}},
        )
        raise
    ms = (time.perf_counter() - started) * 1000
    rep.metrics.requests.labels(body.output, "200").inc()
    rep.metrics.latency.observe(ms / 1000)
    log.info(
        "predict",
        extra={
            "fields": {
                "request_id": body.request_id,
                "batch": body.input.shape[0],
                "output": body.output,
                "model_version": out.model_version,
                "rounds": out.rounds,
                "peer_bytes": out.peer_bytes,
                "ms": round(ms, 2),
            }
        },
    )
    return out
