"""Lanes: direct, authenticated TCP connections between the replicas, one per run slot.

The peer stream (`peer.py`) is served by each replica's event loop, so a protocol round over it
passes four threads: worker -> event loop -> socket -> the peer's event loop -> its worker
(about 0.5 ms a round between two processes, more while the loops parse HTTP requests). A lane
is a blocking socket that the run's worker thread reads and writes itself, so a round is one
send and one receive and no event loop is involved.

Set-up. Party 1 listens on `lane_port` (0: a free port) and tells party 0 the port over the
authenticated peer stream (a LANES frame). Party 0 dials one lane per run slot (its
`max_batches`) to the peer URL's host. Each lane opens with a mutual HMAC challenge-response
over fresh nonces and the lane's index (`auth.mac`, label "lane"), so a stranger cannot open or
replay one; with TLS (the peer URL is wss://) each lane is TLS with the replicas' certificates.
Strangers cannot crowd party 0 out: each opening has `_HANDSHAKE_TIMEOUT` seconds in all (not
per read), at most `_MAX_HANDSHAKES` authenticate at once and at most
`_MAX_HANDSHAKES_PER_SOURCE` from one address; a new connection past either bound closes the
oldest pending opening (of its own address, else of all) instead of being refused. An honest
opening is pending for one round trip, a stranger's until it is pushed out, so party 0 gets in
unless one address opens connections faster than one per party 0's handshake (and then its runs
still go over the peer stream).
A lane lives as long as the peer stream: losing the stream closes every lane, and a new stream
announces the port again.

Use. Party 0 names the slot of each run in BATCH and whether it runs on that slot's lane; both
replicas run a slot's batches in order on the slot's own thread (`Batcher`), so a lane carries
one run at a time. A frame is u32 length (big-endian) | a peer frame (`wire.py`: DATA, ABORT).
Both parties' frames of a round have the same size (the protocol is symmetric). Up to
`DUPLEX_MAX` bytes both send first, then receive: the kernel's socket buffers hold both frames,
so a round costs one one-way trip. Larger rounds are half duplex (party 0 sends then receives,
party 1 receives then sends), so two senders blocked on full buffers can never deadlock; that
costs one more one-way trip. A run that fails sends ABORT on its lane (best effort) and closes
it; party 0 dials it again. While a slot's lane is down, its runs use the peer stream.
What lanes change for privacy: nothing; they carry the same frames as the peer stream.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import socket
import ssl
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from service import identity
from service.api import auth
from service.api.transport import wire
from service.api.transport.peer import MAX_FRAME, FramedChannel, PeerLost

log = logging.getLogger("privdigit.lanes")
HELLO = "privdigit-lane/1"
MAX_LANES = 64  # lane indices are < MAX_LANES (the largest max_batches)
_LEN = struct.Struct(">I")
_HANDSHAKE_TIMEOUT = 5.0  # a whole lane opening, on both sides
_MAX_HANDSHAKES = 16  # connections authenticating at once (each has a thread)
_MAX_HANDSHAKES_PER_SOURCE = 4  # of them from one address
_SWEEP_S = 0.25  # how often party 1's accept loop closes openings past their deadline
DUPLEX_MAX = 32 * 1024  # well below what loopback and LAN sockets buffer without a reader


class Lane:
    """One authenticated connection; one run uses it at a time (its slot's thread)."""

    def __init__(self, sock: socket.socket, index: int, timeout: float) -> None:
        self.sock, self.index = sock, index
        sock.settimeout(timeout)

    def send(self, frame: bytes) -> None:
        _send_frame(self.sock, frame)

    def receive(self) -> bytes:
        return _read_frame(self.sock, MAX_FRAME)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self.sock.close()


def _send_frame(sock: socket.socket, data: bytes) -> None:
    """u32 length (big-endian), then the bytes."""
    head = _LEN.pack(len(data))
    if len(data) <= 65536:  # the usual round: one segment
        sock.sendall(head + data)
    else:  # no copy of a large frame
        sock.sendall(head)
        sock.sendall(data)


def _read_frame(sock: socket.socket, limit: int) -> bytes:
    """The next length-prefixed frame; `WireError` if it claims more than `limit` bytes."""
    (n,) = _LEN.unpack(_read_exactly(sock, _LEN.size))
    if n > limit:
        raise wire.WireError(f"lane frame of {n} bytes is larger than {limit}")
    return bytes(_read_exactly(sock, n))


def _read_exactly(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise ConnectionError("the peer closed the lane")
        got += k
    return buf


def _send_json(sock: socket.socket, obj: dict[str, Any]) -> None:
    _send_frame(sock, json.dumps(obj).encode())


def _recv_json(sock: socket.socket) -> dict[str, Any]:
    obj = json.loads(_read_frame(sock, 4096))  # a handshake message is a few hundred bytes
    if not isinstance(obj, dict):
        raise auth.AuthError("handshake message is not an object")
    return obj


class LaneChannel(FramedChannel):
    """The engine's `Channel` for one run on a lane (rounds over `DUPLEX_MAX` bytes half duplex,
    party 0 first; smaller ones full duplex)."""

    def __init__(self, lanes: Lanes, lane: Lane, request_id: str) -> None:
        super().__init__(request_id, lanes.timeout)
        self._lanes, self._lane = lanes, lane

    def _send(self, frame: bytes) -> None:
        try:
            self._lane.send(frame)
        except TimeoutError:
            raise self._timed_out() from None
        except OSError as exc:
            raise PeerLost(f"lane {self._lane.index} closed: {exc}") from None

    def _receive(self) -> wire.Frame | Exception:
        try:
            return wire.decode_frame(self._lane.receive())
        except TimeoutError:
            return self._timed_out()
        except (OSError, wire.WireError) as exc:
            return PeerLost(f"lane {self._lane.index} closed: {exc}")

    def _swap(self, frame: bytes) -> wire.Frame:
        if self._lanes.party == 0 or len(frame) <= DUPLEX_MAX:
            self._send(frame)
            return self._next()
        got = self._next()
        self._send(frame)
        return got

    def close(self, ok: bool = True) -> None:
        # A run that failed in a round may leave a frame half read or half written: the lane is
        # closed and dialled anew. One that failed before its first round (its dealer material,
        # say) sent at most a whole ABORT frame, so the lane stays in step: the next run skips
        # other runs' ABORTs (`FramedChannel._next`). Closing it then would also break the run
        # the peer may already have started on it.
        if not ok and self.stats.rounds:
            self._lanes.discard(self._lane)


class Lanes:
    """This replica's lanes, by index (one `Lanes` per replica process, passed explicitly)."""

    def __init__(
        self,
        party: int,
        secret: bytes,
        *,
        count: int,
        timeout: float,
        on_auth_failure: Callable[[], None] = lambda: None,
    ) -> None:
        """`secret`: the key the two replicas share (`service.identity`). With TLS, each side
        also checks that the other's certificate names the other replica."""
        self.party, self._secret, self.count, self.timeout = party, secret, count, timeout
        self._peer_role = identity.replica_role(1 - party)
        self._on_auth_failure = on_auth_failure
        self._lanes: dict[int, Lane] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        # party 1
        self._listener: socket.socket | None = None
        self._server_tls: ssl.SSLContext | None = None
        # openings being authenticated, oldest first: key -> (source address, deadline, a
        # duplicate of the socket to shut it down from the accept thread)
        self._pending: OrderedDict[int, tuple[str, float, socket.socket]] = OrderedDict()
        self._pending_lock = threading.Lock()
        # party 0
        self._target: tuple[str, int] | None = None
        self._client_tls: ssl.SSLContext | None = None
        self._expect_server_role = False
        self._wake = threading.Event()

    # -- both ----------------------------------------------------------------------------------

    def up(self, index: int) -> bool:
        with self._lock:
            return index in self._lanes

    def indices(self) -> list[int]:
        with self._lock:
            return sorted(self._lanes)

    def channel(self, index: int, request_id: str) -> LaneChannel:
        with self._lock:
            lane = self._lanes.get(index)
        if lane is None:
            raise PeerLost(f"lane {index} is not connected")
        return LaneChannel(self, lane, request_id)

    def discard(self, lane: Lane) -> None:
        """Close `lane`; forget it if it is still the registered one (party 0 dials anew)."""
        with self._lock:
            if self._lanes.get(lane.index) is lane:
                del self._lanes[lane.index]
        lane.close()
        self._wake.set()

    def close_all(self) -> None:
        with self._lock:
            lanes, self._lanes = list(self._lanes.values()), {}
        for lane in lanes:
            lane.close()

    def _register(self, lane: Lane) -> None:
        with self._lock:
            old = self._lanes.get(lane.index)
            self._lanes[lane.index] = lane
        if old is not None:
            old.close()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.close()
        self.close_all()

    # -- party 1: listen -----------------------------------------------------------------------

    def listen(self, host: str, port: int, tls: ssl.SSLContext | None) -> int:
        """Party 1: accept lanes on (host, port) in a background thread; the bound port."""
        sock = socket.create_server((host, port), reuse_port=False)
        self._listener, self._server_tls = sock, tls
        threading.Thread(target=self._accept_forever, name="lane-accept", daemon=True).start()
        return sock.getsockname()[1]

    def _accept_forever(self) -> None:
        assert self._listener is not None
        self._listener.settimeout(_SWEEP_S)
        for key in itertools.count():
            if self._stop.is_set():
                return
            try:
                conn, addr = self._listener.accept()
            except TimeoutError:
                self._sweep(None)
                continue
            except OSError:
                return
            source = str(addr[0])
            self._sweep(source)
            try:
                handle = conn.dup()
            except OSError:
                conn.close()
                continue
            with self._pending_lock:
                self._pending[key] = (source, time.monotonic() + _HANDSHAKE_TIMEOUT, handle)
            threading.Thread(target=self._accept_one, args=(conn, key), daemon=True).start()

    def _sweep(self, source: str | None) -> None:
        """Close the openings past their deadline and, for a new connection from `source`,
        the oldest one of that address (if it has `_MAX_HANDSHAKES_PER_SOURCE`) or of all (if
        `_MAX_HANDSHAKES` are pending): the new one is not refused, the oldest makes room."""
        now, victims = time.monotonic(), []
        with self._pending_lock:
            for key, (_, deadline, _) in self._pending.items():
                if deadline <= now:
                    victims.append(key)
            if source is not None:
                mine = [k for k, (src, _, _) in self._pending.items() if src == source]
                mine = [k for k in mine if k not in victims]
                if len(mine) >= _MAX_HANDSHAKES_PER_SOURCE:
                    victims.append(mine[0])
                elif len(self._pending) - len(victims) >= _MAX_HANDSHAKES:
                    victims.append(next(k for k in self._pending if k not in victims))
            handles = [self._pending.pop(k)[2] for k in victims]
        for handle in handles:  # the opening's thread wakes up with an error and gives up
            with contextlib.suppress(OSError):
                handle.shutdown(socket.SHUT_RDWR)
            handle.close()

    def _accept_one(self, conn: socket.socket, key: int) -> None:
        try:
            conn.settimeout(_HANDSHAKE_TIMEOUT)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._server_tls is not None:
                conn = self._server_tls.wrap_socket(conn, server_side=True)
                if self._server_tls.verify_mode == ssl.CERT_REQUIRED:
                    identity.expect_role(conn, self._peer_role)
            ns = auth.nonce()
            _send_json(conn, {"hello": HELLO, "party": 1, "nonce": ns})
            msg = _recv_json(conn)
            index, nc = msg.get("lane"), msg.get("nonce")
            if not isinstance(index, int) or not 0 <= index < MAX_LANES or not isinstance(nc, str):
                raise auth.AuthError("malformed lane request")
            auth.verify(self._secret, msg.get("mac"), "lane", "0", ns, nc, str(index))
            with self._pending_lock:  # authenticated: no longer an opening to push out
                pending = self._pending.pop(key, None)
            if pending is None:
                raise TimeoutError("the opening was closed to make room or past its deadline")
            pending[2].close()
            lane = Lane(conn, index, self.timeout)
            self._register(lane)  # before the reply: party 0 uses the lane once it has it
            _send_json(conn, {"mac": auth.mac(self._secret, "lane", "1", ns, nc, str(index))})
            log.info("lane connected", extra={"fields": {"lane": index}})
        except Exception as exc:  # wrong MAC, garbage, silence, TLS failure: refused
            if isinstance(
                exc,
                (
                    auth.AuthError,
                    identity.IdentityError,
                    ssl.SSLCertVerificationError,
                    ValueError,
                    KeyError,
                ),
            ):
                self._on_auth_failure()
            log.warning("lane refused: %s", type(exc).__name__)
            with contextlib.suppress(OSError):
                conn.close()
        finally:
            with self._pending_lock:
                pending = self._pending.pop(key, None)
            if pending is not None:
                pending[2].close()

    # -- party 0: dial -------------------------------------------------------------------------

    def connect_to(
        self, host: str, port: int, tls: ssl.SSLContext | None, *, check_role: bool = False
    ) -> None:
        """Party 0: (re)dial every lane to party 1's lane port (announced in LANES); with
        `check_role`, refuse a lane whose certificate does not name replica 1."""
        self.close_all()
        self._target, self._client_tls = (host, port), tls
        self._expect_server_role = check_role
        self._wake.set()

    def forget_target(self) -> None:
        """Party 0: the peer stream is gone; stop dialling until the next announcement."""
        self._target = None
        self.close_all()

    def dial_forever(self) -> None:
        """Party 0 (a background thread): keep `count` lanes open while a target is known."""
        delay = 0.05
        while not self._stop.is_set():
            self._wake.wait(timeout=delay)
            self._wake.clear()
            target = self._target
            if target is None:
                continue
            missing = [k for k in range(self.count) if not self.up(k)]
            failed = False
            for k in missing:
                if self._stop.is_set() or self._target != target:
                    break
                try:
                    self._dial(k, target)
                except Exception as exc:  # the peer is restarting, or refuses: retry later
                    failed = True
                    log.warning(
                        "cannot open lane %d to %s:%d: %s: %s", k, *target, type(exc).__name__, exc
                    )
            delay = min(delay * 2, 2.0) if failed else 0.05
            if not failed and not missing:
                delay = 1.0  # all up: look again after a while (a discard wakes this at once)

    def _dial(self, index: int, target: tuple[str, int]) -> None:
        host, port = target
        sock = socket.create_connection((host, port), timeout=_HANDSHAKE_TIMEOUT)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._client_tls is not None:
                sock = self._client_tls.wrap_socket(sock, server_hostname=host)
                if self._expect_server_role:
                    identity.expect_role(sock, self._peer_role)
            hello = _recv_json(sock)
            if hello.get("hello") != HELLO or hello.get("party") != 1:
                raise auth.AuthError("the other end is not a party-1 privdigit lane")
            ns, nc = str(hello["nonce"]), auth.nonce()
            tag = auth.mac(self._secret, "lane", "0", ns, nc, str(index))
            _send_json(sock, {"lane": index, "nonce": nc, "mac": tag})
            reply = _recv_json(sock)
            auth.verify(self._secret, reply.get("mac"), "lane", "1", ns, nc, str(index))
        except BaseException:
            sock.close()
            raise
        if self._target != target:  # the peer went away meanwhile
            sock.close()
            return
        self._register(Lane(sock, index, self.timeout))
