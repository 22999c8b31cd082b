"""The dealer's web app: `POST /v1/randomness` hands a replica its material for one request id.

The body names the request id, the party and the public plan (kinds and shapes); the answer is
the party's seed, plus for party 1 the corrections (see `wire.py`). Each (request id, party) is
served once (409 `replayed_request` after). Party p's material goes to party p only
(`service.identity`): the body's MAC must be made with party p's own credential, which only
replica p and the dealer hold (401 `unauthenticated` otherwise; 403 `wrong_party`, counted,
when it is the other replica's), and with TLS the client certificate must name replica p
(403 `wrong_party` for the other replica's, 401 for none). The dealer sees no shares and no
data, only shapes. The request id must be a run id (`dealer.new_run_id`: its minting time, "-",
random characters) within `run_id_window_s` of the dealer's clock (422 `run_id_out_of_window`
otherwise), so the served-once rule forgets ids as they age out and its memory stays bounded.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest

from service import identity
from service.api import auth
from service.api.errors import ApiError, RequestGuard, install_error_handlers
from service.api.schemas import REQUEST_ID_PATTERN, ErrorBody, Health
from service.api.settings import DealerSettings
from service.api.transport import wire
from service.mpc.dealer import (
    Dealer,
    PlanTooLarge,
    RandomnessReused,
    RunIdOutOfWindow,
    validate_plan,
)

log = logging.getLogger("privdigit.dealer")
_RID = re.compile(REQUEST_ID_PATTERN)


def create_dealer_app(settings: DealerSettings, dealer: Dealer | None = None) -> FastAPI:
    keys = settings.party_secrets()
    mutual_tls = settings.mutual_tls
    dealer = dealer or Dealer(window_s=settings.run_id_window_s)
    registry = CollectorRegistry()
    served = Counter("privdigit_dealer_served", "materials served", ["party"], registry=registry)
    refused = Counter("privdigit_dealer_refused", "requests refused", ["code"], registry=registry)
    served_bytes = Counter("privdigit_dealer_bytes", "material bytes sent", registry=registry)

    app = FastAPI(title="privdigit dealer", version="1", docs_url=None, redoc_url=None)
    install_error_handlers(app)
    app.add_middleware(
        RequestGuard,
        max_body_bytes=1_000_000,
        on_refuse=lambda code: refused.labels(code).inc(),
    )

    def refuse(code: str, message: str) -> ApiError:
        refused.labels(code).inc()
        return ApiError(code, message)

    @app.get("/v1/health", response_model=Health)
    async def health() -> Health:
        return Health(status="ok", party=-1)

    @app.post(
        "/v1/randomness",
        response_class=Response,
        responses={
            200: {"content": {"application/octet-stream": {}}},
            **{s: {"model": ErrorBody} for s in (400, 401, 403, 409, 413, 422)},
        },
    )
    async def randomness(request: Request) -> Response:
        body = await request.body()
        try:
            req = json.loads(body)
            rid, party = str(req["request_id"]), int(req["party"])
            plan = wire.plan_from_json(req["plan"])
        except (ValueError, KeyError, TypeError, OverflowError, RecursionError) as exc:
            msg = f"body is not a randomness request ({type(exc).__name__})"
            raise refuse("invalid_request", msg) from None
        if not _RID.match(rid) or party not in (0, 1):
            raise refuse("invalid_request", "request_id or party is malformed")
        tag = request.headers.get(auth.AUTH_HEADER)
        try:
            auth.verify(keys[party], tag, "dealer", str(party), body)
        except auth.AuthError as exc:
            with contextlib.suppress(auth.AuthError):
                auth.verify(keys[1 - party], tag, "dealer", str(party), body)
                raise refuse(
                    "wrong_party",
                    f"this is replica {1 - party}'s credential: the dealer serves party "
                    f"{party}'s material to party {party} only",
                ) from None
            raise refuse("unauthenticated", str(exc)) from None
        if mutual_tls:
            role = identity.scope_role(request.scope)
            if role is None:
                raise refuse("unauthenticated", "a replica's client certificate is required")
            if role != identity.replica_role(party):
                raise refuse(
                    "wrong_party",
                    f"the client certificate names {role}: the dealer serves party {party}'s "
                    f"material to {identity.replica_role(party)} only",
                )
        try:
            validate_plan(plan, settings.max_plan_elements)
        except PlanTooLarge as exc:
            raise refuse("payload_too_large", str(exc)) from None
        except ValueError as exc:
            raise refuse("invalid_request", f"plan cannot be dealt: {exc}") from None
        try:
            material = await run_in_threadpool(dealer.deal, rid, party, plan)
        except RandomnessReused as exc:
            raise refuse("replayed_request", str(exc)) from None
        except RunIdOutOfWindow as exc:
            raise refuse("run_id_out_of_window", str(exc)) from None
        data = wire.material_to_bytes(material)
        served.labels(str(party)).inc()
        served_bytes.inc(len(data))
        return Response(memoryview(data), media_type="application/octet-stream")

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app
