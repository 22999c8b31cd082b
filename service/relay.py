"""A delaying TCP relay: the network between the rig's hosts (`service.netrig`), in user space.

    python -m service.relay CONFIG.json      (the rig starts it inside its hub namespace)

Each link of the config joins two parties and lists the routes that cross it: a listening
address and port on one side, the address and port it forwards to on the other, and the
address the relay dials from. Every chunk read from one end is written to the other end after
the link's one-way delay (half its round-trip time), plus a uniform jitter, in order; the
reader never waits for the writer, so a link carries as many bytes in flight as TCP lets it.
`loss` is the probability that a chunk is held for one extra retransmission timeout (Linux's
minimum, 200 ms, plus one round trip): what a lost segment costs a TCP stream, since TCP
itself never loses bytes. The randomness of jitter and loss is not secret (`random`).

Commands on stdin, one a line, each answered `ok` (or `error: ...`) on stdout:
`down LINK` closes every connection of the link and closes new ones at once (a cut cable:
both ends see the connection drop); `stall LINK` holds every byte until `up` (a partition
that TCP rides out: the connection stays open); `up LINK` ends either; `delay LINK MS` sets
the round-trip time, `loss LINK P` the chance of a lost chunk; `refused LINK` answers `ok N`,
the number of connections the link refused while down (so a test sees a party redial).
What a party learns from the relay: nothing; it carries TLS bytes.
Not a security boundary: for tests and benchmarks on one machine only.
"""

from __future__ import annotations

import contextlib
import json
import random
import socket
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

CHUNK = 256 * 1024
RTO_S = 0.2  # Linux's minimum retransmission timeout


@dataclass
class Link:
    """One link's conditions and its open connections."""

    name: str
    rtt_s: float = 0.0
    jitter_s: float = 0.0
    loss: float = 0.0
    down: bool = False
    stalled: bool = False
    refused: int = 0  # connections closed at once because the link was down
    conns: set[_Conn] = field(default_factory=set)
    servers: list[socket.socket] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._rng = random.Random()  # jitter and loss only: nothing secret

    def due(self, now: float) -> float:
        """When a chunk read at `now` leaves the relay."""
        extra = self._rng.uniform(0.0, self.jitter_s) if self.jitter_s else 0.0
        if self.loss and self._rng.random() < self.loss:
            extra += RTO_S + self.rtt_s
        return now + self.rtt_s / 2 + extra

    def set(self, *, down: bool | None = None, stalled: bool | None = None) -> None:
        with self.lock:
            if down is not None:
                self.down = down
            if stalled is not None:
                self.stalled = stalled
            for conn in self.conns:
                for pipe in conn.pipes:
                    pipe.cond.notify_all()
            conns = list(self.conns) if self.down else []
        for conn in conns:
            conn.close()

    def close(self) -> None:
        """Stop listening and close every connection (the relay's end)."""
        for server in self.servers:
            with contextlib.suppress(OSError):
                server.close()
        self.set(down=True)


class _Conn:
    """One relayed connection: two sockets and a pipe each way."""

    def __init__(self, link: Link, a: socket.socket, b: socket.socket) -> None:
        self.link, self.socks = link, (a, b)
        self.pipes = (_Pipe(self, a, b), _Pipe(self, b, a))
        self._open = 2  # directions still running

    def start(self) -> None:
        with self.link.lock:
            self.link.conns.add(self)
        for pipe in self.pipes:
            pipe.start()

    def finished_one(self) -> None:
        with self.link.lock:
            self._open -= 1
            last = self._open == 0
        if last:
            self.close()

    def close(self) -> None:
        with self.link.lock:
            self.link.conns.discard(self)
        for s in self.socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()


