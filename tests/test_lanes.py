"""Lanes: direct replica-to-replica sockets for protocol rounds (service/api/transport/lanes.py).

Two `Lanes` objects in this process over real loopback TCP (and TLS): they authenticate each
other, carry the engine's rounds with the same results, rounds and bytes as the in-memory
channel, do not deadlock on frames larger than the socket buffers, refuse strangers, and a
failed run never leaves its lane in use.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from service.api.transport.lanes import Lanes
from service.api.transport.peer import MaterialMismatch, PeerAborted, PeerLost, PeerTimeout
from service.devcerts import make_dev_certs
from service.mpc.channel import ChannelError, InMemoryChannel
from service.mpc.prg import random_ring

SECRET = b"s" * 32


def _wait(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.fixture
def pair():
    """Party 1 listening, party 0 dialling two lanes; both stopped afterwards."""
    made = []

    def make(*, secret0=SECRET, count=2, timeout=5.0, tls=None, check_role=False):
        failures = []
        p1 = Lanes(
            1, SECRET, count=count, timeout=timeout, on_auth_failure=lambda: failures.append(1)
        )
        p0 = Lanes(0, secret0, count=count, timeout=timeout)
        server_tls, client_tls = tls or (None, None)
        port = p1.listen("127.0.0.1", 0, server_tls)
        threading.Thread(target=p0.dial_forever, daemon=True).start()
        p0.connect_to("127.0.0.1", port, client_tls, check_role=check_role)
        made.extend([p0, p1])
        return p0, p1, port, failures

    yield make
    for lanes in made:
        lanes.stop()


def _up(p0, p1, count=2):
    _wait(lambda: all(p0.up(k) and p1.up(k) for k in range(count)))


def _rest(s: socket.socket) -> bytes:
    """What the other end still sends before it hangs up (a reset counts as hanging up)."""
    s.settimeout(10)
    data = b""
    with contextlib.suppress(ConnectionError):
        while chunk := s.recv(4096):
            data += chunk
    return data


def _run_both(fn0, fn1):
    with ThreadPoolExecutor(2) as ex:
        f0, f1 = ex.submit(fn0), ex.submit(fn1)
        return f0.result(timeout=30), f1.result(timeout=30)


def _rounds(ch, tensors):
    out = [ch.exchange(ts) for ts in tensors]
    ch.close(True)
    return out


def test_lanes_carry_rounds_like_the_in_memory_channel(pair):
    p0, p1, _, failures = pair()
    _up(p0, p1)
    # sizes from one element to 4 MB per frame: larger than the socket buffers, so two blocked
    # senders would deadlock if both sent first
    shapes = [(1,), (7, 3), (2660,), (64, 8, 12, 12), (512 * 1024,)]
    mine = [[random_ring(s), random_ring((3,))] for s in shapes]
    theirs = [[random_ring(s), random_ring((3,))] for s in shapes]
    ch0, ch1 = p0.channel(1, "batch-a"), p1.channel(1, "batch-a")
    got0, got1 = _run_both(lambda: _rounds(ch0, mine), lambda: _rounds(ch1, theirs))
    for a, b in zip(got0, theirs, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    for a, b in zip(got1, mine, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    m0, m1 = InMemoryChannel.pair()
    _run_both(lambda: [m0.exchange(t) for t in mine], lambda: [m1.exchange(t) for t in theirs])
    assert (ch0.stats.rounds, ch0.stats.bytes_sent) == (m0.stats.rounds, m0.stats.bytes_sent)
    assert (ch1.stats.rounds, ch1.stats.bytes_sent) == (m1.stats.rounds, m1.stats.bytes_sent)
    # a completed run leaves its lane up for the next one
    assert p0.up(1) and p1.up(1) and not failures


def test_a_wrong_secret_never_opens_a_lane(pair):
    p0, p1, _, failures = pair(secret0=b"x" * 32)
    _wait(lambda: len(failures) >= 2)
    assert p0.indices() == [] and p1.indices() == []


@pytest.mark.parametrize(
    "send",
    [b"", b"GET / HTTP/1.1\r\n\r\n", b"\x00\x00\x00\x05{}{}{", b"\x7f\xff\xff\xff"],
)
def test_strangers_on_the_lane_port_are_refused(pair, send):
    p0, p1, port, failures = pair(count=1)
    _up(p0, p1, 1)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.recv(4096)  # the hello with party 1's nonce
        s.sendall(send)
        # the replica may already have hung up on a bad length prefix (then the socket is reset)
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_WR)
        assert _rest(s) == b""  # closed on us, nothing else said
    if send:  # something that is not a lane opening counts as an authentication failure
        _wait(lambda: failures)
    assert p1.indices() == [0]  # the real lane is untouched


def test_strangers_holding_openings_do_not_keep_party_0_out():
    """A stranger (another address) keeps 40 silent connections open on the lane port, opening
    a new one as soon as one is closed. Party 0 still gets all its lanes up, and party 1 never
    has more than its 16 openings pending (before the fix the stranger held all 16 slots, and
    party 0's openings were closed unread for as long as it kept that up)."""
    p1 = Lanes(1, SECRET, count=4, timeout=5.0)
    p0 = Lanes(0, SECRET, count=4, timeout=5.0)
    port = p1.listen("127.0.0.1", 0, None)
    stop, opened, most = threading.Event(), [0], [0]

    def stranger() -> None:
        sel = selectors.DefaultSelector()
        while not stop.is_set():
            while len(sel.get_map()) < 40:
                s = socket.socket()
                s.bind(("127.0.0.2", 0))
                with contextlib.suppress(OSError):
                    s.connect(("127.0.0.1", port))
                    s.setblocking(False)
                    sel.register(s, selectors.EVENT_READ)
                    opened[0] += 1
                    continue
                s.close()
            for key, _ in sel.select(timeout=0.02):  # the hello, or closed on us
                try:
                    data = key.fileobj.recv(4096)
                except OSError:
                    data = b""
                if not data:
                    sel.unregister(key.fileobj)
                    key.fileobj.close()
            most[0] = max(most[0], len(getattr(p1, "_pending", ())))
        for key in list(sel.get_map().values()):
            key.fileobj.close()

    attacker = threading.Thread(target=stranger, daemon=True)
    attacker.start()
    try:
        _wait(lambda: opened[0] >= 40)
        threading.Thread(target=p0.dial_forever, daemon=True).start()
        p0.connect_to("127.0.0.1", port, None)
        _wait(lambda: all(p0.up(k) and p1.up(k) for k in range(4)), timeout=30)
        assert most[0] <= 16
        with ThreadPoolExecutor(2) as ex:  # and the lanes carry a round
            x = random_ring((3,))
            f0 = ex.submit(lambda: p0.channel(2, "b").exchange([x]))
            f1 = ex.submit(lambda: p1.channel(2, "b").exchange([x + 1]))
            assert torch.equal(f0.result(timeout=30)[0], x + 1)
            assert torch.equal(f1.result(timeout=30)[0], x)
    finally:
        stop.set()
        attacker.join(timeout=10)
        p0.stop()
        p1.stop()


def test_a_replayed_handshake_is_refused(pair):
    """The MAC covers party 1's fresh nonce: a recorded lane opening cannot be played again."""
    p0, p1, port, failures = pair(count=1)
    _up(p0, p1, 1)
    from service.api import auth
    from service.api.transport.lanes import _recv_json, _send_json

    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        first = _recv_json(s)
        tag = auth.mac(SECRET, "lane", "0", first["nonce"], "n" * 64, "0")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        hello = _recv_json(s)
        assert hello["nonce"] != first["nonce"]
        _send_json(s, {"lane": 0, "nonce": "n" * 64, "mac": tag})  # valid for the old nonce
        assert _rest(s) == b""
    _wait(lambda: failures)


def test_a_failed_run_closes_its_lane_and_party_0_dials_it_again(pair):
    p0, p1, _, _ = pair()
    _up(p0, p1)
    old = p0.channel(0, "b")._lane
    ch0, ch1 = p0.channel(0, "b"), p1.channel(0, "b")

    def party0():
        with pytest.raises(PeerAborted) as info:
            ch0.exchange([random_ring((5,))])
        ch0.close(False)
        return info.value.code

    def party1():
        ch1.abort("dealer_unavailable", "no dealer")
        ch1.close(False)

    code, _ = _run_both(party0, party1)
    assert code == "dealer_unavailable"
    _up(p0, p1)  # dialled again
    assert p0.channel(0, "c")._lane is not old


def test_a_run_that_fails_before_its_first_round_leaves_the_lane_to_the_next_run(pair):
    """Party 0 gave up on run "x" and started "y" while party 1 was still failing "x" (no dealer):
    party 1's late ABORT of "x" must neither fail "y" nor close the lane "y" runs on."""
    p0, p1, _, _ = pair(count=1)
    _up(p0, p1, 1)
    lane = p0.channel(0, "x")._lane
    late = p1.channel(0, "x")
    late.abort("dealer_unavailable", "cannot reach the dealer")
    late.close(False)  # before any round: the lane stays
    x, y = random_ring((6,)), random_ring((6,))
    got0, got1 = _run_both(
        lambda: _rounds(p0.channel(0, "y"), [[x]]), lambda: _rounds(p1.channel(0, "y"), [[y]])
    )
    assert torch.equal(got0[0][0], y) and torch.equal(got1[0][0], x)
    assert p0.channel(0, "z")._lane is lane and p1.up(0)


def test_a_desynchronised_peer_is_an_error_not_a_wrong_answer(pair):
    p0, p1, _, _ = pair(count=1)
    _up(p0, p1, 1)
    ch0, ch1 = p0.channel(0, "mine"), p1.channel(0, "another-batch")

    def one(ch):
        with pytest.raises(ChannelError, match="another step"):
            ch.exchange([random_ring((4,))])

    _run_both(lambda: one(ch0), lambda: one(ch1))


def test_a_silent_peer_times_out(pair):
    p0, p1, _, _ = pair(count=1, timeout=0.3)
    _up(p0, p1, 1)
    with pytest.raises(PeerTimeout):
        p1.channel(0, "b").exchange([random_ring((2,))])  # party 1 waits for party 0 first


def test_losing_the_peer_drops_every_lane(pair):
    p0, p1, _, _ = pair()
    _up(p0, p1)
    p0.forget_target()
    assert p0.indices() == []
    with pytest.raises(PeerLost):
        p0.channel(0, "b")


def test_lanes_over_tls_and_a_plain_dialler_is_refused(pair, tmp_path):
    certs = make_dev_certs(tmp_path)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(
        str(certs / "replica-1" / "cert.pem"), str(certs / "replica-1" / "key.pem")
    )
    client = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    p0, p1, port, _ = pair(count=1, tls=(server, client))
    _up(p0, p1, 1)
    x = [random_ring((1000,))]
    ch0, ch1 = p0.channel(0, "t"), p1.channel(0, "t")
    got0, got1 = _run_both(lambda: ch0.exchange(x), lambda: ch1.exchange(x))
    assert torch.equal(got0[0], x[0]) and torch.equal(got1[0], x[0])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"\x00\x00\x00\x02{}")  # no TLS: the server's handshake fails, it hangs up
        assert b"privdigit" not in _rest(s)  # never a hello in the clear
    assert p1.indices() == [0]


