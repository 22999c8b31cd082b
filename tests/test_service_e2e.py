"""End to end with real processes: dealer and two replicas (uvicorn on 127.0.0.1, free ports).

Labels through the client equal the plaintext model's; every documented error path answers its
JSON error; the peer and dealer refuse strangers; versions that disagree keep replicas unready.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from clients import privdigit
from service.api import auth
from service.cluster import DEFAULT_MODEL, Cluster, free_ports
from service.mpc import protocols
from service.mpc.dealer import new_run_id
from training.evaluate import ManifestModel

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"
CNN_MODEL = FIXTURES / "cnn-model"  # the centrally trained CNN of the engine tests, exported
PAGE = "http://page.example:8003"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(
        ports=free_ports(3),
        log_dir=tmp_path_factory.mktemp("logs"),
        replica_args=("--peer-timeout", "3", "--max-batch", "64", "--cors-origin", PAGE),
    )
    with c:
        yield c


@pytest.fixture(scope="module")
def plaintext():
    return ManifestModel(DEFAULT_MODEL).eval()  # the served model's own plaintext


def _plain_labels(model, images01: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        x = torch.from_numpy(images01.astype(np.float32)).reshape(-1, 1, 28, 28)
        return model(x).argmax(-1).numpy()


def _shares(images01: np.ndarray, frac_bits: int = 16):
    x = np.round(images01.reshape(-1, 1, 28, 28) * (1 << frac_bits)).astype(np.int64)
    return privdigit.share_image(x)


def _post_pair(cluster, bodies, timeout=30.0):
    with ThreadPoolExecutor(2) as ex:
        futures = [
            ex.submit(httpx.post, f"{url}/v1/predict", json=body, timeout=timeout)
            for url, body in zip(cluster.replica_urls, bodies, strict=True)
        ]
        return [f.result() for f in futures]


def _body(share, rid=None, **extra):
    return {
        "request_id": rid or secrets.token_urlsafe(18),
        "input": privdigit.encode_tensor(share),
        **extra,
    }


def _assert_error(response, status, code):
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"]["code"] == code and body["error"]["message"], body


# -- the happy path ------------------------------------------------------------------------------


def test_labels_through_the_client_equal_plaintext_on_200_images(cluster, mnist, plaintext):
    images, truth = mnist
    x = images[:200].astype(np.float64) / 255.0
    with privdigit.PrivDigitClient(cluster.replica_urls) as client:
        preds = client.predict_encoded(x)
    labels = np.array([p.label for p in preds])
    assert (labels == _plain_labels(plaintext, x)).all()
    assert (labels == truth[:200]).mean() >= 0.98
    assert len({p.request_id for p in preds}) >= 4  # chunked into several requests of <= 64


def test_async_client_single_images_concurrently(cluster, mnist, plaintext):
    import asyncio

    images, _ = mnist
    x = images[200:212].astype(np.float64) / 255.0

    async def run():
        async with privdigit.AsyncPrivDigitClient(cluster.replica_urls) as client:
            return await asyncio.gather(*(client.predict_encoded(x[i : i + 1]) for i in range(12)))

    labels = [preds[0].label for preds in asyncio.run(run())]
    assert labels == list(_plain_labels(plaintext, x))


def test_cli_on_png_files(cluster, mnist, plaintext, tmp_path):
    from PIL import Image

    images, _ = mnist
    files = []
    for i in range(6):  # enlarged, dark ink on white paper, as people photograph digits
        img = Image.fromarray(255 - images[300 + i]).resize((112, 112), Image.BICUBIC)
        files.append(tmp_path / f"digit{i}.png")
        img.convert("RGB").save(files[-1])
    (tmp_path / "broken.png").write_bytes(b"not an image at all")
    args = [str(f) for f in files] + [str(tmp_path / "broken.png")]
    out = subprocess.run(
        [
            sys.executable,
            "clients/predict.py",
            *args,
            "--json",
            "--replicas",
            ",".join(cluster.replica_urls),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1, out.stderr  # one file failed, the others were classified
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    by_file = {Path(r["file"]).name: r for r in rows}
    assert "error" in by_file["broken.png"] and "broken.png" in out.stderr
    pre = np.stack([privdigit.preprocess(f) for f in files])
    expected = _plain_labels(plaintext, pre)
    assert [by_file[f.name]["label"] for f in files] == list(expected)


def test_health_model_metrics(cluster):
    r0, r1 = cluster.replica_urls
    assert httpx.get(f"{r0}/v1/health").json() == {"status": "ok", "party": 0, "pair": "0"}
    info = [httpx.get(f"{u}/v1/model").json() for u in (r0, r1)]
    assert info[0]["model_version"] == info[1]["model_version"] == info[0]["serving_version"]
    assert [i["party"] for i in info] == [0, 1]
    assert info[0]["fixed_point"] == {"ring_bits": 64, "frac_bits": 16}
    default = protocols.get(protocols.DEFAULT)  # the registry's default, named and summarised
    assert (
        info[0]["comparison"]
        == info[1]["comparison"]
        == {
            "name": protocols.DEFAULT,
            "summary": default.summary,
            "label_sharing": "zero",
        }
    )
    metrics = httpx.get(f"{r0}/metrics").text
    for name in (
        "privdigit_requests_total",
        "privdigit_protocol_rounds_total",
        "privdigit_peer_bytes_sent_total",
        "privdigit_predict_seconds_bucket",
    ):
        assert name in metrics


def test_logs_never_hold_shares(cluster, mnist):
    images, _ = mnist
    s0, s1 = _shares(images[:1] / 255.0)
    bodies = [_body(s0), _body(s1)]
    bodies[1]["request_id"] = bodies[0]["request_id"]
    assert [r.status_code for r in _post_pair(cluster, bodies)] == [200, 200]
    logs = "".join(cluster.tail(r, 10_000) for r in ("replica0", "replica1", "dealer"))
    assert bodies[0]["request_id"] in logs
    assert (
        bodies[0]["input"]["data"][:64] not in logs and bodies[1]["input"]["data"][:64] not in logs
    )


# -- error paths: each answers its documented JSON error -----------------------------------------


def test_replayed_request_id_is_refused(cluster, mnist):
    s0, s1 = _shares(mnist[0][:1] / 255.0)
    rid = secrets.token_urlsafe(18)
    assert [r.status_code for r in _post_pair(cluster, [_body(s0, rid), _body(s1, rid)])] == [
        200
    ] * 2
    for r in _post_pair(cluster, [_body(s0, rid), _body(s1, rid)]):
        _assert_error(r, 409, "replayed_request")


def _gauge(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    line = next((ln for ln in text.splitlines() if ln.startswith(name + " ")), f"{name} 0")
    return float(line.split()[-1])  # a labelled counter has no line before its first count


def test_share_sent_to_one_replica_times_out_and_frees_everything(cluster, mnist):
    s0, _ = _shares(mnist[0][:1] / 255.0)
    started = time.monotonic()
    r = httpx.post(f"{cluster.replica_urls[0]}/v1/predict", json=_body(s0), timeout=30)
    _assert_error(r, 504, "peer_timeout")
    assert time.monotonic() - started < 3 + 2  # the configured --peer-timeout 3, not forever
    assert _gauge(cluster.replica_urls[0], "privdigit_inflight") == 0
    assert _gauge(cluster.replica_urls[0], "privdigit_peer_pending") == 0
    # replica 1 holds party 0's opening frame for a request it never got; it expires
    deadline = time.monotonic() + 4 * 3 + 5
    while _gauge(cluster.replica_urls[1], "privdigit_peer_pending") > 0:
        assert time.monotonic() < deadline, "frames for an orphan request were never freed"
        time.sleep(0.5)


def test_shares_of_different_sizes_are_refused_by_both(cluster, mnist):
    s0, _ = _shares(mnist[0][:1] / 255.0)
    _, s1 = _shares(mnist[0][:2] / 255.0)
    rid = secrets.token_urlsafe(18)
    for r in _post_pair(cluster, [_body(s0, rid), _body(s1, rid)]):
        _assert_error(r, 400, "share_mismatch")


@pytest.mark.parametrize(
    ("mutate", "status", "code"),
    [
        (lambda b: b["input"].update(data="!!!"), 400, "bad_tensor"),
        (lambda b: b["input"].update(data=b["input"]["data"][:-8]), 400, "bad_tensor"),
        (lambda b: b["input"].update(shape=[1, 1, 14, 56]), 400, "bad_tensor"),
        (lambda b: b["input"].update(dtype="float32"), 422, "invalid_request"),
        (lambda b: b["input"].update(shape="784"), 422, "invalid_request"),
        (lambda b: b.pop("request_id"), 422, "invalid_request"),
        (lambda b: b.update(request_id="short"), 422, "invalid_request"),
        (lambda b: b.update(request_id="x" * 20 + "/../"), 422, "invalid_request"),
        (lambda b: b.update(output="logits"), 422, "invalid_request"),
        (lambda b: b.update(output="scores"), 403, "scores_disabled"),
        (lambda b: b.update(model_version="not-a-version"), 409, "model_version_mismatch"),
        (lambda b: b.update(unexpected=1), 422, "invalid_request"),
    ],
)
def test_malformed_predict_bodies(cluster, mnist, mutate, status, code):
    s0, _ = _shares(mnist[0][:1] / 255.0)
    body = _body(s0)
    mutate(body)
    _assert_error(httpx.post(f"{cluster.replica_urls[0]}/v1/predict", json=body), status, code)


def test_batch_and_body_limits(cluster):
    url = f"{cluster.replica_urls[0]}/v1/predict"
    big = np.zeros((65, 1, 28, 28), dtype=np.int64)
    _assert_error(httpx.post(url, json=_body(big)), 413, "batch_too_large")
    huge = {"request_id": secrets.token_urlsafe(18), "pad": "x" * 2_000_000}
    _assert_error(httpx.post(url, json=huge), 413, "payload_too_large")
    _assert_error(httpx.post(url, content=b"{not json"), 422, "invalid_request")
    _assert_error(httpx.get(f"{cluster.replica_urls[0]}/v1/nothing"), 404, "not_found")
    _assert_error(httpx.get(url), 405, "method_not_allowed")


def test_reload_needs_the_replicas_own_admin_key_once_and_fresh(cluster):
    import time

    url = f"{cluster.replica_urls[0]}/v1/admin/reload"
    admin = cluster.key("replica-0", "admin.key")
    _assert_error(httpx.post(url), 401, "unauthenticated")
    _assert_error(httpx.post(url, headers={auth.AUTH_HEADER: "00" * 32}), 401, "unauthenticated")
    # the other replica's admin key, and this replica's other keys, are not its admin key
    for role, name in [("replica-1", "admin.key"), ("replica-0", "peer.key"),
                       ("replica-0", "dealer.key")]:  # fmt: skip
        tag = auth.admin_tag(cluster.key(role, name), 0)
        _assert_error(httpx.post(url, headers={auth.AUTH_HEADER: tag}), 401, "unauthenticated")
    tag = auth.admin_tag(admin, 0)
    r = httpx.post(url, headers={auth.AUTH_HEADER: tag})
    assert r.status_code == 200 and r.json()["changed"] is False
    # a recorded call is refused when replayed, and an old or future one is refused outright
    _assert_error(httpx.post(url, headers={auth.AUTH_HEADER: tag}), 401, "unauthenticated")
    for skew in (-auth.ADMIN_WINDOW_S - 5, auth.ADMIN_WINDOW_S + 5):
        old = auth.admin_tag(admin, 0, now=time.time() + skew)
        _assert_error(httpx.post(url, headers={auth.AUTH_HEADER: old}), 401, "unauthenticated")
    # a call made for party 1 does not work on party 0
    other = {auth.AUTH_HEADER: auth.admin_tag(admin, 1)}
    _assert_error(httpx.post(url, headers=other), 401, "unauthenticated")


def test_reload_cli_uses_the_replicas_folder(cluster, capsys):
    from service.__main__ import main

    folder = str(cluster.credentials / "replica-1")
    assert main(["reload", cluster.replica_urls[1], "--credentials", folder]) == 0
    assert '"changed": false' in capsys.readouterr().out
    wrong = str(cluster.credentials / "replica-0")
    assert main(["reload", cluster.replica_urls[1], "--credentials", wrong]) == 1
    assert "unauthenticated" in capsys.readouterr().out


def test_dealer_refuses_strangers_and_replays(cluster):
    body = json.dumps(
        {
            "request_id": new_run_id(),
            "party": 0,
            "plan": [{"kind": "and", "shapes": [[4]], "params": []}],
        }
    ).encode()
    url = f"{cluster.dealer_url}/v1/randomness"
    _assert_error(httpx.post(url, content=body), 401, "unauthenticated")
    wrong = auth.dealer_tag(b"w" * 32, 0, body)
    _assert_error(
        httpx.post(url, content=body, headers={auth.AUTH_HEADER: wrong}), 401, "unauthenticated"
    )
    good = {auth.AUTH_HEADER: auth.dealer_tag(cluster.key("replica-0", "dealer.key"), 0, body)}
    assert httpx.post(url, content=body, headers=good).status_code == 200
    _assert_error(httpx.post(url, content=body, headers=good), 409, "replayed_request")


def test_peer_stream_refuses_an_unauthenticated_party(cluster):
    import asyncio

    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    async def intrude() -> int | None:
        async with connect(f"ws://127.0.0.1:{cluster.ports[1]}/v1/peer") as ws:
            hello = json.loads(await ws.recv())
            assert hello["party"] == 1 and "nonce" in hello
            await ws.send(json.dumps({"party": 0, "nonce": "00", "versions": "[]", "mac": "ab"}))
            try:
                await ws.recv()
            except ConnectionClosed as exc:
                return exc.rcvd.code if exc.rcvd else None
        return None

    assert asyncio.run(intrude()) == 4401
    metrics = httpx.get(f"{cluster.replica_urls[1]}/metrics").text
    line = next(
        m
        for m in metrics.splitlines()
        if m.startswith('privdigit_auth_failures_total{what="peer"}')
    )
    assert float(line.split()[-1]) >= 1
    # the real peer stream is untouched: the replicas still serve
    assert httpx.get(f"{cluster.replica_urls[0]}/v1/ready").status_code == 200


# -- versions ------------------------------------------------------------------------------------


def _start_until_paired(c: Cluster, timeout: float = 60) -> None:
    """Start a cluster that will not become ready; return once the replicas' stream is up."""
    c.prepare()
    for role in ("dealer", "replica1", "replica0"):
        c.start_process(role)
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{c.replica_urls[0]}/v1/ready", timeout=2).json()["peer_connected"]:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, c.tails()
        time.sleep(0.2)