class _Pipe:
    """One direction: a reader thread stamps chunks with their due time, a writer sends them."""

    def __init__(self, conn: _Conn, src: socket.socket, dst: socket.socket) -> None:
        self.conn, self.src, self.dst = conn, src, dst
        self.link = conn.link
        self.cond = threading.Condition(self.link.lock)  # the link's lock: `Link.set` wakes it
        self.queue: deque[tuple[float, bytes | None]] = deque()
        self.last_due = 0.0

    def start(self) -> None:
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._write, daemon=True).start()

    def _push(self, data: bytes | None) -> None:
        with self.cond:
            self.last_due = max(self.last_due, self.link.due(time.monotonic()))
            self.queue.append((self.last_due, data))
            self.cond.notify_all()

    def _read(self) -> None:
        try:
            while data := self.src.recv(CHUNK):
                self._push(data)
        except OSError:
            pass
        self._push(None)  # end of stream (or error): the writer shuts its side down

    def _write(self) -> None:
        try:
            while True:
                with self.cond:
                    while True:
                        if self.queue and not self.link.stalled:
                            wait = self.queue[0][0] - time.monotonic()
                            if wait <= 0:
                                break
                            self.cond.wait(wait)
                        else:
                            self.cond.wait()
                    _, data = self.queue.popleft()
                if data is None:
                    with contextlib.suppress(OSError):
                        self.dst.shutdown(socket.SHUT_WR)
                    return
                self.dst.sendall(data)
        except OSError:
            self.conn.close()
        finally:
            self.conn.finished_one()


def _listen(link: Link, listen: tuple[str, int], target: tuple[str, int], source: str) -> None:
    server = socket.create_server(listen)
    link.servers.append(server)
    threading.Thread(target=_accept, args=(server, link, target, source), daemon=True).start()


def _accept(server: socket.socket, link: Link, target: tuple[str, int], source: str) -> None:
    while True:
        try:
            a, _ = server.accept()
        except OSError:  # closed: the link is gone
            return
        if link.down:
            link.refused += 1
            a.close()
            continue
        try:
            b = socket.create_connection(target, timeout=5, source_address=(source, 0))
        except OSError:
            a.close()
            continue
        b.settimeout(None)
        for s in (a, b):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _Conn(link, a, b).start()


def serve(config: dict) -> dict[str, Link]:
    """Listen on every route of `config` (`{"links": [{name, rtt_ms, jitter_ms, loss,
    routes: [[listen_host, port, target_host, port, source_host], ...]}]}`)."""
    links = {}
    for spec in config["links"]:
        link = Link(
            spec["name"],
            rtt_s=spec.get("rtt_ms", 0.0) / 1000,
            jitter_s=spec.get("jitter_ms", 0.0) / 1000,
            loss=spec.get("loss", 0.0),
        )
        links[link.name] = link
        for lh, lp, th, tp, src in spec["routes"]:
            _listen(link, (lh, lp), (th, tp), src)
    return links


def command(links: dict[str, Link], line: str) -> str:
    """Apply one control line (see the module docstring); the answer to print."""
    words = line.split()
    if not words:
        return "error: empty command"
    if len(words) < 2 or words[1] not in links:
        return f"error: unknown link in {line!r}; links: {', '.join(sorted(links))}"
    verb, link = words[0], links[words[1]]
    if verb == "down":
        link.set(down=True)
    elif verb == "stall":
        link.set(stalled=True)
    elif verb == "up":
        link.set(down=False, stalled=False)
    elif verb == "refused":
        return f"ok {link.refused}"
    elif verb in ("delay", "loss") and len(words) == 3:
        try:
            value = float(words[2])
        except ValueError:
            return f"error: not a number in {line!r}"
        with link.lock:
            if verb == "delay":
                link.rtt_s = value / 1000
            else:
                link.loss = value
    else:
        return (
            f"error: unknown command {line!r} "
            "(down, stall, up, refused LINK; delay LINK MS; loss LINK P)"
        )
    return "ok"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m service.relay CONFIG.json", file=sys.stderr)
        return 2
    links = serve(json.loads(Path(args[0]).read_text()))
    print("ready", flush=True)
    for line in sys.stdin:
        print(command(links, line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
