"""A replica's web app: it holds one share of the model and runs the network with its peer.

This module only builds the app: the `Replica` domain object (`replica.py`), its lifespan
(reload, background tasks, clean stop), the error handlers and body guard (`errors.py`), CORS,
the API description (`replica_api.md` plus the error table from `errors.ERRORS`) and the routes
(`routes/`). The contract is `openapi.yaml`: `GET /v1/health`, `GET /v1/ready`,
`GET /v1/model`, `POST /v1/predict`, `POST /v1/admin/reload` (the operator's admin key),
`GET /metrics`, and the WebSocket `/v1/peer` (party 1 accepts party 0 there; protocol rounds
run on the direct lanes of `transport/lanes.py` when they are up).
"""

from __future__ import annotations

import contextlib
from contextlib import asynccontextmanager
from pathlib import Path

import torch
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from service.api.errors import ERRORS, RequestGuard, install_error_handlers
from service.api.replica import Replica
from service.api.routes import ROUTERS
from service.api.schemas import REQUEST_ID_HEADER
from service.api.settings import ReplicaSettings
from service.store import StoreError

DESCRIPTION_FILE = Path(__file__).with_name("replica_api.md")


def api_description() -> str:
    """The OpenAPI description: `replica_api.md`, then one table row per error code."""
    rows = "\n".join(f"| `{c}` | {st} | {why} |" for c, (st, why) in ERRORS.items())
    return DESCRIPTION_FILE.read_text(encoding="utf-8") + rows + "\n"


def max_body_bytes(max_batch: int) -> int:
    """Largest predict body: base64 of max_batch images of 784 int64, plus JSON framing."""
    return (max_batch * 784 * 8 * 4) // 3 + 16_384


def create_replica_app(settings: ReplicaSettings) -> FastAPI:
    rep = Replica(settings)
    torch.set_num_threads(settings.torch_threads)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        with contextlib.suppress(StoreError):
            await rep.reload()
        tasks = rep.start()
        yield
        await rep.stop(tasks)

    app = FastAPI(
        title="privdigit replica",
        version="1.0.0",
        description=api_description(),
        lifespan=lifespan,
    )
    app.state.replica = rep
    install_error_handlers(app)
    app.add_middleware(  # inside CORS, so that its refusals carry CORS headers
        RequestGuard,
        max_body_bytes=max_body_bytes(settings.max_batch),
        body_timeout_s=settings.peer_timeout_s,
        on_refuse=lambda code: rep.metrics.errors.labels(code).inc(),
    )
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["content-type", "x-api-key", REQUEST_ID_HEADER.lower()],
            max_age=600,
        )
    for router in ROUTERS:
        app.include_router(router)
    return app
