"""Each party has its own identity, checked on every hop (`service.identity`, docs/security.md).

On a TLS deployment (one certificate per role, mutual TLS): the dealer maps the client
certificate to a party and refuses any other claim; party 1 accepts only replica 0's certificate
on the peer stream and the lanes; party 0 accepts only replica 1's. Each attack is the real
thing against real processes: a replica with the other replica's certificate, the dealer's, a
certificate from another CA, or none.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import struct
import time

import httpx
import pytest

from service.api import auth
from service.cluster import Cluster, free_ports
from service.devcerts import make_dev_certs
from service.identity import ROLES, expect_role, role_of
from service.mpc.dealer import new_run_id


def _ctx(c: Cluster, role: str | None, *, ca=None) -> ssl.SSLContext:
    """A client context trusting the cluster's CA (or `ca`), showing `role`'s certificate."""
    ctx = ssl.create_default_context(cafile=str(ca or c.ca))
    if role is not None:
        folder = c.credentials / role
        ctx.load_cert_chain(str(folder / "cert.pem"), str(folder / "key.pem"))
    return ctx


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory):
    lane_port = free_ports(1)[0]
    c = Cluster(
        ports=free_ports(3),
        log_dir=tmp_path_factory.mktemp("identity"),
        tls=True,
        role_args={"replica1": ("--lane-port", str(lane_port))},
    )
    c.lane_port = lane_port  # type: ignore[attr-defined]
    with c:
        yield c


@pytest.fixture(scope="module")
def stranger(tmp_path_factory):
    """Certificates for every role from another CA."""
    return make_dev_certs(tmp_path_factory.mktemp("stranger"), days=1)


def _ask_dealer(c: Cluster, ctx: ssl.SSLContext, party: int, key: bytes) -> httpx.Response:
    body = json.dumps(
        {
            "request_id": new_run_id(),
            "party": party,
            "plan": [{"kind": "and", "shapes": [[4]], "params": []}],
        }
    ).encode()
    headers = {auth.AUTH_HEADER: auth.dealer_tag(key, party, body)}
    with httpx.Client(verify=ctx, timeout=30) as client:
        return client.post(f"{c.dealer_url}/v1/randomness", content=body, headers=headers)


def test_the_dealer_serves_each_party_to_its_own_certificate_only(tls_cluster):
    c = tls_cluster
    key1 = c.key("replica-1", "dealer.key")  # party 1's key, as if it had leaked
    assert _ask_dealer(c, _ctx(c, "replica-1"), 1, key1).status_code == 200
    for role in ("replica-0", "dealer", "web"):  # the right key, someone else's certificate
        r = _ask_dealer(c, _ctx(c, role), 1, key1)
        assert r.status_code == 403 and r.json()["error"]["code"] == "wrong_party", (role, r.text)
        assert role in r.json()["error"]["message"]
    r = _ask_dealer(c, _ctx(c, None), 1, key1)  # no client certificate at all
    assert r.status_code == 401 and "certificate" in r.json()["error"]["message"]
    metrics = httpx.get(f"{c.dealer_url}/metrics", verify=_ctx(c, None)).text
    assert 'privdigit_dealer_refused_total{code="wrong_party"} 3.0' in metrics


def test_the_dealer_refuses_a_certificate_from_another_ca(tls_cluster, stranger):
    c = tls_cluster
    ctx = ssl.create_default_context(cafile=str(c.ca))
    ctx.load_cert_chain(
        str(stranger / "replica-1" / "cert.pem"), str(stranger / "replica-1" / "key.pem")
    )
    with pytest.raises(httpx.HTTPError):  # the TLS handshake fails: never an answer
        _ask_dealer(c, ctx, 1, c.key("replica-1", "dealer.key"))


async def _dial_peer(c: Cluster, ctx: ssl.SSLContext) -> int | None:
    """Dial party 1's peer stream as party 0 would, with the right key; the close code."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    key = c.key("replica-0", "peer.key")
    async with connect(f"wss://127.0.0.1:{c.ports[1]}/v1/peer", ssl=ctx, open_timeout=10) as ws:
        try:
            hello = json.loads(await asyncio.wait_for(ws.recv(), 10))
            nc = auth.nonce()
            tag = auth.mac(key, "peer", "0", hello["nonce"], nc, "[]")
            await ws.send(json.dumps({"party": 0, "nonce": nc, "versions": "[]", "mac": tag}))
            reply = json.loads(await asyncio.wait_for(ws.recv(), 10))
            return None if "mac" in reply else -1
        except ConnectionClosed as exc:
            return exc.rcvd.code if exc.rcvd else None


