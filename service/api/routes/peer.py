"""WebSocket `/v1/peer`: party 1 accepts party 0's peer stream here (`transport/peer.py` runs
it); party 0 refuses, and with mutual TLS only a certificate naming replica 0 gets in."""

from __future__ import annotations

from fastapi import APIRouter, WebSocket

from service import identity
from service.api.routes.deps import ReplicaDep

router = APIRouter()


class StarletteConn:
    """Starlette's WebSocket as the peer link's `Conn`."""

    def __init__(self, ws: WebSocket) -> None:
        self._ws = ws

    async def send(self, data: bytes | str) -> None:
        if isinstance(data, bytes):
            await self._ws.send_bytes(data)
        else:
            await self._ws.send_text(data)

    async def recv(self) -> bytes | str:
        msg = await self._ws.receive()
        if msg["type"] == "websocket.disconnect":
            raise ConnectionError("peer closed the stream")
        return msg["bytes"] if msg.get("bytes") is not None else msg.get("text", "")

    async def close(self, code: int, reason: str) -> None:
        await self._ws.close(code, reason)


@router.websocket("/v1/peer")
async def peer(ws: WebSocket, rep: ReplicaDep) -> None:
    await ws.accept()
    if rep.party != 1:
        rep.metrics.auth_failures.labels("peer").inc()
        await ws.close(4403, "party 0 does not accept peer connections")
        return
    if rep.mutual_tls and identity.scope_role(ws.scope) != rep.peer_role:
        rep.metrics.auth_failures.labels("peer").inc()
        role = identity.scope_role(ws.scope) or "no certificate"
        await ws.close(4403, f"only {rep.peer_role} may dial here, not {role}")
        return
    await rep.peer.run(StarletteConn(ws), initiator=False)