def test_readiness_refuses_mismatched_model_versions(tmp_path, mnist):
    from training.export import resplit

    d0, d1 = tmp_path / "m0", tmp_path / "m1"
    shutil.copytree(DEFAULT_MODEL, d0)
    shutil.copytree(DEFAULT_MODEL, d1)
    resplit(d1)  # same weights, another split: its shares do not pair with d0's
    c = Cluster(model=(d0, d1), ports=free_ports(3), log_dir=tmp_path / "logs")
    try:
        _start_until_paired(c)
        for url in c.replica_urls:
            r = httpx.get(f"{url}/v1/ready")
            assert r.status_code == 503 and not r.json()["ready"]
            assert "versions disagree" in " ".join(r.json()["reasons"])
        s0, _ = _shares(mnist[0][:1] / 255.0)
        rid = secrets.token_urlsafe(18)
        r = httpx.post(f"{c.replica_urls[0]}/v1/predict", json=_body(s0, rid))
        _assert_error(r, 503, "not_ready")
        with pytest.raises(privdigit.VersionMismatch):
            privdigit.PrivDigitClient(c.replica_urls).predict_encoded(mnist[0][:1] / 255.0)
    finally:
        c.stop()


def _keep_predicting(urls, x):
    """A client thread predicting `x` until `stop` is set: (stop, results, errors, thread);
    results are (labels, model version) per request, errors the client's exceptions."""
    import threading

    stop, results, errors = threading.Event(), [], []

    def loop() -> None:
        with privdigit.PrivDigitClient(urls) as client:
            while not stop.is_set():
                try:
                    preds = client.predict_encoded(x)
                    results.append(([p.label for p in preds], preds[0].model_version))
                except privdigit.PrivDigitError as exc:
                    errors.append(exc)

    worker = threading.Thread(target=loop)
    worker.start()
    return stop, results, errors, worker


