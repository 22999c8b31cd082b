"""`POST /v1/admin/reload`: the operator loads the model directory's current model now."""

from __future__ import annotations

from fastapi import APIRouter, Header

from service.api import auth
from service.api.errors import ApiError
from service.api.routes.deps import ReplicaDep, error_responses
from service.api.schemas import ReloadResult
from service.store import StoreError

router = APIRouter()


@router.post(
    "/v1/admin/reload",
    response_model=ReloadResult,
    tags=["admin"],
    responses=error_responses("unauthenticated", "not_ready"),
)
async def reload(
    rep: ReplicaDep,
    x_privdigit_auth: str | None = Header(
        default=None,
        description="`time:nonce:mac` from the replica's admin key (`service.api.auth."
        "admin_tag`), usable once within a minute",
    ),
) -> ReloadResult:
    """Load the model directory's current model now (also done by the directory watch)."""
    try:
        rep.admin.check(x_privdigit_auth)
    except auth.AuthError as exc:
        rep.metrics.auth_failures.labels("admin").inc()
        raise ApiError("unauthenticated", str(exc)) from None
    try:
        changed = await rep.reload()
    except StoreError as exc:
        raise ApiError("not_ready", f"reload refused, old model kept: {exc}") from None
    latest = rep.registry.latest
    assert latest is not None  # a reload that succeeded holds a model
    return ReloadResult(
        changed=changed,
        model_version=latest.version,
        message="loaded a new version" if changed else "already serving this version",
    )
