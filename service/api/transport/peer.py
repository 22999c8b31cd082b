"""The peer stream: one persistent, authenticated WebSocket between the replicas, multiplexed.

Party 0 dials party 1's `/v1/peer` and redials by itself when the stream drops; party 1 accepts
(a newer authenticated connection replaces an older one). Opening the stream is a mutual
HMAC challenge-response (`auth.py`) that also tells each side which model versions the other
holds; a HAVE frame repeats that after every reload.

Each protocol run has an id (a batch id, see `batching/`). Its frames (one DATA frame per
round, or ABORT) go into a per-run mailbox, so any number of inferences share the one stream.
Frames that arrive before the local request starts (the client's post reached the peer first)
wait in their mailbox; unclaimed mailboxes expire. `PeerChannel` is the engine's `Channel` for
one request: protocol code runs in a worker thread and blocks on its mailbox, the event loop
does all socket I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from service.api import auth
from service.api.transport import wire
from service.mpc.channel import ChannelError, ChannelStats

log = logging.getLogger("privdigit.peer")
HELLO = "privdigit-peer/1"
MAX_FRAME = 256 * 1024 * 1024
MAX_MAILBOXES = 4096


class PeerTimeout(ChannelError):
    """The peer sent nothing for this request within the timeout."""


class PeerLost(ChannelError):
    """The stream to the peer is down (or went down during the request)."""


class MaterialMismatch(ChannelError):
    """The two replicas hold dealer material from different dealer instances (a restart)."""


class PeerAborted(ChannelError):
    """The peer gave up on this request and said why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class Conn(Protocol):
    async def send(self, data: bytes | str) -> None: ...
    async def recv(self) -> bytes | str: ...
    async def close(self, code: int, reason: str) -> None: ...


@dataclass
class _Mailbox:
    q: queue.Queue = field(default_factory=queue.Queue)
    created: float = field(default_factory=time.monotonic)
    claimed: bool = False


