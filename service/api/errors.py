"""Errors as JSON with a stable code: `{"error": {"code": "...", "message": "..."}}`.

Every non-2xx answer of replica and dealer has this body, including FastAPI's own validation
errors (422 `invalid_request`), unknown routes (404 `not_found`) and wrong methods (405).
"""

from __future__ import annotations

import asyncio
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("privdigit.errors")

# code -> (HTTP status, when it happens); the table `openapi.yaml` documents.
ERRORS: dict[str, tuple[int, str]] = {
    "invalid_request": (422, "the body does not match the schema"),
    "bad_tensor": (400, "a tensor's dtype, shape or base64 data is wrong"),
    "share_mismatch": (400, "the two replicas received shares of different shapes or outputs"),
    "request_id_mismatch": (400, "the X-Request-Id header differs from the body's request_id"),
    "unauthenticated": (401, "missing or wrong deployment credentials"),
    "scores_disabled": (403, "the operator has not enabled score outputs"),
    "wrong_party": (403, "a party asked for what belongs to another party"),
    "not_found": (404, "no such route"),
    "method_not_allowed": (405, "wrong HTTP method"),
    "replayed_request": (409, "this request id was already used"),
    "run_id_out_of_window": (
        422,
        "(dealer) the run id has no time, or one further than the window from the dealer's clock",
    ),
    "model_version_mismatch": (409, "this replica does not hold the requested model version"),
    "request_timeout": (408, "the body did not arrive in time"),
    "payload_too_large": (413, "the body exceeds the size limit"),
    "headers_too_large": (431, "the request headers exceed the size limit"),
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
        if isinstance(exc.__cause__, _Refused):  # RequestGuard stopped the body mid-read
            refused = exc.__cause__
            close = {} if refused.drained else {"connection": "close"}
            return error_response(refused.code, str(refused), close)
        code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(
            exc.status_code, "invalid_request"
        )  # FastAPI's 400 "error parsing the body" is an invalid request: 422
        return error_response(code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected failure")
        return error_response("internal", f"unexpected failure: {type(exc).__name__}")


class _Refused(Exception):
    def __init__(self, code: str, message: str, drained: bool = False) -> None:
        super().__init__(message)
        self.code, self.drained = code, drained


class RequestGuard:
    """ASGI middleware: bounds what a request may make the server read, before the app runs.

    Headers over `max_header_bytes` get 431; a body over `max_body_bytes` gets 413 whether it
    announces its length or comes chunked; a body that does not arrive within
    `body_timeout_s` (a client that stalls mid-upload) gets 408. `on_refuse(code)` counts it.

    Before a 413 or 431 the guard reads the rest of the body and discards it, up to
    `max_discard_bytes` in all and for at most `body_timeout_s`: a client sends its whole body
    before it reads the answer, and a server that answers and closes (the client asked for
    `Connection: close`, say) while bytes are still coming in resets the connection, so the
    client saw a broken pipe instead of its 413. A body announced larger than the bound is not
    read: its 413 goes out at once with `Connection: close`, and the client may miss it.
    """

    def __init__(
        self,
        app,
        *,
        max_body_bytes: int,
        max_header_bytes: int = 16_384,
        body_timeout_s: float = 10.0,
        max_discard_bytes: int = 16 * 1024 * 1024,
        on_refuse=lambda code: None,
    ) -> None:
        self.app, self.max_body, self.max_header = app, max_body_bytes, max_header_bytes
        self.timeout, self.max_discard, self.on_refuse = (
            body_timeout_s,
            max_discard_bytes,
            on_refuse,
        )

    async def _discard(self, receive, seen: int) -> bool:
        """Read and drop the rest of the body (`seen` bytes of it are in); True if it ended
        within the bounds, False if it was cut short (too large, too slow, or disconnected)."""
        try:
            async with asyncio.timeout(self.timeout):
                while seen <= self.max_discard:
                    message = await receive()
                    if message["type"] != "http.request":
                        return False
                    seen += len(message.get("body", b""))
                    if not message.get("more_body", False):
                        return seen <= self.max_discard
        except TimeoutError:
            pass
        return False

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def guarded_send(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        async def refuse(code: str, message: str, *, drained: bool = True) -> None:
            self.on_refuse(code)
            if not started:
                close = {} if drained else {"connection": "close"}
                await error_response(code, message, close)(scope, receive, send)

        length = dict(scope["headers"]).get(b"content-length")
        announced = int(length) if length is not None and length.isdigit() else None
        if sum(len(k) + len(v) for k, v in scope["headers"]) > self.max_header:
            drained = (announced or 0) <= self.max_discard and await self._discard(receive, 0)
            message = f"headers exceed {self.max_header} bytes"
            return await refuse("headers_too_large", message, drained=drained)
        if length is not None and (announced is None or announced > self.max_body):
            drained = announced is not None and announced <= self.max_discard
            drained = drained and await self._discard(receive, 0)
            message = f"body exceeds {self.max_body} bytes"
            return await refuse("payload_too_large", message, drained=drained)
        seen, complete = 0, False

        async def guarded_receive():
            nonlocal seen, complete
            if complete:  # the body is in: later receives wait for a disconnect, untimed
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.timeout)
            except TimeoutError:
                self.on_refuse("request_timeout")
                raise _Refused("request_timeout", f"no body for {self.timeout:g} s") from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if seen > self.max_body:
                    self.on_refuse("payload_too_large")
                    drained = complete or await self._discard(receive, seen)
                    complete = True  # read to its end, or given up on: the answer follows
                    raise _Refused(
                        "payload_too_large", f"body exceeds {self.max_body} bytes", drained
                    )
            return message

        try:
            await self.app(scope, guarded_receive, guarded_send)
        except _Refused as exc:  # raised outside FastAPI's body parsing
            if not started:
                close = {} if exc.drained else {"connection": "close"}
                await error_response(exc.code, str(exc), close)(scope, receive, send)
