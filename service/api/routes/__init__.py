"""The replica's routes, one `APIRouter` per concern; `replica_app.py` includes them in order.

    deps.py     the dependencies: the app's `Replica`, the client API key, OpenAPI error docs
    health.py   GET /v1/health, GET /v1/ready, GET /metrics
    model.py    GET /v1/model
    predict.py  POST /v1/predict
    admin.py    POST /v1/admin/reload
    peer.py     WebSocket /v1/peer (party 1 accepts party 0 there)
Handlers stay short: they check credentials, call the `Replica` and shape the answer.
"""

from service.api.routes import admin, health, model, peer, predict

ROUTERS = (health.router, model.router, predict.router, admin.router, peer.router)

__all__ = ["ROUTERS"]
