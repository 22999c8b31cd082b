"""Several replica pairs behind one client (issue 16.3): one pair stopped under load, no failure.

`service.cluster.Pairs` starts two pairs (each its own dealer and two replicas); clients that
know both spread their requests over them; when one pair stops, they carry on with the other
without a single failed request.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from benchmarks import load
from clients import privdigit
from service.api.web_app import content_security_policy, create_web_app
from service.cluster import DEFAULT_MODEL, Pairs, free_ports
from training.evaluate import ManifestModel

DEADLINE_S = 120.0  # generous: the machine is shared


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    ports = free_ports(6)
    p = Pairs(
        2,
        log_dir=tmp_path_factory.mktemp("pairs-logs"),
        pair_ports=(ports[:3], ports[3:]),  # type: ignore[arg-type]
        replica_args=("--peer-timeout", "3"),
    )
    with p:
        yield p


def _wait(condition, what: str, deadline_s: float = DEADLINE_S) -> None:
    """Wait (polling) until `condition()` holds; fail naming `what` after the deadline."""
    deadline = time.monotonic() + deadline_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_each_replica_reports_its_pair(pairs):
    for k, urls in enumerate(pairs.replica_pairs):
        for party, url in enumerate(urls):
            assert httpx.get(f"{url}/v1/health").json() == {
                "status": "ok",
                "party": party,
                "pair": str(k),
            }


def test_the_web_config_names_every_pair():
    pairs = (("http://a:1", "http://a:2"), ("http://b:1", "http://b:2"))
    with TestClient(create_web_app(pairs)) as page:
        config = page.get("/config.json").json()
    assert config == {"replicas": list(pairs[0]), "pairs": [list(p) for p in pairs]}
    assert "connect-src 'self' http://a:1 http://a:2 http://b:1 http://b:2;" in (
        content_security_policy(pairs)
    )


def test_the_load_benchmark_spreads_over_the_pairs(pairs, capsys):
    argv = ["--clients", "2", "--seconds", "3", "--warmup", "0.5", "--json"]
    for urls in pairs.replica_pairs:
        argv += ["--replicas", ",".join(urls)]
    rc = load.main(argv)
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["passed"] and out["pairs"] == 2, out
    assert min(out["images_by_pair"]) > 0 and sum(out["images_by_pair"]) == out["ok"]
    assert out["cpu_ms_per_image"]["pair1.replica0"] > 0  # both pairs did the work
    assert out["cpu_ms_per_image"]["pair0.replica1"] > 0


def test_a_pair_stopped_under_load_fails_no_request(pairs, mnist):
    images = mnist[0][:64].astype(np.float64) / 255.0
    with torch.no_grad():
        x = torch.from_numpy(images.reshape(-1, 1, 28, 28).astype(np.float32))
        expected = ManifestModel(DEFAULT_MODEL).eval()(x).argmax(-1).tolist()
    served: Counter[int] = Counter()
    failures: list[str] = []
    wrong: list[int] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client(k: int) -> None:
        with privdigit.PrivDigitClient(pairs.replica_pairs, timeout=30) as c:
            i = k
            while not stop.is_set():
                j = i % len(images)
                i += 4
                try:
                    pred = c.predict_encoded(images[j])[0]
                except Exception as exc:  # any failure the user would see counts
                    with lock:
                        failures.append(f"{type(exc).__name__}: {exc}")
                    continue
                with lock:
                    served[pred.pair] += 1
                    if pred.label != expected[j]:
                        wrong.append(j)

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(4)]
    for t in threads:
        t.start()
    try:
        _wait(lambda: served[0] >= 8 and served[1] >= 8, "both pairs to serve requests")
        pairs.clusters[0].stop()  # dealer and both replicas of pair 0, under load
        after = served[1]
        _wait(lambda: served[1] >= after + 40, "pair 1 to carry the load alone")
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert failures == [] and wrong == []
    assert all(not t.is_alive() for t in threads)
