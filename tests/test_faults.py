"""Faults with real processes: a peer killed mid-request, the dealer stopped, restarts, and a
graceful shutdown. The service must answer each with a documented error, never hang, and
recover with no manual step."""

from __future__ import annotations

import secrets
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from clients import privdigit
from service.cluster import Cluster, free_ports

FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="module")
def images():
    return np.load(FIXTURES / "mnist_test_1000.npz")["images"].astype(np.float64) / 255.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(
        ports=free_ports(3),
        log_dir=tmp_path_factory.mktemp("faults"),
        replica_args=("--peer-timeout", "5", "--max-batch", "256"),
    )
    with c:
        yield c


def _labels(cluster, x, timeout=60.0):
    with privdigit.PrivDigitClient(cluster.replica_urls, timeout=timeout) as client:
        return [p.label for p in client.predict_encoded(x)]


def _start_dealer(cluster) -> None:
    """Start the dealer and wait until it answers its health check."""
    cluster.start_process("dealer")
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{cluster.dealer_url}/v1/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, cluster.tails()
        time.sleep(0.1)


def _post_both(cluster, x, rid=None):
    s0, s1 = privdigit.share_image(privdigit.encode_fixed(x.reshape(-1, 1, 28, 28), 16))
    rid = rid or secrets.token_urlsafe(18)
    with ThreadPoolExecutor(2) as ex:
        futures = [
            ex.submit(
                httpx.post,
                f"{url}/v1/predict",
                json={"request_id": rid, "input": privdigit.encode_tensor(share)},
                timeout=60,
            )
            for url, share in zip(cluster.replica_urls, (s0, s1), strict=True)
        ]
        return [f.result() for f in futures]


def test_peer_killed_mid_request_fails_fast_then_recovers(cluster, images):
    expected = _labels(cluster, images[:4])
    errors: list[BaseException] = []
    started = time.monotonic()

    def long_request():
        try:
            _labels(cluster, images[:256])
        except privdigit.PrivDigitError as exc:
            errors.append(exc)

    worker = threading.Thread(target=long_request)
    worker.start()
    time.sleep(0.5)
    cluster.stop_process("replica1", kill=True)
    worker.join(30)
    assert not worker.is_alive(), "the client hung after the peer died"
    assert errors and time.monotonic() - started < 20
    r0 = httpx.get(f"{cluster.replica_urls[0]}/v1/ready")
    assert r0.status_code == 503 and not r0.json()["peer_connected"]
    cluster.start_process("replica1")
    cluster.wait_ready(60)
    assert _labels(cluster, images[:4]) == expected


def test_dealer_down_gives_503_and_recovers_after_restart(cluster, images):
    expected = _labels(cluster, images[:4])
    cluster.stop_process("dealer")
    # One-image runs first use the material prefetched while the dealer was up (at most the
    # pool's depth, 4 by default); then the replicas must say the dealer is gone.
    for _ in range(5):
        responses = _post_both(cluster, images[:1])
        if responses[0].status_code != 200:
            break
    else:
        pytest.fail("requests kept succeeding without a dealer beyond the prefetched material")
    for r in responses:
        assert r.status_code == 503 and r.json()["error"]["code"] == "dealer_unavailable"
    _start_dealer(cluster)
    assert _labels(cluster, images[:4]) == expected


def test_party0_restart_redials_by_itself(cluster, images):
    expected = _labels(cluster, images[:4])
    cluster.stop_process("replica0", kill=True)
    cluster.start_process("replica0")
    cluster.wait_ready(60)
    assert _labels(cluster, images[:4]) == expected