@pytest.mark.parametrize("theirs", [7, None])
def test_material_from_two_dealers_is_refused_in_round_0(pair, theirs):
    """Each run's first frame carries its dealer instance; a peer holding other material (or
    none) fails the run instead of computing a wrong label. The mark is not counted."""
    p0, p1, _, _ = pair(count=1)
    _up(p0, p1, 1)
    ch0, ch1 = p0.channel(0, "m"), p1.channel(0, "m")
    ch0.check, ch1.check = 5, theirs
    x = [random_ring((3,))]

    def one(ch):
        with pytest.raises((MaterialMismatch, ChannelError)):
            ch.exchange(x)

    _run_both(lambda: one(ch0), lambda: one(ch1))
    assert ch0.stats.bytes_sent == 24


def test_the_same_dealer_instance_passes_and_is_not_counted(pair):
    p0, p1, _, _ = pair(count=1)
    _up(p0, p1, 1)
    ch0, ch1 = p0.channel(0, "m"), p1.channel(0, "m")
    ch0.check = ch1.check = -123
    x = [random_ring((3,))]
    got0, got1 = _run_both(
        lambda: [ch0.exchange(x), ch0.exchange(x)], lambda: [ch1.exchange(x), ch1.exchange(x)]
    )
    assert all(torch.equal(g[0], x[0]) for g in (*got0, *got1))
    assert ch0.stats.bytes_sent == ch1.stats.bytes_sent == 48 and ch0.stats.rounds == 2


