"""The page's own origin: a static server for `web/`, apart from the replicas.

A replica that served the page's script could change what the script does (e.g. send the whole
image to itself), so the page comes from its own origin and talks to the replicas by CORS.
Every answer carries a strict Content-Security-Policy: scripts, styles and images only from
this origin, network calls only to the configured replicas, no frames, no plugins.
`/config.json` tells the page where the replicas are: `replicas` (one pair, party 0 first) and,
when there are several pairs, `pairs` (every pair; `replicas` is the first).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles

WEB_DIR = Path(__file__).resolve().parent.parent.parent / "web"


Pair = tuple[str, str]


def _pairs(replicas: Pair | Sequence[Pair]) -> list[Pair]:
    """One pair (two URLs) or several, as a list of pairs."""
    if len(replicas) == 2 and all(isinstance(u, str) for u in replicas):
        return [(str(replicas[0]), str(replicas[1]))]
    return [(str(p[0]), str(p[1])) for p in replicas]


def content_security_policy(replicas: Pair | Sequence[Pair]) -> str:
    urls = " ".join(u for pair in _pairs(replicas) for u in pair)
    return "; ".join(
        [
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            "img-src 'self' data: blob:",
            f"connect-src 'self' {urls}",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    )


def create_web_app(replicas: Pair | Sequence[Pair], directory: Path = WEB_DIR) -> FastAPI:
    pairs = _pairs(replicas)
    settings: dict[str, list] = {"replicas": list(pairs[0])}
    if len(pairs) > 1:
        settings["pairs"] = [list(p) for p in pairs]
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
        return JSONResponse(settings)

    app.mount("/", StaticFiles(directory=directory, html=True), name="web")
    return app
