"""The page's own origin: a static server for `web/`, apart from the replicas.

A replica that served the page's script could change what the script does (e.g. send the whole
image to itself), so the page comes from its own origin and talks to the replicas by CORS.
Every answer carries a strict Content-Security-Policy: scripts, styles and images only from
this origin, network calls only to the two configured replicas, no frames, no plugins.
`/config.json` tells the page where the replicas are.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles

WEB_DIR = Path(__file__).resolve().parent.parent.parent / "web"


def content_security_policy(replicas: tuple[str, str]) -> str:
    return "; ".join(
        [
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            "img-src 'self' data: blob:",
            f"connect-src 'self' {replicas[0]} {replicas[1]}",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    )


def create_web_app(replicas: tuple[str, str], directory: Path = WEB_DIR) -> FastAPI:
    app = FastAPI(title="privdigit page", docs_url=None, redoc_url=None, openapi_url=None)
    csp = content_security_policy(replicas)

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        response.headers["Content-Security-Policy"] = csp
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["Cache-Control"] = "no-store"
        return response

    @app.get("/config.json")
    async def config() -> JSONResponse:
        return JSONResponse({"replicas": list(replicas)})

    app.mount("/", StaticFiles(directory=directory, html=True), name="web")
    return app
