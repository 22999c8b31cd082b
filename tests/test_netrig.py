"""Three hosts on one machine: dealer, replicas and client each in its own network namespace.

The rig (`service.netrig`) joins the parties through a delaying relay (2 ms between the replicas
and to the dealer, 1 ms to the client), TLS everywhere with certificates naming the rig's hosts.
Labels equal the plaintext model's; a link that goes down or stalls gives the client clean JSON
errors, and the replicas recover by themselves (the peer stream and the lanes redial) once it
is back. These tests need root (`ip netns`); they fail, not skip, where root cannot build the
rig, and skip elsewhere with the reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable

import httpx
import numpy as np
import pytest
import torch

from clients import privdigit
from service import netrig
from service.cluster import DEFAULT_MODEL
from training.evaluate import ManifestModel

if not sys.platform.startswith("linux") or os.geteuid() != 0 or shutil.which("ip") is None:
    pytest.skip(
        "the netns rig needs Linux, root and iproute2 (ip netns add); run as root to test it",
        allow_module_level=True,
    )

DEADLINE_S = 60.0


@pytest.fixture(scope="module")
def rig():
    netrig.remove_leftovers()  # of earlier runs that died; never a live rig's
    with netrig.NetRig(rtt_ms=2, client_rtt_ms=1) as r:
        yield r
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert r.tag not in names, "the rig left namespaces behind"


@pytest.fixture(scope="module")
def cluster(rig, tmp_path_factory):
    c = rig.cluster(
        log_dir=tmp_path_factory.mktemp("netrig-logs"), replica_args=("--peer-timeout", "3")
    )
    rig.run("client", c.start)
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def plaintext():
    return ManifestModel(DEFAULT_MODEL).eval()


def _plain(model, images01: np.ndarray) -> list[int]:
    with torch.no_grad():
        x = torch.from_numpy(images01.astype(np.float32)).reshape(-1, 1, 28, 28)
        return model(x).argmax(-1).tolist()


def _labels(rig, cluster, images01: np.ndarray) -> list[int]:
    def go() -> list[int]:
        with privdigit.PrivDigitClient(cluster.replica_urls, verify=cluster.verify) as c:
            return [p.label for p in c.predict_encoded(images01)]

    return rig.run("client", go)


def _get(rig, cluster, url: str) -> httpx.Response:
    return rig.run("client", lambda: httpx.get(url, verify=cluster.verify, timeout=10))


def _wait(what: str, condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {DEADLINE_S:g} s: {what}")
        time.sleep(0.1)


def _ready(rig, cluster) -> bool:
    return all(_get(rig, cluster, f"{u}/v1/ready").status_code == 200 for u in cluster.replica_urls)


def _lane_runs(rig, cluster) -> float:
    text = _get(rig, cluster, f"{cluster.replica_urls[0]}/metrics").text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith('privdigit_runs_total{channel="lane"')
    )


def test_parties_are_hosts_of_their_own(rig, cluster):
    """Each process runs in its namespace on its own address, none on 127.0.0.1; the client
    reaches the replicas only at the relay's addresses, by TLS that names them."""
    assert all(u.startswith("https://10.77.4.") for u in cluster.replica_urls)
    for role, port in (("replica0", 8000), ("replica1", 8001), ("dealer", 8002)):
        out = subprocess.run(
            ["ip", "netns", "exec", rig.ns(role), "ss", "-Hltn"], capture_output=True, text=True
        ).stdout
        assert f"{netrig.address(role)}:{port}" in out and "127.0.0.1" not in out, out
    with pytest.raises(httpx.ConnectError):  # this process's own namespace has no such host
        httpx.get(f"{cluster.replica_urls[0]}/v1/health", verify=cluster.verify, timeout=2)


def test_labels_across_hosts_equal_plaintext(rig, cluster, mnist, plaintext):
    x = mnist[0][:5] / 255.0
    before = _lane_runs(rig, cluster)
    assert _labels(rig, cluster, x[:1]) == _plain(plaintext, x[:1])
    assert _labels(rig, cluster, x) == _plain(plaintext, x)
    assert _lane_runs(rig, cluster) >= before + 2  # rounds went over the TLS lanes


def test_replica_link_down_gives_clean_errors_and_recovers(rig, cluster, mnist, plaintext):
    """The cable between the replicas is cut for a few seconds: clients get 503 not_ready (JSON),
    then the peer stream and the lanes redial by themselves and labels are right again."""
    x = mnist[0][5:7] / 255.0
    rig.link("replicas", "down")
    try:
        _wait("replica 0 unready", lambda: not _ready(rig, cluster))
        with pytest.raises(privdigit.ServiceError) as info:
            _labels(rig, cluster, x)
        assert info.value.status == 503 and info.value.code == "not_ready"
        refused = int(rig.link("replicas", "refused"))
        _wait(
            "party 0 redialled twice", lambda: int(rig.link("replicas", "refused")) >= refused + 2
        )
    finally:
        rig.link("replicas", "up")
    _wait("both replicas ready again", lambda: _ready(rig, cluster))
    before = _lane_runs(rig, cluster)
    _wait(
        "a lane again", lambda: _labels(rig, cluster, x[:1]) and _lane_runs(rig, cluster) > before
    )
    assert _labels(rig, cluster, x) == _plain(plaintext, x)


def test_stalled_replica_link_times_out_cleanly_and_recovers(rig, cluster, mnist, plaintext):
    """Nothing crosses the link for longer than the peer timeout (3 s), though the connections
    stay open: the request fails with a JSON error, and the next ones work without a restart."""
    x = mnist[0][7:9] / 255.0
    rig.link("replicas", "stall")
    try:
        with pytest.raises(privdigit.ServiceError) as info:
            _labels(rig, cluster, x[:1])
        assert info.value.status in (502, 503, 504), info.value
    finally:
        rig.link("replicas", "up")
    _wait("both replicas ready again", lambda: _ready(rig, cluster))
    assert _labels(rig, cluster, x) == _plain(plaintext, x)


def test_client_link_down_is_a_clean_client_error(rig, cluster, mnist, plaintext):
    x = mnist[0][9:10] / 255.0
    rig.link("client1", "down")
    try:
        with pytest.raises(privdigit.PrivDigitError):
            _labels(rig, cluster, x)
    finally:
        rig.link("client1", "up")
    assert _labels(rig, cluster, x) == _plain(plaintext, x)


@pytest.mark.slow
def test_lossy_jittery_links_still_give_plaintext_labels(rig, cluster, mnist, plaintext):
    """5% of chunks between the replicas wait a retransmission timeout: slower, never wrong."""
    x = mnist[0][10:20] / 255.0
    rig.link("replicas", "loss 0.05")
    try:
        got = [_labels(rig, cluster, x[i : i + 1])[0] for i in range(len(x))]
    finally:
        rig.link("replicas", "loss 0")
    assert got == _plain(plaintext, x)