def _wait_for(condition, what: str, timeout: float = 120.0) -> None:
    """Wait for a condition, not for time: generous, so that a loaded machine only slows it."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_model_refresh_switches_both_replicas_without_dropping_requests(tmp_path, mnist, plaintext):
    """Re-split the served model while a client keeps predicting: no request fails, both
    replicas end on the new version together; a half-written model is refused, old one kept."""

    from training.export import resplit

    d = tmp_path / "model"
    shutil.copytree(DEFAULT_MODEL, d)
    c = Cluster(
        model=d,
        ports=free_ports(3),
        log_dir=tmp_path / "logs",
        replica_args=("--reload-poll", "0.2"),
    )
    images, _ = mnist
    x = images[:4] / 255.0
    expected = list(_plain_labels(plaintext, x))
    with c:
        old = httpx.get(f"{c.replica_urls[0]}/v1/model").json()["model_version"]
        stop, results, errors, worker = _keep_predicting(c.replica_urls, x)
        _wait_for(lambda: results, "a first prediction on the old version")
        new = resplit(d)["model_version"]

        def both_serve_new() -> bool:
            nonlocal ready
            ready = [httpx.get(f"{u}/v1/ready").json() for u in c.replica_urls]
            return all(r["serving_version"] == new for r in ready)

        ready: list = []
        _wait_for(both_serve_new, "both replicas serving the new version")
        _wait_for(lambda: results[-1][1] == new, "a prediction on the new version")
        stop.set()
        worker.join(30)
        assert not errors, errors[:3]
        assert all(labels == expected for labels, _ in results)
        versions = [v for _, v in results]
        assert versions[0] == old and versions[-1] == new
        assert all(r["serving_version"] == new for r in ready), ready

        # a half-written share: refused, the good version keeps serving
        share = d / "share-0.safetensors"
        share.write_bytes(share.read_bytes()[:5000])
        _wait_for(
            lambda: httpx.get(f"{c.replica_urls[0]}/v1/ready").json()["last_reload_error"],
            "replica 0 refusing the half-written share",
        )
        ready0 = httpx.get(f"{c.replica_urls[0]}/v1/ready").json()
        assert ready0["ready"] and ready0["serving_version"] == new
        assert "commitment" in ready0["last_reload_error"] or ready0["last_reload_error"]
        with privdigit.PrivDigitClient(c.replica_urls) as client:
            assert [p.label for p in client.predict_encoded(x)] == expected


def test_scores_where_the_operator_enables_them(tmp_path, mnist, plaintext):
    images, _ = mnist
    x = images[:8] / 255.0
    with Cluster(ports=free_ports(3), log_dir=tmp_path, scores=True) as c:
        with privdigit.PrivDigitClient(c.replica_urls, scores=True) as client:
            preds = client.predict_encoded(x)
        with torch.no_grad():
            probs = torch.softmax(
                plaintext(torch.from_numpy(x.astype(np.float32)).reshape(-1, 1, 28, 28)), -1
            )
        assert [p.label for p in preds] == probs.argmax(-1).tolist()
        for p, row in zip(preds, probs, strict=True):
            assert abs(p.confidence - float(row.max())) < 1e-3
        assert httpx.get(f"{c.replica_urls[0]}/v1/ready").status_code == 200


def test_client_names_the_unreachable_replica(cluster, mnist):
    dead = f"http://127.0.0.1:{free_ports(1)[0]}"
    client = privdigit.PrivDigitClient([cluster.replica_urls[0], dead], timeout=5)
    with client, pytest.raises(privdigit.ReplicaUnreachable) as info:
        client.predict_encoded(mnist[0][:1] / 255.0)
    assert dead in str(info.value)


def test_peer_stream_reconnects_after_a_replica_restarts(tmp_path, mnist, plaintext):
    x = mnist[0][:2] / 255.0
    with Cluster(ports=free_ports(3), log_dir=tmp_path) as c:
        c.stop_process("replica1", kill=True)
        ready = httpx.get(f"{c.replica_urls[0]}/v1/ready")
        assert ready.status_code == 503 and not ready.json()["peer_connected"]
        client = privdigit.PrivDigitClient(c.replica_urls, timeout=5)
        with client, pytest.raises(privdigit.PrivDigitError):
            client.predict_encoded(x)
        c.start_process("replica1")
        c.wait_ready(60)  # party 0 redials by itself; nothing to do by hand
        with privdigit.PrivDigitClient(c.replica_urls) as client:
            assert [p.label for p in client.predict_encoded(x)] == list(_plain_labels(plaintext, x))


def test_tls_everywhere_and_client_api_keys(tmp_path, mnist, plaintext):
    """HTTPS for clients, WSS between replicas, HTTPS to the dealer, all from a dev CA; a
    client without the CA or without the API key is refused."""
    x = mnist[0][:3] / 255.0
    with Cluster(ports=free_ports(3), log_dir=tmp_path, tls=True, api_keys=("k-123",)) as c:
        assert all(u.startswith("https://") for u in c.replica_urls)
        with privdigit.PrivDigitClient(c.replica_urls, verify=c.verify, api_key="k-123") as cl:
            assert [p.label for p in cl.predict_encoded(x)] == list(_plain_labels(plaintext, x))
        with pytest.raises(privdigit.ReplicaUnreachable, match=r"(?i)certificate"):
            privdigit.PrivDigitClient(c.replica_urls, api_key="k-123").predict_encoded(x)
        with pytest.raises(privdigit.ServiceError) as info:
            privdigit.PrivDigitClient(c.replica_urls, verify=c.verify).predict_encoded(x)
        assert info.value.status == 401 and info.value.code == "unauthenticated"
        r = httpx.get(
            f"{c.replica_urls[0]}/v1/model", verify=c.verify, headers={"X-API-Key": "wrong"}
        )
        _assert_error(r, 401, "unauthenticated")
        metrics = httpx.get(f"{c.replica_urls[0]}/metrics", verify=c.verify).text
        assert 'privdigit_auth_failures_total{what="client"}' in metrics
        assert 'privdigit_runs_total{channel="lane"}' in metrics  # TLS lanes carried the rounds
        assert 'channel="stream"' not in metrics
        with pytest.raises(httpx.HTTPError):  # no plain HTTP on a TLS deployment
            httpx.get(f"http://127.0.0.1:{c.ports[0]}/v1/health", timeout=5)


def test_servers_refuse_plain_http_unless_allowed(monkeypatch, capsys):
    from service.__main__ import main

    monkeypatch.setenv("PRIVDIGIT_PARTY0_SECRET", "0" * 32)
    monkeypatch.setenv("PRIVDIGIT_PARTY1_SECRET", "1" * 32)
    code = main(["dealer", "--port", str(free_ports(1)[0])])
    assert code == 2 and "--allow-http" in capsys.readouterr().err


def test_cors_allows_exactly_the_configured_page_origin(cluster):
    url = f"{cluster.replica_urls[0]}/v1/predict"
    preflight = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type",
    }
    ok = httpx.options(url, headers={"Origin": PAGE, **preflight})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == PAGE
    other = httpx.options(url, headers={"Origin": "http://evil.example", **preflight})
    assert "access-control-allow-origin" not in other.headers
    with_id = {**preflight, "Access-Control-Request-Headers": "content-type,x-request-id"}
    ok = httpx.options(url, headers={"Origin": PAGE, **with_id})  # the page sends X-Request-Id
    assert ok.status_code == 200 and "x-request-id" in ok.headers["access-control-allow-headers"]


def test_concurrent_requests_are_batched_and_each_gets_its_own_label(cluster, mnist, plaintext):
    """16 clients at once: the replicas run them in shared protocol runs (batch_images > 1),
    yet each client reconstructs only its own image's label; a request whose other share never
    comes fails alone (504) without failing the batch it would have joined."""
    images, _ = mnist
    x = images[400:416] / 255.0
    expected = list(_plain_labels(plaintext, x))
    orphan_s0, _ = _shares(images[:1] / 255.0)

    def one(i):
        s0, s1 = _shares(x[i : i + 1])
        rid = secrets.token_urlsafe(18)
        return _post_pair(cluster, [_body(s0, rid), _body(s1, rid)])

    with ThreadPoolExecutor(17) as ex:
        orphan = ex.submit(
            httpx.post, f"{cluster.replica_urls[0]}/v1/predict", json=_body(orphan_s0), timeout=30
        )
        pairs = list(ex.map(one, range(16)))
    labels, batch_sizes = [], []
    for r0, r1 in pairs:
        assert r0.status_code == r1.status_code == 200, (r0.text[:200], r1.text[:200])
        a, b = r0.json(), r1.json()
        assert a["batch_images"] == b["batch_images"]
        batch_sizes.append(a["batch_images"])
        one_hot = privdigit.reconstruct_label(
            privdigit.decode_tensor(a["share"]), privdigit.decode_tensor(b["share"]), a["sharing"]
        )
        labels.append(int(one_hot[0]))
    assert labels == expected
    assert max(batch_sizes) > 1, batch_sizes
    _assert_error(orphan.result(), 504, "peer_timeout")


def _one_image_on_the_cnn(tmp_path, mnist, protocol: str):
    """The engine tests' centrally trained CNN (conv 16/16, fc 100, whose sizes the tests'
    byte counts use) deployed with `protocol`: 12 images must get the plaintext's labels; then
    the model info, and the rounds and peer bytes that one more image costs replica 0."""
    plaintext = ManifestModel(CNN_MODEL).eval()
    c = Cluster(
        model=CNN_MODEL,
        ports=free_ports(3),
        log_dir=tmp_path,
        replica_args=("--comparison", protocol),
    )
    images = mnist[0][:12] / 255.0
    rounds, peer_bytes = "privdigit_protocol_rounds_total", "privdigit_peer_bytes_sent_total"
    with c, privdigit.PrivDigitClient(c.replica_urls) as client:
        info = client.model_info()
        labels = [p.label for p in client.predict_encoded(images)]
        before = [_gauge(c.replica_urls[0], m) for m in (rounds, peer_bytes)]
        client.predict_encoded(images[:1])
        after = [_gauge(c.replica_urls[0], m) for m in (rounds, peer_bytes)]
    assert labels == _plain_labels(plaintext, images).tolist()
    return info, after[0] - before[0], after[1] - before[1]


def test_fss_deployment_classifies_like_plaintext_in_twelve_rounds(tmp_path, mnist):
    info, rounds, peer_bytes = _one_image_on_the_cnn(tmp_path, mnist, "fss")
    assert info["max_batch"] == 8  # fss default: ~7 MB of keys per image (12 images: 8 + 4)
    # 12 rounds (each ReLU: the DCF round, then the exact truncation's borrow gate); the weights
    # were opened by the first run, so only activations travel: input 784, conv1 out 2304,
    # conv2 in 2304 and out 256, fc1 in 256 and out 100, fc2 in 100, argmax 45 + 10 words; and
    # each ReLU's gate sends bit planes of 64-element words: the sign and each slice's lt and
    # (but the first's) eq: 6 planes where pooling makes the shift 18 bits (3 slices: the two
    # conv layers), 4 where it is 16 (2 slices: fc1)
    assert rounds == 12
    gates = 8 * (6 * (2304 // 64 + 256 // 64) + 4 * -(-100 // 64))
    words = 784 + 2304 + 2304 + 256 + 256 + 100 + 100 + 45 + 10
    assert peer_bytes == 8 * words + gates


def test_lut_deployment_classifies_like_plaintext_in_fifteen_rounds(tmp_path, mnist):
    _, rounds, peer_bytes = _one_image_on_the_cnn(tmp_path, mnist, "lut")
    assert rounds == 15
    # words of 8 bytes: the input's opening (784); the first ReLU on a2b: the carry tree
    # (279 x 36 words), its shift by 18 from the tree (`comparison._sign_and_shift`: the 3
    # positions above 4 slices, one more slice pair of 30 words; the g5 gate's 9 inputs; 2
    # injected bits, all as planes of 36 words), the select (2304 + 36); conv2 (2304); the
    # second ReLU on lut: c (256), the top (17 x 4), the select (256 + 4); fc1 (256); the
    # third ReLU on lut with fc2 in its select: c (100), the top (17 x 2), the select
    # (100 + 2); the argmax on lut: c (45), the top (11 x 1); lut's exact truncations'
    # low-borrow gates (`truncation`): 5 planes in the second ReLU (shift 18), 3 in the third
    first = 279 * 36 + 30 * 36 + 9 * 36 + 2 * 36 + 2304 + 36
    words = 784 + first + 2304 + 256 + 68 + 260 + 256 + 100 + 34
    low = 5 * 4 + 3 * 2
    assert peer_bytes == 8 * (words + 102 + 45 + 11 + low)


def test_replicas_running_different_protocols_refuse_to_pair(tmp_path, mnist):
    c = Cluster(
        ports=free_ports(3), log_dir=tmp_path, role_args={"replica1": ("--comparison", "fss")}
    )
    try:
        _start_until_paired(c)
        for url in c.replica_urls:
            r = httpx.get(f"{url}/v1/ready")
            assert r.status_code == 503
            assert "comparison protocols differ" in " ".join(r.json()["reasons"])
        s0, _ = _shares(mnist[0][:1] / 255.0)
        r = httpx.post(f"{c.replica_urls[0]}/v1/predict", json=_body(s0, secrets.token_urlsafe(18)))
        _assert_error(r, 503, "not_ready")
    finally:
        c.stop()


def test_single_image_runs_use_prefetched_material(cluster, mnist, plaintext):
    hits = 'privdigit_prefetch_total{result="hit"}'
    time.sleep(1.5)  # party 0 tops the pool up every 0.5 s; both replicas fetch in background
    before = [_gauge(url, hits) for url in cluster.replica_urls]
    images = mnist[0][:3] / 255.0
    with privdigit.PrivDigitClient(cluster.replica_urls) as client:
        labels = [client.predict_encoded(images[i : i + 1])[0].label for i in range(3)]
    assert labels == _plain_labels(plaintext, images).tolist()
    assert all(_gauge(u, hits) >= b + 3 for u, b in zip(cluster.replica_urls, before, strict=True))


def test_rounds_run_on_lanes_or_with_no_lanes_on_the_peer_stream(
    cluster, tmp_path, mnist, plaintext
):
    lane, stream = 'privdigit_runs_total{channel="lane"}', 'privdigit_runs_total{channel="stream"}'
    images = mnist[0][:2] / 255.0
    with privdigit.PrivDigitClient(cluster.replica_urls) as client:
        assert [p.label for p in client.predict_encoded(images)] == list(
            _plain_labels(plaintext, images)
        )
    assert all(_gauge(u, lane) >= 1 for u in cluster.replica_urls)
    with Cluster(ports=free_ports(3), log_dir=tmp_path, replica_args=("--no-lanes",)) as c:
        with privdigit.PrivDigitClient(c.replica_urls) as client:
            assert [p.label for p in client.predict_encoded(images)] == list(
                _plain_labels(plaintext, images)
            )
        assert all(_gauge(u, stream) >= 1 and _gauge(u, lane) == 0 for u in c.replica_urls)


def test_batches_of_the_usual_size_run_on_material_fetched_ahead(cluster, mnist, plaintext):
    """Party 0 keeps material ready for the batch size it last saw queued (here 4 images), so
    the next such batch does not wait for the dealer."""
    hits = 'privdigit_prefetch_total{result="hit"}'
    images = mnist[0][:4] / 255.0
    with privdigit.PrivDigitClient(cluster.replica_urls) as client:
        client.predict_encoded(images)  # shows party 0 a queue of 4 images
        before = [_gauge(url, hits) for url in cluster.replica_urls]
        for _ in range(3):
            labels = [p.label for p in client.predict_encoded(images)]
            assert labels == _plain_labels(plaintext, images).tolist()
    assert all(_gauge(u, hits) >= b + 2 for u, b in zip(cluster.replica_urls, before, strict=True))


def test_retraining_into_the_served_directory_switches_the_service_up(small_mnist, tmp_path, mnist):
    """The refresh loop through the real commands: `python -m service up --model DIR` serves,
    `python -m training --out DIR --force` retrains into DIR, and a client that keeps asking sees
    the new version with zero failed requests and the new model's labels."""

    from training.evaluate import plaintext_labels

    d = tmp_path / "model"
    env = {**os.environ, "PRIVDIGIT_DATA_DIR": str(small_mnist)}
    train = [sys.executable, "-m", "training", "--rounds", "1", "--clients", "4", "--fraction",
             "1", "--local-epochs", "1", "--out", str(d), "--force", "--json"]  # fmt: skip
    first = subprocess.run([*train, "--seed", "1"], env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    images, _ = mnist
    x = images[:8]
    old_labels = list(plaintext_labels(d, x))
    ports = free_ports(3)
    up = subprocess.Popen(
        [sys.executable, "-m", "service", "up", "--model", str(d), "--no-web",
         "--ports", ",".join(map(str, ports)), "--log-dir", str(tmp_path / "logs")],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    urls = [f"http://127.0.0.1:{ports[0]}", f"http://127.0.0.1:{ports[1]}"]
    try:
        banner = []
        for line in up.stdout:  # type: ignore[union-attr]
            banner.append(line)
            if line.startswith("ready."):
                break
        assert any("made by `python -m training" in b for b in banner), "".join(banner)
        old = httpx.get(f"{urls[0]}/v1/model").json()
        assert old["provenance"]["rounds"] == 1
        stop, results, errors, worker = _keep_predicting(urls, x)
        try:
            _wait_for(lambda: results, "a first prediction")
            again = subprocess.run([*train, "--seed", "2"], env=env, capture_output=True, text=True)
            assert again.returncode == 0, again.stderr
            new = json.loads(again.stdout.strip().splitlines()[-1])["model_version"]
            _wait_for(lambda: results[-1][1] == new, "the client seeing the new version")
        finally:
            stop.set()
            worker.join(60)
        assert not errors, errors[:3]
        new_labels = list(plaintext_labels(d, x))
        assert {v for _, v in results} == {old["model_version"], new}
        for labels, version in results:
            assert labels == (new_labels if version == new else old_labels), version
        assert httpx.get(f"{urls[1]}/v1/model").json()["model_version"] == new
    finally:
        up.terminate()
        up.wait(60)