def test_graceful_shutdown_finishes_in_flight_and_refuses_new(cluster, images):
    expected = _labels(cluster, images[:256])
    s0, s1 = privdigit.share_image(privdigit.encode_fixed(images[:256].reshape(-1, 1, 28, 28), 16))
    rid = secrets.token_urlsafe(18)

    def post(party: int, share: np.ndarray) -> httpx.Response:
        return httpx.post(
            f"{cluster.replica_urls[party]}/v1/predict",
            json={"request_id": rid, "input": privdigit.encode_tensor(share)},
            timeout=60,
        )

    # The request is in flight on replica 0 (waiting for its peer's half) when SIGTERM comes;
    # the peer's half arrives only after the late request was refused, so the order is fixed
    # however fast the protocol runs.
    with ThreadPoolExecutor(2) as ex:
        first = ex.submit(post, 0, s0)
        deadline = time.monotonic() + 30
        while "privdigit_inflight 1.0" not in httpx.get(f"{cluster.replica_urls[0]}/metrics").text:
            assert time.monotonic() < deadline and not first.done(), "never in flight"
            time.sleep(0.02)
        cluster.procs["replica0"].send_signal(signal.SIGTERM)
        # wait for the drain to begin (a condition, not a time: the signal is handled on the
        # replica's event loop, late on a loaded machine)
        deadline = time.monotonic() + 30
        while "shutting down" not in httpx.get(f"{cluster.replica_urls[0]}/v1/ready").text:
            assert time.monotonic() < deadline and not first.done(), "never began draining"
            time.sleep(0.02)
        late = httpx.post(
            f"{cluster.replica_urls[0]}/v1/predict",
            json={
                "request_id": secrets.token_urlsafe(18),
                "input": privdigit.encode_tensor(np.zeros((1, 1, 28, 28), dtype=np.int64)),
            },
            timeout=30,
        )
        results = [first, ex.submit(post, 1, s1)]
        results = [f.result() for f in results]
    assert late.status_code == 503 and late.json()["error"]["code"] == "not_ready"
    assert "shutting down" in late.json()["error"]["message"]
    assert [r.status_code for r in results] == [200, 200], [r.text[:200] for r in results]
    one_hot = privdigit.reconstruct_label(
        privdigit.decode_tensor(results[0].json()["share"]),
        privdigit.decode_tensor(results[1].json()["share"]),
        results[0].json()["sharing"],
    )
    assert list(one_hot) == expected
    # it exits by itself after the drain (uvicorn re-raises the captured SIGTERM: -15)
    assert cluster.procs["replica0"].wait(30) in (0, -signal.SIGTERM)
    cluster.start_process("replica0")
    cluster.wait_ready(60)
    assert _labels(cluster, images[:4]) == expected[:4]


def test_a_peer_with_a_certificate_from_another_ca_is_refused(tmp_path):
    """TLS between the replicas is verified: party 0 trusting another CA never pairs."""
    from service.devcerts import make_dev_certs

    stranger = make_dev_certs(tmp_path / "other-ca", days=1) / "ca.pem"
    c = Cluster(ports=free_ports(3), log_dir=tmp_path, tls=True,
                role_args={"replica0": ("--tls-ca", str(stranger))})  # fmt: skip
    c.prepare()
    for role in c.roles:
        c.start_process(role)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                r = httpx.get(f"{c.replica_urls[0]}/v1/ready", verify=c.verify, timeout=2)
                reasons = " ".join(r.json()["reasons"])
                if "CERTIFICATE_VERIFY_FAILED" in reasons or "certificate" in reasons.lower():
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, c.tails()
            time.sleep(0.2)
        assert r.status_code == 503 and not r.json()["peer_connected"]
    finally:
        c.stop()


def test_after_a_dealer_restart_runs_open_the_weights_under_its_new_masks(cluster, images):
    """A restarted dealer has a new master key, hence new fixed weight masks: the replicas must
    open W - b again instead of reusing the old opening (which would give wrong labels)."""
    expected = _labels(cluster, images[:4])
    cluster.stop_process("dealer")
    _start_dealer(cluster)
    for _ in range(3):  # four-image runs fetch from the new dealer (no prefetched material fits)
        assert _labels(cluster, images[:4]) == expected