class PeerLink:
    """This replica's end of the peer stream (one per replica process, passed explicitly)."""

    def __init__(
        self,
        secret: bytes,
        versions: Callable[[], list[str]],
        *,
        timeout: float = 10.0,
        on_auth_failure: Callable[[], None] = lambda: None,
    ) -> None:
        self._secret = secret
        self._versions = versions
        self.timeout = timeout
        self._on_auth_failure = on_auth_failure
        self._loop: asyncio.AbstractEventLoop | None = None
        self._conn: Conn | None = None
        self._outbox: asyncio.Queue[bytes | str] | None = None
        self._boxes: dict[str, _Mailbox] = {}
        self._lock = threading.Lock()
        self.peer_versions: list[str] = []
        self.last_error: str | None = None
        # set by the replica: control frames (pairing, batching) and loss of the stream
        self.on_control: Callable[[wire.Frame], None] = lambda frame: None
        self.on_disconnect: Callable[[str], None] = lambda reason: None
        self.on_connect: Callable[[], None] = lambda: None

    @property
    def connected(self) -> bool:
        return self._conn is not None

    # -- connection side (event loop) ----------------------------------------------------------

    async def _handshake(self, conn: Conn, initiator: bool) -> list[str]:
        mine = json.dumps(self._versions())
        if initiator:  # party 0
            hello = json.loads(await asyncio.wait_for(conn.recv(), self.timeout))
            if hello.get("hello") != HELLO or hello.get("party") != 1:
                raise auth.AuthError("the other end is not a party-1 privdigit replica")
            ns, nc = str(hello["nonce"]), auth.nonce()
            tag = auth.mac(self._secret, "peer", "0", ns, nc, mine)
            await conn.send(json.dumps({"party": 0, "nonce": nc, "versions": mine, "mac": tag}))
            reply = json.loads(await asyncio.wait_for(conn.recv(), self.timeout))
            auth.verify(self._secret, reply.get("mac"), "peer", "1", ns, nc, reply["versions"])
            return list(json.loads(reply["versions"]))
        ns = auth.nonce()
        await conn.send(json.dumps({"hello": HELLO, "party": 1, "nonce": ns}))
        msg = json.loads(await asyncio.wait_for(conn.recv(), self.timeout))
        if msg.get("party") != 0:
            raise auth.AuthError("only party 0 may dial party 1")
        nc = str(msg["nonce"])
        auth.verify(self._secret, msg.get("mac"), "peer", "0", ns, nc, msg["versions"])
        tag = auth.mac(self._secret, "peer", "1", ns, nc, mine)
        await conn.send(json.dumps({"versions": mine, "mac": tag}))
        return list(json.loads(msg["versions"]))

    async def run(self, conn: Conn, *, initiator: bool) -> None:
        """Authenticate `conn`, then carry frames until it closes."""
        try:
            versions = await self._handshake(conn, initiator)
        except Exception as exc:  # wrong MAC, garbage JSON, wrong types, silence: all refused
            self._on_auth_failure()
            log.warning("peer handshake refused: %s", type(exc).__name__)
            with contextlib.suppress(Exception):
                await conn.close(4401, "unauthenticated")
            return
        self._loop = asyncio.get_running_loop()
        old = self._conn
        if old is not None:
            self._detach("replaced by a new peer connection")
            with contextlib.suppress(Exception):
                await old.close(1000, "replaced")
        self._conn, self._outbox = conn, asyncio.Queue()
        self.peer_versions, self.last_error = versions, None
        log.info("peer connected", extra={"fields": {"peer_versions": versions}})
        writer = asyncio.create_task(self._write(conn, self._outbox))
        self.on_connect()
        try:
            while True:
                data = await conn.recv()
                if isinstance(data, str):
                    raise wire.WireError("text frame after the handshake")
                self._deliver(wire.decode_frame(data))
        except Exception as exc:  # closed, or garbage: drop the stream, the dialer redials
            self.last_error = f"peer stream closed: {type(exc).__name__}: {exc}"
        finally:
            writer.cancel()
            if self._conn is conn:
                self._detach(self.last_error or "peer stream closed")
            with contextlib.suppress(Exception):
                await conn.close(1000, "bye")

    async def _write(self, conn: Conn, outbox: asyncio.Queue) -> None:
        with contextlib.suppress(Exception):
            while True:
                await conn.send(await outbox.get())

    async def dial_forever(self, url: str, *, ssl: Any = None, expect: str | None = None) -> None:
        """Party 0: keep a stream to party 1 open, redialling with backoff when it drops.

        `expect`: the role party 1's TLS certificate must name (`service.identity`)."""
        from websockets.asyncio.client import connect

        from service import identity

        delay = 0.1
        while True:
            try:
                async with connect(
                    url, max_size=MAX_FRAME, ssl=ssl, open_timeout=self.timeout, compression=None
                ) as ws:
                    if expect is not None:
                        identity.expect_role(ws.transport.get_extra_info("ssl_object"), expect)
                    delay = 0.1
                    await self.run(ws, initiator=True)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if isinstance(exc, identity.IdentityError):
                    self._on_auth_failure()
                self.last_error = f"cannot reach peer at {url}: {type(exc).__name__}: {exc}"
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    def _detach(self, reason: str) -> None:
        self._conn, self._outbox, self.peer_versions = None, None, []
        with self._lock:
            for box in self._boxes.values():
                box.q.put(PeerLost(reason))
        self.on_disconnect(reason)
        log.warning("peer disconnected: %s", reason)

    def _deliver(self, frame: wire.Frame) -> None:
        if frame.kind == wire.HAVE:
            self.peer_versions = [str(v) for v in (frame.payload or {}).get("versions", [])]
            return
        if frame.kind in wire.CONTROL:
            self.on_control(frame)
            return
        with self._lock:
            box = self._boxes.get(frame.request_id)
            if box is None:
                if len(self._boxes) >= MAX_MAILBOXES:
                    self._expire_locked()
                    if len(self._boxes) >= MAX_MAILBOXES:
                        log.warning("too many pending peer requests; frame dropped")
                        return
                box = self._boxes[frame.request_id] = _Mailbox()
        box.q.put(frame)

    def _expire_locked(self) -> None:
        cutoff = time.monotonic() - 2 * self.timeout
        for rid in [r for r, b in self._boxes.items() if not b.claimed and b.created < cutoff]:
            del self._boxes[rid]

    async def janitor(self) -> None:
        """Forget frames for requests that never started here (their client gave up)."""
        while True:
            await asyncio.sleep(self.timeout)
            with self._lock:
                self._expire_locked()

    async def announce(self) -> None:
        """Tell the peer which versions this replica now holds (after a reload)."""
        if self._outbox is not None:
            self._outbox.put_nowait(wire.encode_json(wire.HAVE, "", {"versions": self._versions()}))

    # -- request side (worker threads) ---------------------------------------------------------

    def send(self, frame: bytes) -> None:
        loop, outbox = self._loop, self._outbox
        if loop is None or outbox is None:
            raise PeerLost("the peer replica is not connected")
        loop.call_soon_threadsafe(outbox.put_nowait, frame)

    def channel(self, request_id: str) -> PeerChannel:
        with self._lock:
            box = self._boxes.setdefault(request_id, _Mailbox())
            if box.claimed:
                raise ChannelError(f"request id {request_id!r} is already running")
            box.claimed = True
        return PeerChannel(self, request_id, box.q)

    def release(self, request_id: str) -> None:
        with self._lock:
            self._boxes.pop(request_id, None)

    @property
    def pending(self) -> int:
        return len(self._boxes)


