"""Errors as JSON with a stable code: `{"error": {"code": "...", "message": "..."}}`.

Every non-2xx answer of replica and dealer has this body, including FastAPI's own validation
errors (422 `invalid_request`), unknown routes (404 `not_found`) and wrong methods (405).
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

# code -> (HTTP status, when it happens); the table `openapi.yaml` documents.
ERRORS: dict[str, tuple[int, str]] = {
    "invalid_request": (422, "the body does not match the schema"),
    "bad_tensor": (400, "a tensor's dtype, shape or base64 data is wrong"),
    "share_mismatch": (400, "the two replicas received shares of different shapes or outputs"),
    "unauthenticated": (401, "missing or wrong deployment credentials"),
    "scores_disabled": (403, "the operator has not enabled score outputs"),
    "not_found": (404, "no such route"),
    "method_not_allowed": (405, "wrong HTTP method"),
    "replayed_request": (409, "this request id was already used"),
    "model_version_mismatch": (409, "this replica does not hold the requested model version"),
    "payload_too_large": (413, "the body exceeds the size limit"),
    "batch_too_large": (413, "more images than the replica's max_batch"),
    "busy": (429, "too many inferences in flight; retry after the Retry-After seconds"),
    "internal": (500, "an unexpected failure; see the replica's log"),
    "peer_error": (502, "the peer replica aborted or sent something invalid"),
    "not_ready": (503, "share not loaded, peer not connected or versions disagree"),
    "dealer_unavailable": (503, "the dealer could not be reached or refused"),
    "peer_timeout": (504, "the peer replica did not answer in time (did it get its share?)"),
}


class ApiError(Exception):
    def __init__(self, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.headers = code, message, headers
        self.status = ERRORS[code][0]


def error_response(code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": code, "message": message}}, status_code=ERRORS[code][0], headers=headers
    )


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {err.get('msg')}")
    return "; ".join(parts) or "invalid request"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.code, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response("invalid_request", _validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(
            exc.status_code, "invalid_request"
        )
        return JSONResponse(
            {"error": {"code": code, "message": str(exc.detail)}},
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )
