"""Attacks on the claims of `docs/security.md` that had no test that would fail without them.

Each test plays the attacker the claim names and checks that the attack is refused, or finds
nothing. Deployment claims run against real processes (`service.cluster.Cluster`), protocol
claims in process. Two clusters for the whole module, each with recording TCP relays spliced
into its hops, as a network attacker on the path would be:
- `plain` (HTTP, the local default): replica 0 dials replica 1's peer stream through a relay,
  both replicas reach the dealer through a relay, and each replica's model folder holds only
  the manifest and its own share. The relays see plaintext here, which is what lets the tests
  check what the dealer receives, and replay a recorded handshake.
- `tls` (`Cluster(tls=True)`): the client's posts, the peer stream and the dealer hop go through
  relays; an eavesdropper records every byte.
Added time: about 55 s on a busy 2-core machine, 40 s of it the two cluster starts.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
import secrets
import shutil
import socket
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from clients import privdigit
from service.api import auth
from service.api.transport import wire
from service.cluster import DEFAULT_MODEL, Cluster, free_ports
from service.mpc.dealer import Dealer, new_run_id
from service.store import load_share

REPO = Path(__file__).resolve().parent.parent


class Relay:
    """A TCP forwarder to `target` on 127.0.0.1 that records each connection's bytes, both ways
    (what an attacker on the path sees). `sent[i]`: from the dialler; `received[i]`: to it."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.sent: list[bytearray] = []
        self.received: list[bytearray] = []
        self._lock = threading.Lock()
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port = self._sock.getsockname()[1]
        self._open: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.target), timeout=10)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            up, down = bytearray(), bytearray()
            with self._lock:
                self.sent.append(up)
                self.received.append(down)
                self._open += [client, server]
            for a, b, log in ((client, server, up), (server, client, down)):
                threading.Thread(target=self._pump, args=(a, b, log), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, log: bytearray) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                with self._lock:
                    log += data
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def everything(self) -> bytes:
        with self._lock:
            return b"".join(bytes(b) for b in (*self.sent, *self.received))

    def close(self) -> None:
        self._sock.close()
        with self._lock:
            for s in self._open:
                with contextlib.suppress(OSError):
                    s.close()


def _split_model(root: Path) -> tuple[Path, Path]:
    """One folder per replica holding the manifest and that replica's share only."""
    folders = []
    for party in (0, 1):
        folder = root / f"replica-{party}-model"
        folder.mkdir()
        for name in ("manifest.json", f"share-{party}.safetensors"):
            shutil.copy(DEFAULT_MODEL / name, folder / name)
        folders.append(folder)
    return folders[0], folders[1]


def _start(cluster: Cluster, relays: list[Relay]):
    try:
        cluster.start()
    except BaseException:
        for r in relays:
            r.close()
        raise
    return cluster


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    root = tmp_path_factory.mktemp("attacks-plain")
    ports = free_ports(3)
    peer, dealer = Relay(ports[1]), Relay(ports[2])
    via = f"http://127.0.0.1:{dealer.port}"
    c = Cluster(
        model=_split_model(root),
        ports=ports,
        log_dir=root / "logs",
        replica_args=("--peer-timeout", "2"),
        role_args={
            "replica0": ("--peer-url", f"ws://127.0.0.1:{peer.port}/v1/peer", "--dealer-url", via),
            "replica1": ("--dealer-url", via),
        },
    )
    _start(c, [peer, dealer])
    try:
        yield c, peer, dealer
    finally:
        c.stop()
        peer.close()
        dealer.close()


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    root = tmp_path_factory.mktemp("attacks-tls")
    ports = free_ports(3)
    relays = {"client": Relay(ports[0]), "peer": Relay(ports[1]), "dealer": Relay(ports[2])}
    via = f"https://127.0.0.1:{relays['dealer'].port}"
    c = Cluster(
        ports=ports,
        log_dir=root / "logs",
        tls=True,
        role_args={
            "replica0": (
                "--peer-url",
                f"wss://127.0.0.1:{relays['peer'].port}/v1/peer",
                "--dealer-url",
                via,
            ),
            "replica1": ("--dealer-url", via),
        },
    )
    _start(c, list(relays.values()))
    try:
        yield c, relays
    finally:
        c.stop()
        for r in relays.values():
            r.close()


# -- helpers ---------------------------------------------------------------------------------


def _shares(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.round(images.reshape(-1, 1, 28, 28) / 255.0 * (1 << 16)).astype(np.int64)
    return privdigit.share_image(x)


def _body(share: np.ndarray, rid: str) -> dict:
    return {"request_id": rid, "input": privdigit.encode_tensor(share)}


def _post_pair(urls, bodies, verify=True) -> list[httpx.Response]:
    with ThreadPoolExecutor(2) as ex:
        futures = [
            ex.submit(httpx.post, f"{u}/v1/predict", json=b, timeout=60, verify=verify)
            for u, b in zip(urls, bodies, strict=True)
        ]
        return [f.result() for f in futures]


def _label(responses: list[httpx.Response]) -> int:
    s = [privdigit.decode_tensor(r.json()["share"]) for r in responses]
    return int(privdigit.reconstruct_label(s[0], s[1], responses[0].json()["sharing"])[0])


def _traces(arr: np.ndarray) -> list[bytes]:
    """How a share could show up in a byte stream: raw words, the wire's base64, hex."""
    raw = np.ascontiguousarray(arr).astype("<i8").tobytes()[:48]
    return [raw, base64.b64encode(raw)[:40], raw.hex().encode()[:64]]


def _metric(url: str, name: str, verify=True) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10, verify=verify).text
    return sum(float(ln.split()[-1]) for ln in text.splitlines() if ln.startswith(name))


def _wait(predicate, what: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while not (got := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return got


def _labelled(mnist) -> tuple[np.ndarray, int]:
    images, labels = mnist
    return images[:1], int(labels[0])


# -- deployment: each replica holds only its own share ----------------------------------------


def test_each_replica_classifies_from_a_folder_holding_only_its_own_share(plain, mnist):
    """§4.6 "A replica reads only its own share": each replica's folder has no other share."""
    c, _, _ = plain
    for party, folder in enumerate(c.model):
        assert sorted(p.name for p in folder.iterdir()) == sorted(
            ["manifest.json", f"share-{party}.safetensors"]
        )
    image, label = _labelled(mnist)
    s0, s1 = _shares(image)
    rid = secrets.token_urlsafe(18)
    responses = _post_pair(c.replica_urls, [_body(s0, rid), _body(s1, rid)])
    assert [r.status_code for r in responses] == [200, 200], [r.text for r in responses]
    assert _label(responses) == label


# -- network attacker on the plain peer stream: replaying a recorded handshake -----------------


def _first_ws_frame(data: bytes) -> tuple[bytes, bytes]:
    """(the HTTP upgrade request, the first WebSocket frame after it) of a dialler's bytes."""
    head_end = data.index(b"\r\n\r\n") + 4
    frame = data[head_end:]
    length, at = frame[1] & 0x7F, 2
    if length == 126:
        length, at = struct.unpack(">H", frame[2:4])[0], 4
    elif length == 127:
        length, at = struct.unpack(">Q", frame[2:10])[0], 10
    at += 4 if frame[1] & 0x80 else 0  # the client's masking key
    assert len(frame) >= at + length, "the recording holds no whole frame"
    return data[:head_end], frame[: at + length]


def _unmasked(data: bytes) -> bytes:
    """What a dialler sent on a WebSocket, readable: its HTTP request, then each frame's
    payload unmasked (a client masks every frame with a fresh key; a recorder just XORs)."""
    if b"\r\n\r\n" not in data:
        return data
    head_end = data.index(b"\r\n\r\n") + 4
    out, pos = [data[:head_end]], head_end
    while pos + 2 <= len(data):
        length, at = data[pos + 1] & 0x7F, pos + 2
        if length == 126:
            length, at = struct.unpack(">H", data[at : at + 2])[0], at + 2
        elif length == 127:
            length, at = struct.unpack(">Q", data[at : at + 8])[0], at + 8
        key = data[at : at + 4] if data[pos + 1] & 0x80 else b"\0\0\0\0"
        at += 4 if data[pos + 1] & 0x80 else 0
        payload = np.frombuffer(data[at : at + length], dtype=np.uint8)
        mask = np.resize(np.frombuffer(key, dtype=np.uint8), len(payload))
        out.append((payload ^ mask).tobytes())
        pos = at + length
    return b"".join(out)


def _close_code(sock: socket.socket, deadline: float) -> int | None:
    """Read server frames (unmasked) until a close frame; its status code, or None on EOF."""
    buf = bytearray()
    while time.monotonic() < deadline:
        while len(buf) >= 2:
            length, at = buf[1] & 0x7F, 2
            if length == 126:
                if len(buf) < 4:
                    break
                length, at = struct.unpack(">H", buf[2:4])[0], 4
            elif length == 127:
                if len(buf) < 10:
                    break
                length, at = struct.unpack(">Q", buf[2:10])[0], 10
            if len(buf) < at + length:
                break
            opcode, payload = buf[0] & 0x0F, bytes(buf[at : at + length])
            del buf[: at + length]
            if opcode == 0x8:
                return struct.unpack(">H", payload[:2])[0] if len(payload) >= 2 else None
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        chunk = sock.recv(65536)
        if not chunk:
            return None
        buf += chunk
    raise AssertionError("no close frame in time")


def test_a_recorded_peer_handshake_replayed_byte_for_byte_is_refused(plain):
    """§4.1: an attacker who recorded replica 0 opening the peer stream (plain HTTP, the relay
    is the recording) replays its bytes to replica 1: the upgrade request, then party 0's
    handshake message with its MAC. Replica 1's fresh nonce makes the MAC stale: closed with
    4401, counted, and the real pair still serves."""
    c, peer, _ = plain
    recorded = _wait(lambda: [bytes(s) for s in peer.sent if b"\r\n\r\n" in s and len(s) > 400],
                     "replica 0's recorded handshake")[0]  # fmt: skip
    upgrade, handshake = _first_ws_frame(recorded)
    assert b"GET /v1/peer" in upgrade
    # the plain recording holds the handshake in the clear
    _wait(lambda: any(b"privdigit-peer/1" in r for r in peer.received), "replica 1's hello")
    before = _metric(c.replica_urls[1], 'privdigit_auth_failures_total{what="peer"}')
    with socket.create_connection(("127.0.0.1", c.ports[1]), timeout=10) as s:
        s.sendall(upgrade)
        answer = bytearray()
        while b"\r\n\r\n" not in answer:
            answer += s.recv(65536)
        assert answer.startswith(b"HTTP/1.1 101"), bytes(answer[:200])
        s.sendall(handshake)  # replica 1 already sent its fresh nonce; the replay ignores it
        assert _close_code(s, time.monotonic() + 30) == 4401
    _wait(
        lambda: (
            _metric(c.replica_urls[1], 'privdigit_auth_failures_total{what="peer"}') == before + 1
        ),
        "the refusal to be counted",
    )
    assert httpx.get(f"{c.replica_urls[1]}/v1/ready", timeout=10).status_code == 200


# -- what the dealer receives ------------------------------------------------------------------


def test_the_dealer_receives_no_share_no_output_and_no_client_request_id(plain, mnist):
    """§1, §3.4 and step 10: everything the replicas send the dealer (recorded on the path)
    holds no input share, no output share and no client request id, only run ids and plans;
    a share that never pairs (504) sends its id to the dealer neither. Control: the recording
    does hold the dealer requests in the clear."""
    c, _, dealer = plain
    image, label = _labelled(mnist)
    s0, s1 = _shares(image)
    rid = "client-chosen-" + secrets.token_hex(8)
    responses = _post_pair(c.replica_urls, [_body(s0, rid), _body(s1, rid)])
    assert [r.status_code for r in responses] == [200, 200], [r.text for r in responses]
    assert _label(responses) == label
    lone_rid, (lone, _) = "lone-share-" + secrets.token_hex(8), _shares(image)
    r = httpx.post(f"{c.replica_urls[0]}/v1/predict", json=_body(lone, lone_rid), timeout=30)
    assert r.status_code == 504 and r.json()["error"]["code"] == "peer_timeout", r.text
    seen = dealer.everything()
    assert b"POST /v1/randomness" in seen and b'"plan"' in seen  # the control
    ids = set(re.findall(rb'"request_id": ?"([^"]+)"', seen))
    assert ids and all(re.fullmatch(rb"\d{10}-[A-Za-z0-9_-]{22}", i) for i in ids), ids
    assert rid.encode() not in seen and lone_rid.encode() not in seen
    outputs = [privdigit.decode_tensor(r.json()["share"]) for r in responses]
    for arr in (s0, s1, lone, *outputs):
        for trace in _traces(arr):
            assert trace not in seen


def test_no_credential_crosses_the_wire_even_in_the_clear(plain, mnist):
    """§2 "Pairwise keys: never sent, only HMAC tags travel": everything recorded on the plain
    peer stream and dealer hop (the handshake, runs, dealer requests) holds none of the keys.
    Control: the recording holds the tags that prove them."""
    c, peer, dealer = plain
    s0, s1 = _shares(mnist[0][2:3])
    rid = secrets.token_urlsafe(18)
    assert [
        r.status_code for r in _post_pair(c.replica_urls, [_body(s0, rid), _body(s1, rid)])
    ] == [
        200,
        200,
    ]
    seen = b"".join(_unmasked(bytes(b)) for b in peer.sent) + peer.everything()
    seen += dealer.everything()
    # the control: party 0's handshake message (masked on the wire) and the dealer's header
    assert b'"party": 0' in seen and b'"mac"' in seen
    assert auth.AUTH_HEADER.lower().encode() in seen.lower()
    keys = [c.key(f"replica-{p}", name) for p in (0, 1) for name in ("peer.key", "dealer.key")]
    for key in keys:
        for form in (key, base64.b64encode(key), key.hex().encode()):
            assert form[:32] not in seen


def test_logs_hold_no_output_share_and_no_dealer_seed(plain, mnist):
    """§4.7: after a prediction and a dealer request, no log holds either output share (base64
    as on the wire) or the seed the dealer served (hex or base64). Control: the logs do hold
    the request id."""
    c, _, _ = plain
    s0, s1 = _shares(mnist[0][1:2])
    rid = secrets.token_urlsafe(18)
    responses = _post_pair(c.replica_urls, [_body(s0, rid), _body(s1, rid)])
    assert [r.status_code for r in responses] == [200, 200]
    plan = load_share(DEFAULT_MODEL, 0, "lut")
    plan = plan.network.plan(1, "label", plan.weight_shapes, plan.mask_id)
    run_id = new_run_id()
    body = json.dumps({"request_id": run_id, "party": 1, "plan": wire.plan_to_json(plan)})
    tag = auth.dealer_tag(c.key("dealer", "party-1.key"), 1, body.encode())
    got = httpx.post(f"{c.dealer_url}/v1/randomness", content=body,
                     headers={auth.AUTH_HEADER: tag}, timeout=60)  # fmt: skip
    assert got.status_code == 200, got.text
    material = wire.material_from_bytes(got.content, run_id, 1, plan)
    secrets_seen = [
        *(r.json()["share"]["data"][:40] for r in responses),
        material.seed.hex()[:40],
        base64.b64encode(material.seed).decode()[:40],
        *(base64.b64encode(m).decode()[:40] for m in material.mask_seeds),
        base64.b64encode(material.corrections[0].numpy().tobytes()[:48]).decode(),
    ]
    logs = "".join(c.tail(role, 100_000) for role in ("replica0", "replica1", "dealer"))
    assert rid in logs
    for value in secrets_seen:
        assert value not in logs


def test_the_dealer_cannot_be_told_another_party_through_the_partys_spelling(plain):
    """§4.1: replica 0 holds party 0's dealer key only. It spells "party 1" every way JSON
    allows ("1", 1.0, true, 1e0, a duplicate key), or names the dealer's own stream (2) or -1,
    each signed with its key under each label: never served, each refusal counted."""
    c, _, _ = plain
    key = c.key("replica-0", "dealer.key")
    refused = "privdigit_dealer_refused_total"
    before = _metric(c.dealer_url, refused)
    rid = new_run_id()
    spellings = ['"1"', "1.0", "true", "1e0", "2", "-1", "1.9"]
    bodies = [
        f'{{"request_id": "{rid}", "party": {s}, "plan": []}}'.encode() for s in spellings
    ] + [f'{{"request_id": "{rid}", "party": 0, "plan": [], "party": 1}}'.encode()]
    for body in bodies:
        for label in (0, 1, 2):
            r = httpx.post(
                f"{c.dealer_url}/v1/randomness",
                content=body,
                headers={auth.AUTH_HEADER: auth.dealer_tag(key, label, body)},
                timeout=30,
            )
            assert r.status_code in (401, 403, 422), (body, label, r.status_code, r.text)
    assert _metric(c.dealer_url, refused) == before + 3 * len(bodies)  # each one counted


def test_no_page_origin_is_allowed_by_default(plain):
    """§4.8: replicas started without `--cors-origin` let no web page read their answers: no
    Access-Control-Allow-Origin for a foreign origin, on a preflight or a simple request."""
    c, _, _ = plain
    evil = "https://evil.example"
    for url in c.replica_urls:
        pre = httpx.options(
            f"{url}/v1/predict",
            headers={
                "Origin": evil,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type",
            },
            timeout=10,
        )
        got = httpx.get(f"{url}/v1/model", headers={"Origin": evil}, timeout=10)
        assert got.status_code == 200
        for r in (pre, got):
            assert "access-control-allow-origin" not in r.headers, dict(r.headers)
            assert "access-control-allow-credentials" not in r.headers


# -- an eavesdropper on every TLS hop -----------------------------------------------------------


def test_an_eavesdropper_on_every_hop_sees_only_tls(tls, mnist, plain):
    """§1 and §4.2: with `--tls`, what a recorder on the client -> replica 0, replica 0 ->
    replica 1 and replica -> dealer paths sees is TLS records only: no share (input or output),
    no request id, no protocol text. Control: the same recorder on the plain cluster reads the
    peer hello and the dealer requests."""
    c, relays = tls
    image, label = _labelled(mnist)
    s0, s1 = _shares(image)
    rid = "eavesdropped-" + secrets.token_hex(8)
    urls = (f"https://127.0.0.1:{relays['client'].port}", c.replica_urls[1])
    responses = _post_pair(urls, [_body(s0, rid), _body(s1, rid)], verify=c.verify)
    assert [r.status_code for r in responses] == [200, 200], [r.text for r in responses]
    assert _label(responses) == label
    outputs = [privdigit.decode_tensor(r.json()["share"]) for r in responses]
    plaintext = [rid.encode(), b"privdigit", b"request_id", b"HTTP/1.1", b"/v1/"]
    for hop, relay in relays.items():
        assert relay.sent, hop
        for stream in (*relay.sent, *relay.received):
            if stream:
                assert stream[0] == 0x16 and stream[1] == 0x03, (hop, bytes(stream[:8]))
        seen = relay.everything()
        assert len(seen) > 2_000, hop
        for needle in plaintext:
            assert needle not in seen, (hop, needle)
        for arr in (s0, s1, *outputs):
            for trace in _traces(arr):
                assert trace not in seen, hop
    _, peer, dealer = plain  # the control: the same recorder reads a plain deployment
    assert b"privdigit-peer/1" in peer.everything() and b"/v1/randomness" in dealer.everything()


# -- in process: party 1's corrections ----------------------------------------------------------


def _bits(words: torch.Tensor) -> np.ndarray:
    u = words.contiguous().view(-1).numpy().view(np.uint64)
    return ((u[:, None] >> np.arange(64, dtype=np.uint64)) & np.uint64(1)).astype(np.uint8)


def _z(bits: np.ndarray) -> np.ndarray:
    n = bits.shape[0]
    return (bits.sum(0, dtype=np.int64) - n / 2) / np.sqrt(n / 4)


def test_party_1s_corrections_are_uniform_and_fresh_for_every_run():
    """Step 10: party 1 learns nothing from its corrections. For the deployed CNN's plan (batch
    4, lut, fixed weight masks), each correction tensor's words have every bit fair, and the
    XOR of two runs' corrections too (nothing repeats, even with the weights' masks fixed).
    Z limit 6.5 per bit (Bonferroni over a few thousand bits at 1e-6)."""
    model = load_share(DEFAULT_MODEL, 1, "lut")
    plan = model.network.plan(4, "label", model.weight_shapes, model.mask_id)
    dealer = Dealer()
    runs = [dealer.deal(f"run-{i}", 1, plan).corrections for i in range(2)]
    assert len(runs[0]) > 10
    checked = 0
    for a, b in zip(*runs, strict=True):
        if a.numel() < 2_000:  # too few words for a bit test; pooled below
            continue
        for words in (a, a ^ b):
            z = _z(_bits(words))
            assert np.abs(z).max() < 6.5, (tuple(a.shape), int(np.abs(z).argmax()))
        checked += 1
    small = [torch.cat([t.view(-1) for t in run if t.numel() < 2_000]) for run in runs]
    for words in (small[0], small[0] ^ small[1]):
        assert np.abs(_z(_bits(words))).max() < 6.5
    assert checked >= 5, checked


# -- the page's origin ------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/config.json", "/no-such-file.js"])
def test_every_page_answer_forbids_sniffing_referrers_and_caching(path):
    """§4.8: a script served as something else is not sniffed into one, no answer leaks the
    page's address to the replicas, and no copy stays in a shared cache; the CSP too, on found,
    generated and missing files alike."""
    from fastapi.testclient import TestClient

    from service.api.web_app import create_web_app

    replicas = ("https://r0.example:8000", "https://r1.example:8001")
    with TestClient(create_web_app(replicas)) as client:
        r = client.get(path)
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["referrer-policy"] == "no-referrer"
    assert r.headers["cache-control"] == "no-store"
    assert "default-src 'none'" in r.headers["content-security-policy"]


# -- strangers ----------------------------------------------------------------------------------


def test_a_stranger_announcing_a_frame_past_the_bound_is_cut_off_before_sending_it(plain):
    """§4.5: before any authentication, a stranger on replica 1's peer stream announces one
    frame of 256 MiB + 1 and sends none of it: replica 1 closes with 1009 (message too big)
    instead of waiting to read it."""
    c, _, _ = plain
    with socket.create_connection(("127.0.0.1", c.ports[1]), timeout=10) as s:
        key = base64.b64encode(secrets.token_bytes(16)).decode()
        s.sendall(
            (
                f"GET /v1/peer HTTP/1.1\r\nHost: 127.0.0.1:{c.ports[1]}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        answer = bytearray()
        while b"\r\n\r\n" not in answer:
            answer += s.recv(65536)
        assert answer.startswith(b"HTTP/1.1 101"), bytes(answer[:200])
        header = bytes([0x81, 0x80 | 127]) + struct.pack(">Q", 256 * 1024 * 1024 + 1)
        s.sendall(header + secrets.token_bytes(4))  # the masking key, then no payload
        assert _close_code(s, time.monotonic() + 30) == 1009


def test_a_reload_with_a_wrong_key_is_refused_and_counted(plain):
    """§4.1: a stranger's reload (another key, no key) gets 401 and each is counted in
    `privdigit_auth_failures_total{what="admin"}`."""
    c, _, _ = plain
    url, name = c.replica_urls[0], 'privdigit_auth_failures_total{what="admin"}'
    before = _metric(url, name)
    tags = [auth.admin_tag(c.key("replica-1", "admin.key"), 0), None]
    for tag in tags:
        headers = {auth.AUTH_HEADER: tag} if tag else {}
        r = httpx.post(f"{url}/v1/admin/reload", headers=headers, timeout=30)
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthenticated", r.text
    assert _metric(url, name) == before + len(tags)


# -- an authenticated-looking party 1, and a flooding one ---------------------------------------


async def _party0_against(reply) -> tuple[bool, int | None, int]:
    """A real party 0 (`PeerLink.dial_forever`) dials a fake party 1 that sends a proper hello,
    reads party 0's handshake message and answers `reply(message)`. Returns whether party 0
    ever counted the stream as up, the close code party 0 sent, and its refusals counted."""
    from websockets.asyncio.server import serve

    from service.api.transport.peer import HELLO, PeerLink

    failures, codes, up = [], [], []
    link = PeerLink(
        b"k" * 32, lambda: ["v1"], timeout=5, on_auth_failure=lambda: failures.append(1)
    )
    link.on_connect = lambda: up.append(True)
    done = asyncio.Event()

    async def fake_party1(ws) -> None:
        await ws.send(json.dumps({"hello": HELLO, "party": 1, "nonce": auth.nonce()}))
        message = json.loads(await ws.recv())
        await ws.send(json.dumps(reply(message)))
        with contextlib.suppress(Exception):
            await asyncio.wait_for(ws.recv(), 10)  # party 0 closes at once, or stays (paired)
        codes.append(ws.close_code)
        done.set()

    async with serve(fake_party1, "127.0.0.1", 0, compression=None) as server:
        port = server.sockets[0].getsockname()[1]
        dialler = asyncio.create_task(link.dial_forever(f"ws://127.0.0.1:{port}/v1/peer"))
        try:
            await asyncio.wait_for(done.wait(), 30)
        finally:
            dialler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await dialler
    return bool(up), codes[0], len(failures)


def _reflect(message: dict) -> dict:
    return {"versions": message["versions"], "mac": message["mac"]}  # party 0's own tag


def _other_key(message: dict) -> dict:
    return {"versions": "[]", "mac": auth.mac(b"x" * 32, "peer", "1", "n", message["nonce"], "[]")}


@pytest.mark.parametrize("reply", [_reflect, _other_key], ids=["reflected-tag", "another-key"])
def test_party_0_never_pairs_with_an_impostor_party_1(reply):
    """§4.1 "Each replica accepts only the other replica", without TLS: something that answers
    at party 1's address without the peer key (it sends back party 0's own tag, or a tag made
    with another key) never gets party 0's stream: closed with 4401 and counted."""
    up, code, failures = asyncio.run(_party0_against(reply))
    assert not up and code == 4401 and failures >= 1


def test_a_peer_flooding_frames_for_runs_that_never_start_holds_at_most_4096_mailboxes():
    """§4.5: frames for request ids that never start here wait in mailboxes, at most
    `MAX_MAILBOXES` of them; the rest are dropped (a flood of 5,000 ids)."""
    from service.api.transport.peer import MAX_MAILBOXES, PeerLink

    link = PeerLink(b"k" * 32, lambda: [])
    for i in range(MAX_MAILBOXES + 904):
        frame = wire.decode_frame(
            wire.encode_data(f"flood-{i}", 0, [torch.zeros(1, dtype=torch.int64)])
        )
        link._deliver(frame)
    assert len(link._boxes) == MAX_MAILBOXES


# -- the document's evidence --------------------------------------------------------------------


def test_every_test_the_security_doc_cites_exists():
    """docs/security.md names a test for each claim (`tests/f.py::name`, or `::name` after the
    last file named): each must exist, or a claim has lost its evidence unnoticed."""
    text = (REPO / "docs" / "security.md").read_text()
    cites, last, missing = 0, None, []
    for m in re.finditer(r"`(tests/[\w/]+\.py)?(?:::(\w+))?(?:\[[^\]`]*\])?`", text):
        last = m.group(1) or last
        if not m.group(2):
            continue  # a file alone: the file of the `::name`s after it
        assert last is not None, m.group(0)
        body = (REPO / last).read_text()
        cites += 1
        if not re.search(rf"^(?:async )?def {m.group(2)}\(", body, re.M):
            missing.append(f"{last}::{m.group(2)}")
    assert cites > 100 and not missing, missing


# -- a TLS replica never dials in the clear -----------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    from service.devcerts import make_dev_certs

    return Path(make_dev_certs(tmp_path_factory.mktemp("certs"), days=1))


@pytest.mark.parametrize(
    ("party", "urls", "named"),
    [
        (0, ("--dealer-url", "http://dealer:8002"), "--dealer-url"),
        (1, ("--dealer-url", "http://dealer:8002"), "--dealer-url"),
        (0, ("--peer-url", "ws://replica-1:8001/v1/peer"), "--peer-url"),
    ],
    ids=["party-0-plain-dealer", "party-1-plain-dealer", "party-0-plain-peer"],
)
def test_a_tls_replica_refuses_to_send_its_material_or_openings_in_the_clear(
    party, urls, named, certs, tmp_path, monkeypatch, capsys
):
    """§4.2: a replica that serves TLS but was given a `http://` dealer URL (party 0 or 1) or a
    `ws://` peer URL (party 0, which dials) would send the dealer's seeds and corrections, or
    the openings and the lanes' frames, in the clear to whoever answers there. It refuses to
    start (a one-line error, exit 2) unless `--allow-http` says plain traffic is intended."""
    import os

    from service.__main__ import main

    for key in [k for k in os.environ if k.startswith("PRIVDIGIT_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("PRIVDIGIT_PEER_SECRET", "p" * 32)
    monkeypatch.setenv("PRIVDIGIT_DEALER_SECRET", "d" * 32)
    role = certs / f"replica-{party}"
    tls = ["--tls-cert", str(role / "cert.pem"), "--tls-key", str(role / "key.pem")]
    secure = ["--dealer-url", "https://dealer:8002", "--peer-url", "wss://replica-1:8001/v1/peer"]
    base = ["replica", "--party", str(party), "--model", str(tmp_path / "none"), *tls, *secure]
    assert main([*base, *urls]) == 2
    err = capsys.readouterr().err
    assert named in err and "--allow-http" in err and "Traceback" not in err, err
    # with the secure URLs, or with --allow-http, the transport passes (the model is missing)
    for args in (base, [*base, *urls, "--allow-http"]):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert named not in err and "none" in err, err
