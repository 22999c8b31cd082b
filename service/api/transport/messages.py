"""The control messages the replicas exchange on the peer stream, typed: one class per kind.

Each message is a JSON object in a control frame (`wire.encode_json`: kind, request id, JSON
body); the kinds and their byte layout are `wire.py`'s. A message class names its kind
(`KIND`), writes its body (`to_payload`) and reads one back (`from_payload`), raising
`BadMessage` naming the first field that is wrong, so the code that acts on a message never
re-parses a dict. `encode` and `decode` go between messages and frames.

    ARRIVED   party 1 -> 0  a client's share reached party 1: its shape, output, wanted version
    WITHDRAW  party 1 -> 0  party 1 gave up a request (its twin never came)
    REJECT    both          this request fails on both sides, with this error code and message
    BATCH     party 0 -> 1  the run party 0 decided on (`Batch`, see `batching/scheduler.py`)
    PREFETCH  party 0 -> 1  fetch dealer material under this id ahead of time, for this batch
    DISCARD   party 0 -> 1  party 0 dropped these prefetched entries unused; drop them too
    LANES     party 1 -> 0  party 1's lanes listen on this port
What they carry is public: request ids, shapes, output kinds, versions, slots, material ids.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from service.api.transport import wire
from service.api.transport.lanes import MAX_LANES
from service.api.transport.peer import PeerLost


class BadMessage(ValueError):
    """A control payload that does not have its message's fields and types."""


def _typed(p: dict[str, Any], kind: str, name: str, want: type) -> Any:
    value = p.get(name)
    if type(value) is not want:  # exact: a bool is not an int here
        raise BadMessage(f"{kind} field {name!r} is not a {want.__name__}")
    return value


def _object(p: Any, kind: str) -> dict[str, Any]:
    if p is None:
        return {}
    if not isinstance(p, dict):
        raise BadMessage(f"{kind} payload is not a JSON object")
    return p


@dataclass(frozen=True)
class Arrived:
    """Party 1 got a client's share: what the client asked (compared with party 0's copy)."""

    KIND: ClassVar[int] = wire.ARRIVED
    shape: list[Any]
    output: Any
    want: Any  # the model version the client named, or None

    def to_payload(self) -> dict[str, Any]:
        return {"shape": self.shape, "output": self.output, "want": self.want}

    @classmethod
    def from_payload(cls, p: Any) -> Arrived:
        """Any values (party 0 compares them with its own copy); exactly these three fields."""
        p = _object(p, "ARRIVED")
        if set(p) != {"shape", "output", "want"}:
            raise BadMessage(f"ARRIVED fields are {sorted(p)}, not shape, output and want")
        return cls(p["shape"], p["output"], p["want"])


