"""The rig's delaying relay on its own (127.0.0.1, no root): delay, order, cut, commands."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time

import pytest

from service import relay
from service.cluster import free_ports


@pytest.fixture
def echo():
    server = socket.create_server(("127.0.0.1", 0))

    def serve_one(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            while data := conn.recv(65536):
                conn.sendall(data)

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                threading.Thread(target=serve_one, args=(server.accept()[0],), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield server.getsockname()[1]
    server.close()


@pytest.fixture
def link(echo):
    (port,) = free_ports(1)
    route = ["127.0.0.1", port, "127.0.0.1", echo, "127.0.0.1"]
    links = relay.serve({"links": [{"name": "l", "rtt_ms": 40, "jitter_ms": 5, "routes": [route]}]})
    yield links, port
    for one in links.values():
        one.close()


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed early")
        buf += chunk
    return bytes(buf)


def test_round_trip_takes_the_rtt_and_bytes_keep_their_order(link):
    _, port = link
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        started = time.perf_counter()
        s.sendall(b"x")
        assert _recv_exactly(s, 1) == b"x"
        assert time.perf_counter() - started >= 0.040  # half the RTT each way, plus jitter
        data = os.urandom(1 << 20)  # many chunks, each with its own jitter: still in order
        sender = threading.Thread(target=s.sendall, args=(data,))
        sender.start()
        assert _recv_exactly(s, len(data)) == data
        sender.join()


def test_down_cuts_connections_and_refuses_new_ones_until_up(link):
    links, port = link
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"a")
        assert _recv_exactly(s, 1) == b"a"
        assert relay.command(links, "down l") == "ok"
        with contextlib.suppress(ConnectionError):  # EOF or reset: either is a cut
            assert s.recv(1) == b""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as s,
        contextlib.suppress(ConnectionError),
    ):
        assert s.recv(1) == b""
    assert relay.command(links, "refused l") == "ok 1"
    assert relay.command(links, "up l") == "ok"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"b")
        assert _recv_exactly(s, 1) == b"b"


def test_a_stalled_connection_survives_and_delivers_after_up(link):
    links, port = link
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        assert relay.command(links, "stall l") == "ok"
        s.sendall(b"held")
        assert relay.command(links, "up l") == "ok"
        assert _recv_exactly(s, 4) == b"held"  # the connection survived the stall


@pytest.mark.parametrize(
    "line, answer",
    [
        ("", "error: empty command"),
        ("down nowhere", "error: unknown link"),
        ("jump l", "error: unknown command"),
        ("delay l fast", "error: not a number"),
        ("delay l 2", "ok"),
        ("loss l 0.5", "ok"),
    ],
)
def test_commands_answer_ok_or_a_clear_error(link, line, answer):
    assert relay.command(link[0], line).startswith(answer)