class FramedChannel:
    """The engine's `Channel` for one run over some frame transport; counts rounds and bytes.

    A subclass moves frames (`_send`, `_receive`); this class checks that each DATA frame is the
    peer's answer to this round (run id, round number, tensor shapes) and turns ABORT into
    `PeerAborted`. With `check` set (the run's dealer instance, see `Replica.run_batch`), round 0
    also carries it as one extra int64, not counted in `stats`, and a peer whose value differs
    raises `MaterialMismatch`: randomness from two dealers never silently yields a wrong label.
    """

    def __init__(self, request_id: str, timeout: float) -> None:
        self.request_id, self.timeout = request_id, timeout
        self.stats = ChannelStats()
        self.check: int | None = None
        self._round = 0

    def _send(self, frame: bytes) -> None:
        raise NotImplementedError

    def _receive(self) -> wire.Frame | Exception:
        raise NotImplementedError

    def _next(self) -> wire.Frame:
        item = self._receive()
        while (
            not isinstance(item, Exception)
            and item.kind == wire.ABORT
            and item.request_id != self.request_id
        ):  # an earlier run's ABORT, left on a lane (see `LaneChannel.close`): that run is over
            item = self._receive()
        if isinstance(item, Exception):
            raise item
        if item.kind == wire.ABORT:
            p = item.payload or {}
            raise PeerAborted(str(p.get("code", "peer_error")), str(p.get("message", "aborted")))
        return item

    def _timed_out(self) -> PeerTimeout:
        return PeerTimeout(
            f"the peer replica sent nothing for {self.timeout:g} s "
            "(did the client post the other share with the same request id?)"
        )

    def _swap(self, frame: bytes) -> wire.Frame:
        """Send this round's frame and receive the peer's (in the order the transport needs)."""
        self._send(frame)
        return self._next()

    def exchange(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        self.stats.record(tensors)
        checked = self._round == 0 and self.check is not None
        extra = [torch.tensor([self.check], dtype=torch.int64)] if checked else []
        frame = self._swap(wire.encode_data(self.request_id, self._round, [*tensors, *extra]))
        if (
            frame.kind != wire.DATA
            or frame.request_id != self.request_id
            or frame.round != self._round
            or frame.tensors is None
        ):
            raise ChannelError(f"round {self._round}: the peer is at another step")
        got = frame.tensors
        if checked:
            mark = got.pop() if len(got) == len(tensors) + 1 else None
            if mark is None or mark.shape != (1,) or int(mark[0]) != self.check:
                raise MaterialMismatch(
                    "the replicas got this run's randomness from different dealer processes "
                    "(the dealer restarted in between); retry the request"
                )
        if len(got) != len(tensors) or any(
            a.shape != b.shape for a, b in zip(got, tensors, strict=True)
        ):
            raise ChannelError(f"round {self._round}: the peer's tensors have other shapes")
        self._round += 1
        return got

    def abort(self, code: str, message: str) -> None:
        """Tell the peer this run failed (best effort)."""
        with contextlib.suppress(ChannelError, OSError):
            self._send(
                wire.encode_json(wire.ABORT, self.request_id, {"code": code, "message": message})
            )

    def close(self, ok: bool = True) -> None:
        """The run is over (`ok`: it completed)."""


class PeerChannel(FramedChannel):
    """One run's frames over the shared peer stream, through its mailbox."""

    def __init__(self, link: PeerLink, request_id: str, inbox: queue.Queue) -> None:
        super().__init__(request_id, link.timeout)
        self._link, self._inbox = link, inbox

    def _send(self, frame: bytes) -> None:
        self._link.send(frame)

    def _receive(self) -> wire.Frame | Exception:
        try:
            return self._inbox.get(timeout=self.timeout)
        except queue.Empty:
            raise self._timed_out() from None

    def close(self, ok: bool = True) -> None:
        self._link.release(self.request_id)