@dataclass(frozen=True)
class Withdraw:
    """Party 1 gave up a request whose twin never reached it."""

    KIND: ClassVar[int] = wire.WITHDRAW

    def to_payload(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_payload(cls, p: Any) -> Withdraw:
        _object(p, "WITHDRAW")
        return cls()


@dataclass(frozen=True)
class Reject:
    """This request fails on both replicas with this error code and message."""

    KIND: ClassVar[int] = wire.REJECT
    code: str
    message: str

    def to_payload(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message}

    @classmethod
    def from_payload(cls, p: Any) -> Reject:
        p = _object(p, "REJECT")
        return cls(str(p.get("code")), str(p.get("message")))


@dataclass(frozen=True)
class Abort(Reject):
    """A run ends on both sides (sent on the stream when party 1 has no channel for it)."""

    KIND: ClassVar[int] = wire.ABORT


@dataclass(frozen=True)
class Batch:
    """The BATCH message: the run party 0 decided on, with its requests' ids and row counts."""

    KIND: ClassVar[int] = wire.BATCH
    version: str
    output: str
    requests: tuple[tuple[str, int], ...]  # (request id, images), in the batch's row order
    open_weights: bool
    material: str  # the dealer request id: a prefetched entry's, or the batch id
    slot: int = 0
    lane: bool = False

    def to_payload(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "output": self.output,
            "requests": [list(r) for r in self.requests],
            "open_weights": self.open_weights,
            "material": self.material,
            "slot": self.slot,
            "lane": self.lane,
        }

    @classmethod
    def from_payload(cls, p: Any) -> Batch:
        """Parse a BATCH payload; `BadMessage` names the first field that is wrong."""
        p = _object(p, "BATCH")
        requests = p.get("requests")
        if not isinstance(requests, list) or not all(
            isinstance(r, list) and len(r) == 2 and type(r[0]) is str and type(r[1]) is int
            for r in requests
        ):
            raise BadMessage("BATCH field 'requests' is not a list of [id, images] pairs")
        slot = _typed(p, "BATCH", "slot", int)
        if not 0 <= slot < MAX_LANES:
            raise BadMessage(f"BATCH slot {slot} is not in [0, {MAX_LANES})")
        return cls(
            _typed(p, "BATCH", "version", str),
            _typed(p, "BATCH", "output", str),
            tuple((r[0], r[1]) for r in requests),
            _typed(p, "BATCH", "open_weights", bool),
            _typed(p, "BATCH", "material", str),
            slot,
            _typed(p, "BATCH", "lane", bool),
        )


@dataclass(frozen=True)
class Prefetch:
    """Fetch dealer material for this model version and batch size (None: one image) now."""

    KIND: ClassVar[int] = wire.PREFETCH
    version: str
    batch: int | None = None

    def to_payload(self) -> dict[str, Any]:
        out: dict[str, Any] = {"version": self.version}
        if self.batch is not None:
            out["batch"] = self.batch
        return out

    @classmethod
    def from_payload(cls, p: Any) -> Prefetch:
        p = _object(p, "PREFETCH")
        batch = p.get("batch")
        if "batch" in p and type(batch) is not int:
            raise BadMessage("PREFETCH field 'batch' is not an int")
        return cls(str(p.get("version")), batch)


@dataclass(frozen=True)
class Discard:
    """Party 0 dropped these prefetched entries unused (ids that are not strings are skipped)."""

    KIND: ClassVar[int] = wire.DISCARD
    ids: tuple[str, ...]

    def to_payload(self) -> dict[str, Any]:
        return {"ids": list(self.ids)}

    @classmethod
    def from_payload(cls, p: Any) -> Discard:
        ids = _object(p, "DISCARD").get("ids")
        if not isinstance(ids, list):
            raise BadMessage("DISCARD field 'ids' is not a list")
        return cls(tuple(i for i in ids if isinstance(i, str)))


@dataclass(frozen=True)
class LanesAt:
    """Party 1's lanes listen on this port (party 0 dials it, on the peer stream's host)."""

    KIND: ClassVar[int] = wire.LANES
    port: int

    def to_payload(self) -> dict[str, Any]:
        return {"port": self.port}

    @classmethod
    def from_payload(cls, p: Any) -> LanesAt:
        port = _object(p, "LANES").get("port")
        if not isinstance(port, int) or not 0 < port < 65536:
            raise BadMessage(f"LANES port {port!r} is not a port number")
        return cls(port)


Message = Arrived | Withdraw | Reject | Abort | Batch | Prefetch | Discard | LanesAt
_BY_KIND: dict[int, type] = {
    m.KIND: m for m in (Arrived, Withdraw, Reject, Abort, Batch, Prefetch, Discard, LanesAt)
}


def encode(request_id: str, message: Message) -> bytes:
    """The control frame carrying `message` for `request_id` ("" when it names none)."""
    return wire.encode_json(message.KIND, request_id, message.to_payload())


def decode(frame: wire.Frame) -> Message:
    """The message a control frame carries; `BadMessage` when its payload is not one."""
    cls = _BY_KIND.get(frame.kind)
    if cls is None:
        raise BadMessage(f"frame kind {frame.kind} is not a control message")
    return cls.from_payload(frame.payload)


class Stream(Protocol):
    def send(self, frame: bytes) -> None: ...


def send(peer: Stream, request_id: str, message: Message) -> None:
    """Send a message on the peer stream; when the stream is down it is dropped (the peer
    learns of the loss from the disconnect)."""
    with contextlib.suppress(PeerLost):
        peer.send(encode(request_id, message))