@pytest.mark.parametrize("role", ["replica-1", "dealer", "web", None])
def test_party_1_accepts_only_replica_0s_certificate_on_the_peer_stream(tls_cluster, role):
    """Even with the peer key, a connection showing another role's certificate (or none) is
    closed with 4403 before any handshake."""
    assert asyncio.run(_dial_peer(tls_cluster, _ctx(tls_cluster, role))) == 4403


def test_the_peer_stream_refuses_a_certificate_from_another_ca(tls_cluster, stranger):
    ctx = _ctx(tls_cluster, None)
    ctx.load_cert_chain(
        str(stranger / "replica-0" / "cert.pem"), str(stranger / "replica-0" / "key.pem")
    )
    from websockets.exceptions import InvalidHandshake

    # refused in TLS, before the app: the connection ends with no HTTP answer at all
    with pytest.raises((ssl.SSLError, OSError, InvalidHandshake)):
        asyncio.run(_dial_peer(tls_cluster, ctx))


def _lane_hello(c: Cluster, ctx: ssl.SSLContext) -> dict | None:
    """Open a TLS lane to party 1; its hello, or None when it hangs up first."""
    port = c.lane_port  # type: ignore[attr-defined]
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s,
    ):
        expect_role(s, "replica-1")  # and party 1 is who it must be
        head = s.recv(4)
        if len(head) < 4:
            return None
        (n,) = struct.unpack(">I", head)
        return json.loads(s.recv(n))


def test_party_1_accepts_only_replica_0s_certificate_on_the_lanes(tls_cluster):
    c = tls_cluster
    hello = _lane_hello(c, _ctx(c, "replica-0"))  # the positive control: replica 0 gets a hello
    assert hello is not None and hello["party"] == 1
    for role in ("replica-1", "dealer", "web"):
        try:
            got = _lane_hello(c, _ctx(c, role))
        except (ssl.SSLError, ConnectionError):
            got = None
        assert got is None, role
    try:  # no client certificate: TLS 1.3 lets the handshake finish, then party 1 hangs up
        got = _lane_hello(c, _ctx(c, None))
    except (ssl.SSLError, ConnectionError):
        got = None
    assert got is None
    metrics = httpx.get(f"{c.replica_urls[1]}/metrics", verify=_ctx(c, None)).text
    assert 'privdigit_auth_failures_total{what="lane"}' in metrics


@pytest.mark.parametrize(
    ("impostor", "shows", "refused_by"),
    [
        ("replica1", "dealer", "replica0"),  # party 0 refuses a party 1 with the dealer's cert
        ("replica0", "replica-1", "replica1"),  # party 1 refuses a party 0 with party 1's cert
    ],
)
def test_a_replica_showing_another_roles_certificate_never_pairs(
    tmp_path, impostor, shows, refused_by
):
    c = Cluster(ports=free_ports(3), log_dir=tmp_path, tls=True).prepare()
    folder = c.credentials / shows
    c.role_args = {
        impostor: ("--tls-cert", str(folder / "cert.pem"), "--tls-key", str(folder / "key.pem"))
    }
    for role in c.roles:
        c.start_process(role)
    ctx = _ctx(c, None)
    url = c.replica_urls[int(refused_by[-1])]
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                metrics = httpx.get(f"{url}/metrics", verify=ctx, timeout=2).text
                refused = 'privdigit_auth_failures_total{what="peer"} 0.0' not in metrics and (
                    'what="peer"' in metrics
                )
                # the dealer may still be starting on a loaded machine: wait for it too
                dealer_up = httpx.get(f"{c.dealer_url}/v1/health", verify=ctx, timeout=2)
                if refused and dealer_up.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, c.tails()
            time.sleep(0.2)
        r = httpx.get(f"{url}/v1/ready", verify=ctx, timeout=5)
        assert r.status_code == 503 and not r.json()["peer_connected"]
        # and the dealer serves the impostor nothing under the role it claims
        dealer_metrics = httpx.get(f"{c.dealer_url}/metrics", verify=ctx, timeout=5).text
        assert f'privdigit_dealer_served_total{{party="{impostor[-1]}"}}' not in dealer_metrics
    finally:
        c.stop()


def test_role_of_reads_only_a_known_role_from_the_subject():
    assert role_of(None) is None and role_of({}) is None
    for role in ROLES:
        assert (
            role_of({"subject": ((("organizationName", "privdigit"),), (("commonName", role),))})
            == role
        )
    assert role_of({"subject": ((("commonName", "replica-2"),),)}) is None
    assert role_of({"subject": ((("organizationName", "replica-0"),),)}) is None