def _role_contexts(certs, server_role: str, client_role: str | None):
    from service.identity import client_context, server_context

    def files(role):
        return certs / role / "cert.pem", certs / role / "key.pem"

    server = server_context(*files(server_role), certs / "ca.pem")
    client = client_context(
        certs / "ca.pem", *(files(client_role) if client_role else (None, None))
    )
    return server, client


def test_mutual_tls_lanes_between_the_two_replicas_connect(pair, tmp_path):
    certs = make_dev_certs(tmp_path)
    p0, p1, _, failures = pair(
        count=1, tls=_role_contexts(certs, "replica-1", "replica-0"), check_role=True
    )
    _up(p0, p1, 1)
    assert failures == []


@pytest.mark.parametrize("client_role", ["replica-1", "dealer", "web", None])
def test_party_1_refuses_a_lane_from_any_certificate_but_replica_0s(
    pair, tmp_path, client_role, caplog
):
    certs = make_dev_certs(tmp_path)
    p0, p1, _, failures = pair(count=1, tls=_role_contexts(certs, "replica-1", client_role))
    _wait(lambda: "lane refused" in caplog.text)  # again and again as party 0 redials
    if client_role is not None:  # a valid certificate of the wrong role: counted as well
        _wait(lambda: failures)
    assert p1.indices() == [] and p0.indices() == []


@pytest.mark.parametrize("server_role", ["replica-0", "dealer", "web"])
def test_party_0_refuses_a_lane_server_that_is_not_replica_1(pair, tmp_path, server_role, caplog):
    """Party 0 checks the certificate of the lane port it was told about: an impostor that
    took party 1's address (or port) gets no lane, whatever key it holds."""
    certs = make_dev_certs(tmp_path)
    p0, _, _, _ = pair(
        count=1, tls=_role_contexts(certs, server_role, "replica-0"), check_role=True
    )
    _wait(lambda: "IdentityError" in caplog.text)
    assert p0.indices() == []
