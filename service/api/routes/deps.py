"""What the replica's routes depend on: the app's `Replica` (`ReplicaDep`), the client's
X-API-Key header (`ApiKey`), and the OpenAPI `responses` for a route's error codes."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Security
from fastapi.requests import HTTPConnection
from fastapi.security import APIKeyHeader

from service.api.errors import ERRORS
from service.api.replica import Replica
from service.api.schemas import ErrorBody


async def get_replica(conn: HTTPConnection) -> Replica:
    """The replica this app was built around (`create_replica_app`), never a global. A
    coroutine, so FastAPI calls it on the event loop (a plain function would cost every request
    a hop through its thread pool)."""
    return conn.app.state.replica


ReplicaDep = Annotated[Replica, Depends(get_replica)]

API_KEY = APIKeyHeader(
    name="X-API-Key",
    auto_error=False,
    description="needed only where the operator configured client API keys",
)
ApiKey = Annotated[str | None, Security(API_KEY)]  # checked by `Replica.check_api_key`

_ERR = {"model": ErrorBody}


def error_responses(*codes: str) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for the given error codes, grouped by status."""
    out: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        status = ERRORS[code][0]
        entry = out.setdefault(status, {**_ERR, "description": ""})
        entry["description"] = "; ".join(
            d for d in (entry["description"], f"`{code}`: {ERRORS[code][1]}") if d
        )
    return out
