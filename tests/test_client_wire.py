"""Client wire format, sharing and protocol (clients/privdigit/) against fake replicas; CLI.

The fake replicas below cheat on purpose: they pool both shares to reconstruct the image, which
real replicas never do, so the client's side of the protocol can be tested without a cluster.
Their "model" answers label = round(total ink) mod 10.
"""

from __future__ import annotations

import ast
import asyncio
import base64
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image, ImageDraw

import clients.predict as cli
import clients.privdigit as pd
from clients.privdigit import (
    LABEL_PRIME,
    AsyncPrivDigitClient,
    BadResponse,
    ImageError,
    PrivDigitClient,
    PrivDigitError,
    ReplicaUnreachable,
    ServiceError,
    VersionMismatch,
    decode_tensor,
    encode_fixed,
    encode_tensor,
    reconstruct_label,
    reconstruct_scores,
    share_image,
)

ROOT = Path(__file__).resolve().parents[1]
URLS = ("http://r0.test", "http://r1.test")
INT64 = np.iinfo(np.int64)

# -- tensors on the wire ---------------------------------------------------------------------


@given(hnp.arrays(np.int64, hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=5)))
def test_tensor_round_trip(arr: np.ndarray) -> None:
    obj = encode_tensor(arr)
    assert obj["dtype"] == "int64" and obj["shape"] == list(arr.shape)
    back = decode_tensor(json.loads(json.dumps(obj)))
    assert back.dtype == np.int64 and back.shape == arr.shape and np.array_equal(back, arr)


def test_tensor_encoding_is_little_endian_standard_base64() -> None:
    obj = encode_tensor(np.array([[1, -1], [INT64.min, INT64.max]]))
    raw = (1).to_bytes(8, "little") + (-1).to_bytes(8, "little", signed=True)
    raw += INT64.min.to_bytes(8, "little", signed=True) + INT64.max.to_bytes(8, "little")
    assert obj == {"dtype": "int64", "shape": [2, 2], "data": base64.b64encode(raw).decode()}
    assert encode_tensor(np.array([1]))["data"] == "AQAAAAAAAAA="
    big_endian = np.array([5, -7], dtype=">i8")
    assert np.array_equal(decode_tensor(encode_tensor(big_endian)), [5, -7])
    wrapped = np.array([2**64 - 1], dtype=np.uint64)
    assert np.array_equal(decode_tensor(encode_tensor(wrapped)), [-1])
    assert decode_tensor(encode_tensor(np.zeros((3, 0), np.int64))).shape == (3, 0)
    with pytest.raises(TypeError):
        encode_tensor(np.array([0.5]))


GOOD = encode_tensor(np.arange(6).reshape(2, 3))


@pytest.mark.parametrize(
    "obj",
    [
        None,
        [1, 2],
        {**GOOD, "dtype": "int32"},
        {**GOOD, "dtype": "float64"},
        {k: v for k, v in GOOD.items() if k != "dtype"},
        {**GOOD, "shape": "2,3"},
        {**GOOD, "shape": [2, -3]},
        {**GOOD, "shape": [2, 3.0]},
        {**GOOD, "shape": [True, 6]},
        {**GOOD, "shape": [3, 3]},
        {**GOOD, "shape": [2, 3, 1, 0]},
        {**GOOD, "data": 12},
        {**GOOD, "data": GOOD["data"] + "!"},
        {**GOOD, "data": GOOD["data"].rstrip("=")[:-1]},
        {**GOOD, "data": base64.urlsafe_b64encode(b"\xfb\xff" * 24).decode()},
        {**GOOD, "data": "é" * 64},
        {**GOOD, "data": GOOD["data"][:-4]},
    ],
)
def test_decode_rejects_malformed_tensors(obj: Any) -> None:
    with pytest.raises(BadResponse):
        decode_tensor(obj)


# -- fixed point and sharing -----------------------------------------------------------------


def test_encode_fixed() -> None:
    x = np.array([0.0, 1.0, 0.5, 1 / 255, -2.25])
    assert np.array_equal(encode_fixed(x, 16), [0, 65536, 32768, 257, -147456])
    assert encode_fixed(x, 16).dtype == np.int64
    with pytest.raises(ValueError):
        encode_fixed(np.array([np.nan]), 16)
    with pytest.raises(ValueError):
        encode_fixed(np.array([2.0**50]), 16)


@given(hnp.arrays(np.int64, hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=6)))
def test_shares_add_up_exactly(x: np.ndarray) -> None:
    s0, s1 = share_image(x)
    assert s0.dtype == s1.dtype == np.int64 and s0.shape == s1.shape == x.shape
    total = (s0.view(np.uint64) + s1.view(np.uint64)).view(np.int64)
    assert np.array_equal(total, x)


def test_shares_are_fresh_and_come_from_os_urandom(monkeypatch: pytest.MonkeyPatch) -> None:
    x = np.full((4, 1, 28, 28), 65536, np.int64)
    np.random.seed(0)
    a0, _ = share_image(x)
    np.random.seed(0)
    b0, _ = share_image(x)
    assert not np.array_equal(a0, b0), "shares must not depend on numpy's global generator"
    bits = np.unpackbits(a0.view(np.uint8))
    assert abs(bits.mean() - 0.5) < 0.02
    calls = []

    def fake_urandom(n: int) -> bytes:
        calls.append(n)
        return b"\x00" * n

    monkeypatch.setattr(pd.os, "urandom", fake_urandom)
    s0, s1 = share_image(x)
    assert calls == [8 * x.size] and not s0.any() and np.array_equal(s1, x)


def test_share_extremes_without_warnings() -> None:
    x = np.array([INT64.min, INT64.max, -1, 0, 1], np.int64)
    with np.errstate(all="raise"):
        for _ in range(20):
            s0, s1 = share_image(x)
            assert np.array_equal(reconstruct_scores(s0[None], s1[None], 0)[0], x.astype(float))
    with pytest.raises(TypeError):
        share_image(np.array([0.5]))


def xor_share(onehot: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """XOR shares of an int64 array, masked by fresh random words."""
    mask = np.frombuffer(os.urandom(8 * onehot.size), "<i8").reshape(onehot.shape)
    return mask, onehot ^ mask


def zero_share(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Additive shares mod LABEL_PRIME of values in [0, p)."""
    mask = np.frombuffer(os.urandom(8 * values.size), "<u8").reshape(values.shape) % LABEL_PRIME
    mask = mask.astype(np.int64)
    return mask, (values - mask) % LABEL_PRIME


def zero_test(labels: list[int]) -> np.ndarray:
    """What the a2b replicas' label shares add up to: 0 at the label, nonzero elsewhere."""
    y = np.random.default_rng().integers(1, LABEL_PRIME, (len(labels), 10))
    y[np.arange(len(labels)), labels] = 0
    return y


@given(st.lists(st.integers(0, 9), min_size=0, max_size=20))
def test_reconstruct_label(labels: list[int]) -> None:
    onehot = np.zeros((len(labels), 10), np.int64)
    onehot[np.arange(len(labels)), labels] = 1
    out = reconstruct_label(*xor_share(onehot), "xor")
    assert out.dtype == np.int64 and out.tolist() == labels
    out = reconstruct_label(*zero_share(zero_test(labels)), "zero")
    assert out.dtype == np.int64 and out.tolist() == labels


@pytest.mark.parametrize(
    "row",
    [
        [0] * 10,
        [1, 1] + [0] * 8,
        [2] + [0] * 9,
        [-1] + [0] * 9,
        [1, 0, 0, 0, 0, 0, 0, 0, 0, INT64.min],
    ],
    ids=["zeros", "two ones", "two", "minus one", "high bit"],
)
def test_reconstruct_label_rejects_garbage(row: list[int]) -> None:
    onehot = np.array([[0, 0, 1, 0, 0, 0, 0, 0, 0, 0], row], np.int64)
    with pytest.raises(BadResponse, match=r"row 1 .* no single label"):
        reconstruct_label(*xor_share(onehot), "xor")


@pytest.mark.parametrize("zeros", [0, 2, 10])
def test_reconstruct_label_rejects_rows_without_a_single_zero(zeros: int) -> None:
    y = zero_test([3, 4])
    y[1] = np.arange(1, 11)
    y[1, :zeros] = 0
    with pytest.raises(BadResponse, match=r"row 1 .* no single label"):
        reconstruct_label(*zero_share(y), "zero")


@pytest.mark.parametrize("bad", [-1, LABEL_PRIME, INT64.max])
def test_reconstruct_label_rejects_zero_shares_outside_the_field(bad: int) -> None:
    s0, s1 = zero_share(zero_test([3]))
    s0[0, 5] = bad
    with pytest.raises(BadResponse, match="must lie in"):
        reconstruct_label(s0, s1, "zero")
    with pytest.raises(BadResponse, match="unknown label sharing"):
        reconstruct_label(s0, s1, "additive")


def test_reconstruct_rejects_mismatched_shares() -> None:
    with pytest.raises(BadResponse):
        reconstruct_label(np.zeros((2, 10), np.int64), np.zeros((3, 10), np.int64))
    with pytest.raises(BadResponse):
        reconstruct_scores(np.zeros(10, np.int64), np.zeros(10, np.int64), 16)
    with pytest.raises(BadResponse):
        reconstruct_scores(np.zeros((1, 10)), np.zeros((1, 10)), 16)


@given(
    hnp.arrays(
        np.float64,
        st.tuples(st.integers(0, 5), st.just(10)),
        elements=st.floats(-1e6, 1e6, allow_nan=False),
    ),
    st.integers(0, 24),
)
def test_reconstruct_scores_decodes_signed_fixed_point(logits: np.ndarray, frac_bits: int) -> None:
    encoded = encode_fixed(logits, frac_bits)
    s0, s1 = share_image(encoded)
    decoded = reconstruct_scores(s0, s1, frac_bits)
    assert decoded.dtype == np.float64
    assert np.array_equal(decoded, encoded / 2.0**frac_bits)
    assert np.allclose(decoded, logits, atol=2.0 ** -(frac_bits + 1) + 1e-9)


# -- fake replicas ---------------------------------------------------------------------------


def error(status: int, code: str, message: str = "nope") -> httpx.Response:
    """A replica's JSON error answer."""
    return httpx.Response(status, json={"error": {"code": code, "message": message}})


class FakeCluster:
    """Two fake replicas behind one `httpx.MockTransport`, told apart by host (r0 / r1)."""

    REQUEST_ID = re.compile(r"^[A-Za-z0-9_-]{16,128}$")

    def __init__(
        self,
        *,
        versions: tuple[str, str] = ("v1", "v1"),
        parties: tuple[int, int] = (0, 1),
        frac_bits: tuple[int, int] = (16, 16),
        max_batch: int = 64,
    ) -> None:
        self.versions = list(versions)  # newest version each replica holds (/v1/model)
        self.held: list[set[str]] | None = None  # versions each accepts, if not just `versions`
        self.serving: list[str | None] | None = None  # serving_version, if not the default
        self.parties = parties
        self.frac_bits = frac_bits
        self.max_batch = max_batch
        self.cond = threading.Condition()
        self.inputs: dict[str, dict[int, np.ndarray]] = {}
        self.outputs: dict[str, list[dict[str, Any]]] = {}
        self.posts: list[tuple[int, dict[str, Any]]] = []
        self.model_gets = [0, 0]
        self.fail: dict[int, httpx.Response] = {}  # next predict answer of a replica
        self.tamper: Callable[[int, dict[str, Any]], dict[str, Any]] | None = None
        self.label_sharing = "zero"  # as the default protocol (a2b) answers; fss: "xor"
        self.down: set[int] = set()

    def serving_version(self, i: int) -> str | None:
        """What replica i calls the newest version both hold: by default, the common newest."""
        if self.serving is not None:
            return self.serving[i]
        return self.versions[0] if self.versions[0] == self.versions[1] else None

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def async_transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.ahandle)

    def _model(self, i: int) -> httpx.Response:
        self.model_gets[i] += 1
        return httpx.Response(
            200,
            json={
                "party": self.parties[i],
                "model_version": self.versions[i],
                "serving_version": self.serving_version(i),
                "created": None,
                "architecture": {"layers": [], "input_shape": [1, 28, 28], "classes": 10},
                "fixed_point": {"ring_bits": 64, "frac_bits": self.frac_bits[i]},
                "shares": [],
                "scores_enabled": True,
                "max_batch": self.max_batch,
            },
        )

    def _receive(self, request: httpx.Request) -> tuple[int, httpx.Response | dict[str, Any]]:
        """Route a request; a final answer, or the checked predict body to pair with the peer's."""
        i = URLS.index(f"http://{request.url.host}")
        if i in self.down:
            raise httpx.ConnectError("[Errno 111] Connection refused", request=request)
        if request.url.path == "/v1/model" and request.method == "GET":
            return i, self._model(i)
        assert request.url.path == "/v1/predict" and request.method == "POST"
        body = json.loads(request.content)
        self.posts.append((i, body))
        assert request.headers.get("X-Request-Id") == body.get("request_id")  # for L7 balancers
        if i in self.fail:
            return i, self.fail.pop(i)
        assert set(body) == {"request_id", "input", "output", "model_version"}
        assert self.REQUEST_ID.match(body["request_id"])
        if body["model_version"] not in (self.held or [{v} for v in self.versions])[i]:
            return i, error(409, "model_version_mismatch", "not held here")
        x = decode_tensor(body["input"])
        assert x.shape[1:] == (1, 28, 28) and len(x) <= self.max_batch
        with self.cond:
            self.inputs.setdefault(body["request_id"], {})[i] = x
            self.cond.notify_all()
        return i, body

    def _answer(self, i: int, body: dict[str, Any]) -> httpx.Response:
        """Party i's share of the result, computed (once per request) from both input shares."""
        rid = body["request_id"]
        with self.cond:
            if rid not in self.outputs:
                self.outputs[rid] = self._compute(body)
            answer = dict(self.outputs[rid][i])
        if self.tamper is not None:
            answer = self.tamper(i, answer)
        return httpx.Response(200, json=answer)

    def _compute(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        shares = self.inputs[body["request_id"]]
        x = (shares[0].view(np.uint64) + shares[1].view(np.uint64)).view(np.int64)
        ink = x.astype(np.float64).sum(axis=(1, 2, 3)) / 2.0 ** self.frac_bits[0]
        labels = np.rint(ink).astype(np.int64) % 10
        n = len(labels)
        if body["output"] == "label" and self.label_sharing == "zero":
            s0, s1 = zero_share(zero_test(labels.tolist()))
            sharing = "zero"
        elif body["output"] == "label":
            onehot = np.zeros((n, 10), np.int64)
            onehot[np.arange(n), labels] = 1
            s0, s1 = xor_share(onehot)
            sharing = "xor"
        else:
            logits = np.full((n, 10), -1.0)
            logits[np.arange(n), labels] = 4.0
            s0, s1 = share_image(encode_fixed(logits, self.frac_bits[0]))
            sharing = "additive"
        return [
            {
                "request_id": body["request_id"],
                "party": self.parties[p],
                "model_version": body["model_version"],
                "serving_version": self.serving_version(p),
                "output": body["output"],
                "sharing": sharing,
                "frac_bits": self.frac_bits[p],
                "share": encode_tensor(s),
                "rounds": 0,
                "peer_bytes": 0,
            }
            for p, s in enumerate((s0, s1))
        ]

    def handle(self, request: httpx.Request) -> httpx.Response:
        i, got = self._receive(request)
        if isinstance(got, httpx.Response):
            return got
        with self.cond:
            paired = self.cond.wait_for(lambda: len(self.inputs[got["request_id"]]) == 2, 5)
        return self._answer(i, got) if paired else error(504, "peer_timeout")

    async def ahandle(self, request: httpx.Request) -> httpx.Response:
        i, got = self._receive(request)
        if isinstance(got, httpx.Response):
            return got
        for _ in range(5000):
            if len(self.inputs[got["request_id"]]) == 2:
                return self._answer(i, got)
            await asyncio.sleep(0.001)
        return error(504, "peer_timeout")


def images_with_ink(counts: list[int]) -> np.ndarray:
    """(N, 28, 28) float images whose total ink is counts[i] (so the fake labels counts[i] % 10)."""
    x = np.zeros((len(counts), 28, 28))
    for i, k in enumerate(counts):
        x[i].reshape(-1)[:k] = 1.0
    return x


def client(cluster: FakeCluster, **kw: Any) -> PrivDigitClient:
    return PrivDigitClient(URLS, transport=cluster.transport(), **kw)


# -- the sync client -------------------------------------------------------------------------


def test_predict_labels() -> None:
    cluster = FakeCluster()
    with client(cluster) as c:
        preds = c.predict_encoded(images_with_ink([3, 17, 0, 9]))
    assert [p.label for p in preds] == [3, 7, 0, 9]
    assert all(p.confidence is None and p.model_version == "v1" for p in preds)
    assert len({p.request_id for p in preds}) == 1 and all(p.latency_ms > 0 for p in preds)
    (i0, b0), (i1, b1) = sorted(cluster.posts, key=lambda t: t[0])
    assert (i0, i1) == (0, 1) and b0["request_id"] == b1["request_id"] == preds[0].request_id
    assert b0["output"] == "label" and b0["model_version"] == b1["model_version"] == "v1"
    s0, s1 = decode_tensor(b0["input"]), decode_tensor(b1["input"])
    assert s0.shape == (4, 1, 28, 28)
    x = encode_fixed(images_with_ink([3, 17, 0, 9])[:, None], 16)
    assert not np.array_equal(s0, x) and not np.array_equal(s1, x)
    assert np.array_equal((s0.view(np.uint64) + s1.view(np.uint64)).view(np.int64), x)


def test_predict_labels_from_replicas_that_answer_xor_shares() -> None:
    """Replicas running fss (or hybrid) answer the label as XOR shares of a one-hot vector."""
    cluster = FakeCluster()
    cluster.label_sharing = "xor"
    with client(cluster) as c:
        preds = c.predict_encoded(images_with_ink([5, 12]))
    assert [p.label for p in preds] == [5, 2]
    assert {a["sharing"] for answers in cluster.outputs.values() for a in answers} == {"xor"}


def test_predict_scores_gives_confidence() -> None:
    with client(FakeCluster(), scores=True) as c:
        preds = c.predict_encoded(images_with_ink([5, 2]))
    assert [p.label for p in preds] == [5, 2]
    expected = np.exp(4.0) / (np.exp(4.0) + 9 * np.exp(-1.0))
    assert all(p.confidence == pytest.approx(expected) for p in preds)


def test_input_shapes_and_types() -> None:
    cluster = FakeCluster()
    with client(cluster) as c:
        assert c.predict_encoded(np.zeros((0, 28, 28))) == []
        assert cluster.posts == []
        assert c.predict_encoded(images_with_ink([4])[:, None])[0].label == 4
        assert c.predict_encoded(images_with_ink([6])[0])[0].label == 6
        assert c.predict_encoded((images_with_ink([8]) * 255).astype(np.uint8))[0].label == 8
        for bad in (np.zeros((2, 27, 28)), np.full((1, 28, 28), 1.5), np.zeros((1, 3, 28, 28))):
            with pytest.raises(ImageError):
                c.predict_encoded(bad)


def test_batches_are_chunked_by_max_batch() -> None:
    cluster = FakeCluster(max_batch=3)
    counts = [1, 2, 3, 4, 5, 6, 7]
    with client(cluster) as c:
        preds = c.predict_encoded(images_with_ink(counts))
    assert [p.label for p in preds] == counts
    assert len(cluster.posts) == 6 and len({p.request_id for p in preds}) == 3
    assert [len(decode_tensor(b["input"])) for i, b in cluster.posts if i == 0] == [3, 3, 1]


def test_predict_and_predict_batch_preprocess_images() -> None:
    img = Image.new("L", (120, 160), 255)
    ImageDraw.Draw(img).line([(30, 30), (90, 30), (50, 140)], 0, 12)
    cluster = FakeCluster()
    with client(cluster) as c:
        single = c.predict(img)
        batch = c.predict_batch([img, np.asarray(img), img.convert("RGB")])
        with pytest.raises(ImageError, match="image 1: no digit found"):
            c.predict_batch([img, Image.new("L", (50, 50), 255)])
        with pytest.raises(TypeError):
            c.predict_batch(img)
    ink = pd.preprocess(img).sum()
    assert single.label == round(float(ink)) % 10
    assert len(batch) == 3 and len({p.request_id for p in batch}) == 1


def test_model_info_is_cached_and_from_party_0() -> None:
    cluster = FakeCluster()
    with client(cluster) as c:
        info = c.model_info()
        c.predict_encoded(images_with_ink([1]))
        c.predict_encoded(images_with_ink([2]))
        assert info["party"] == 0 and info["model_version"] == "v1"
        assert cluster.model_gets == [1, 1]
        c.model_info(refresh=True)
        assert cluster.model_gets == [2, 2]


@pytest.mark.parametrize(
    ("kw", "exc", "match"),
    [
        ({"parties": (1, 0)}, PrivDigitError, "swapped.*party 1.*--replicas http://r1.test,http"),
        ({"parties": (0, 0)}, PrivDigitError, "both replicas say they are party 0"),
        ({"versions": ("v1", "v2")}, VersionMismatch, "different models.*v1.*v2"),
        ({"frac_bits": (16, 12)}, VersionMismatch, "frac_bits 16 and 12"),
    ],
)
def test_model_checks(kw: dict[str, Any], exc: type[Exception], match: str) -> None:
    cluster = FakeCluster(**kw)
    with client(cluster) as c, pytest.raises(exc, match=match):
        c.predict_encoded(images_with_ink([1]))
    assert cluster.posts == []


def test_model_version_mismatch_refreshes_once_and_retries() -> None:
    cluster = FakeCluster()
    with client(cluster) as c:
        c.model_info()
        cluster.versions = ["v2", "v2"]  # both replicas reloaded behind the client's back
        preds = c.predict_encoded(images_with_ink([7]))
        assert preds[0].label == 7 and preds[0].model_version == "v2"
        assert cluster.model_gets == [2, 2]
        first, second = {b["request_id"] for _, b in cluster.posts}
        assert first != second
        # /v1/model keeps saying v3 but the replicas hold v4: one retry, then the error.
        cluster.versions, cluster.held = ["v3", "v3"], [{"v4"}, {"v4"}]
        with pytest.raises(ServiceError) as info:
            c.predict_encoded(images_with_ink([7]))
        assert info.value.code == "model_version_mismatch" and info.value.status == 409


def test_reload_window_uses_party_0_serving_version() -> None:
    """Party 0 already loaded v2, party 1 not yet: ask for v1, which both still hold."""
    cluster = FakeCluster(versions=("v2", "v1"))
    cluster.serving = ["v1", "v1"]
    cluster.held = [{"v1", "v2"}, {"v1"}]
    with client(cluster) as c:
        assert c.predict_encoded(images_with_ink([3]))[0].model_version == "v1"
        # no serving version in common and different newest versions: a real mismatch
        cluster.serving = [None, None]
        with pytest.raises(VersionMismatch, match="none in common"):
            c.model_info(refresh=True)


def test_answers_announcing_a_new_version_refresh_the_cache() -> None:
    cluster = FakeCluster()
    with client(cluster) as c:
        assert c.predict_encoded(images_with_ink([1]))[0].model_version == "v1"
        # Both replicas finish loading v2 and keep v1 for a while: answers say v2 is served.
        cluster.versions, cluster.held = ["v2", "v2"], [{"v1", "v2"}, {"v1", "v2"}]
        assert c.predict_encoded(images_with_ink([2]))[0].model_version == "v1"
        assert c.predict_encoded(images_with_ink([3]))[0].model_version == "v2"
        assert cluster.model_gets == [2, 2]
        assert [b["model_version"] for i, b in cluster.posts if i == 0] == ["v1", "v1", "v2"]


def test_service_errors_are_surfaced() -> None:
    cluster = FakeCluster()
    with client(cluster) as c:
        cluster.fail = {1: error(503, "not_ready", "peer\nnot connected")}
        cluster.fail[0] = error(504, "peer_timeout")
        with pytest.raises(ServiceError) as info:
            c.predict_encoded(images_with_ink([1]))
        err = info.value
        assert (err.replica, err.status, err.code) == (URLS[1], 503, "not_ready")
        assert err.message == "peer not connected" and "not_ready" in str(err)
        cluster.fail = {0: error(413, "batch_too_large"), 1: error(400, "bad_tensor")}
        with pytest.raises(ServiceError) as info:
            c.predict_encoded(images_with_ink([1]))
        assert info.value.replica == URLS[0] and info.value.code == "batch_too_large"
        cluster.fail = {0: error(403, "scores_disabled"), 1: error(403, "scores_disabled")}
        with pytest.raises(ServiceError, match="scores_disabled"):
            c.predict_encoded(images_with_ink([1]))


@pytest.mark.parametrize(
    "response",
    [
        httpx.Response(502, text="<html>Bad Gateway</html>"),
        httpx.Response(500, json={"detail": "boom"}),
        httpx.Response(500, json={"error": {"code": 5, "message": "x"}}),
        httpx.Response(200, text="not json"),
        httpx.Response(200, json=[1, 2]),
    ],
    ids=["html", "no error key", "code not str", "200 not json", "200 list"],
)
def test_malformed_answers_are_bad_responses(response: httpx.Response) -> None:
    cluster = FakeCluster()
    cluster.fail = {0: response, 1: error(504, "peer_timeout")}
    with client(cluster) as c, pytest.raises(BadResponse):
        c.predict_encoded(images_with_ink([1]))


def _tampered(key: str, value: Any) -> Callable[[int, dict[str, Any]], dict[str, Any]]:
    return lambda i, answer: {**answer, key: value} if i == 1 else answer


@pytest.mark.parametrize(
    ("key", "value", "exc"),
    [
        ("request_id", "A" * 24, BadResponse),
        ("party", 0, BadResponse),
        ("output", "scores", BadResponse),
        ("sharing", "additive", BadResponse),
        ("sharing", "xor", BadResponse),  # the replicas must agree
        ("frac_bits", "16", BadResponse),
        ("model_version", "v0", VersionMismatch),
        ("share", encode_tensor(np.zeros((1, 9), np.int64)), BadResponse),
        ("share", encode_tensor(np.zeros((2, 10), np.int64)), BadResponse),
        ("share", {"dtype": "int64", "shape": [1, 10], "data": "??"}, BadResponse),
        ("share", encode_tensor(np.full((1, 10), 12345)), BadResponse),
    ],
)
def test_inconsistent_answers_are_rejected(key: str, value: Any, exc: type[Exception]) -> None:
    cluster = FakeCluster()
    cluster.tamper = _tampered(key, value)
    with client(cluster) as c, pytest.raises(exc):
        c.predict_encoded(images_with_ink([1]))


def test_unreachable_replica() -> None:
    cluster = FakeCluster()
    cluster.down = {1}
    with client(cluster) as c, pytest.raises(ReplicaUnreachable) as info:
        c.model_info()
    assert info.value.replica == URLS[1]
    assert "r1.test" in str(info.value) and "python -m service up" in str(info.value)

    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    slow_client = PrivDigitClient(URLS, transport=httpx.MockTransport(slow), timeout=2.5)
    with slow_client as c, pytest.raises(ReplicaUnreachable, match=r"r0\.test.*within 2\.5 s"):
        c.model_info()


def test_replica_urls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(pd.REPLICAS_ENV, raising=False)
    assert PrivDigitClient().replicas == pd.DEFAULT_REPLICAS
    monkeypatch.setenv(pd.REPLICAS_ENV, "https://a.example/p0/, https://b.example/p1")
    assert PrivDigitClient().replicas == ("https://a.example/p0", "https://b.example/p1")
    assert PrivDigitClient(["http://x:1", "http://y:2"]).replicas == ("http://x:1", "http://y:2")
    for bad in ("http://x:1", "http://x:1,http://y:2,http://z:3", "x:1,y:2", "http://a,http://a"):
        with pytest.raises(PrivDigitError):
            PrivDigitClient(bad)
    with pytest.raises(PrivDigitError, match="CA certificates"):
        PrivDigitClient(verify="/nonexistent/ca.pem")


# -- the async client ------------------------------------------------------------------------


def test_async_client() -> None:
    async def run() -> None:
        cluster = FakeCluster(max_batch=2)
        async with AsyncPrivDigitClient(URLS, transport=cluster.async_transport()) as c:
            assert (await c.model_info())["model_version"] == "v1"
            preds = await c.predict_encoded(images_with_ink([1, 12, 3]))
            assert [p.label for p in preds] == [1, 2, 3]
            cluster.versions = ["v2", "v2"]
            assert (await c.predict_encoded(images_with_ink([5])))[0].model_version == "v2"
        async with AsyncPrivDigitClient(
            URLS, transport=cluster.async_transport(), scores=True
        ) as c:
            pred = (await c.predict_encoded(images_with_ink([4])))[0]
            assert pred.label == 4 and pred.confidence is not None and pred.confidence > 0.9
        swapped = FakeCluster(parties=(1, 0))
        async with AsyncPrivDigitClient(URLS, transport=swapped.async_transport()) as c:
            with pytest.raises(PrivDigitError, match="swapped"):
                await c.predict_encoded(images_with_ink([1]))
        swapped.parties, swapped.down = (0, 1), {0}
        async with AsyncPrivDigitClient(URLS, transport=swapped.async_transport()) as c:
            with pytest.raises(ReplicaUnreachable, match=r"r0\.test"):
                await c.predict_encoded(images_with_ink([1]))

    asyncio.run(run())


# -- several replica pairs -------------------------------------------------------------------

PAIRS = (("http://p0r0.test", "http://p0r1.test"), ("http://p1r0.test", "http://p1r1.test"))


def paired(*clusters: FakeCluster, asynchronous: bool = False) -> httpx.MockTransport:
    """One transport for several fake pairs: host pKrI.test is replica I of `clusters[K]`."""

    def route(request: httpx.Request) -> tuple[FakeCluster, httpx.Request]:
        host = request.url.host
        request.url = request.url.copy_with(host=f"r{host[3]}.test")
        return clusters[int(host[1])], request

    def handle(request: httpx.Request) -> httpx.Response:
        cluster, request = route(request)
        return cluster.handle(request)

    async def ahandle(request: httpx.Request) -> httpx.Response:
        cluster, request = route(request)
        return await cluster.ahandle(request)

    return httpx.MockTransport(ahandle if asynchronous else handle)


def test_pairs_are_parsed_from_lists_strings_files_and_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    want = PAIRS
    assert pd.parse_pairs(list(PAIRS)) == want
    assert pd.parse_pairs([",".join(p) for p in PAIRS]) == want
    assert pd.parse_pairs(";".join(",".join(p) for p in PAIRS)) == want
    assert pd.parse_pairs([";".join(",".join(p) for p in PAIRS)]) == want  # --replicas "A;B"
    assert pd.parse_pairs("http://x:1,http://y:2") == (("http://x:1", "http://y:2"),)
    monkeypatch.setenv(pd.REPLICAS_ENV, " ; ".join(",".join(p) for p in PAIRS))
    assert PrivDigitClient().pairs == want and PrivDigitClient().replicas == PAIRS[0]
    listing = tmp_path / "pairs.txt"
    listing.write_text("# two pairs\n" + "\n".join(",".join(p) + "  # dc" for p in PAIRS) + "\n\n")
    assert pd.parse_pairs(pd.read_pairs_file(listing)) == want
    for bad in (
        [PAIRS[0], (PAIRS[1][0], PAIRS[0][1])],  # a replica in two pairs
        "http://a:1,http://b:2;http://c:3",
        ";",
    ):
        with pytest.raises(PrivDigitError):
            pd.parse_pairs(bad)
    (tmp_path / "empty.txt").write_text("# nothing\n")
    for path in (tmp_path / "empty.txt", tmp_path / "missing.txt"):
        with pytest.raises(PrivDigitError, match="pairs file"):
            pd.read_pairs_file(path)


def test_requests_take_turns_over_the_pairs() -> None:
    a, b = FakeCluster(), FakeCluster()
    with PrivDigitClient(PAIRS, transport=paired(a, b)) as c:
        preds = [c.predict_encoded(images_with_ink([k]))[0] for k in (1, 2, 3, 4)]
    assert [p.label for p in preds] == [1, 2, 3, 4]
    assert [p.pair for p in preds] == [0, 1, 0, 1]
    assert len(a.posts) == len(b.posts) == 4  # two requests, one post to each replica


@pytest.mark.parametrize(
    "failure",
    [
        "down",
        error(503, "not_ready", "peer not connected"),
        error(503, "dealer_unavailable"),
        error(504, "peer_timeout"),
        error(429, "busy"),
        httpx.Response(502, text="<html>Bad Gateway</html>"),  # a balancer in front of it
    ],
    ids=["down", "not_ready", "dealer", "peer_timeout", "busy", "html-502"],
)
def test_a_failing_pair_is_retried_on_another_with_a_fresh_request_id(failure: Any) -> None:
    a, b = FakeCluster(), FakeCluster()
    with PrivDigitClient(PAIRS, transport=paired(a, b)) as c:
        c.model_info()  # pair 0 answers; the next request starts on pair 1 ...
        assert c.predict_encoded(images_with_ink([5]))[0].pair == 1
        if failure == "down":  # ... and the one after on pair 0, which fails now
            a.down = {0, 1}
        else:
            a.fail = {0: failure, 1: error(504, "peer_timeout")}
        pred = c.predict_encoded(images_with_ink([7]))[0]
        assert (pred.label, pred.pair) == (7, 1)
        tried = [body["request_id"] for _, body in a.posts]
        assert pred.request_id not in tried  # a fresh request id on the other pair
        assert c.predict_encoded(images_with_ink([8]))[0].pair == 1  # pair 0 rests a while


def test_an_error_about_the_request_is_not_retried_on_another_pair() -> None:
    a, b = FakeCluster(), FakeCluster()
    with PrivDigitClient(PAIRS, transport=paired(a, b)) as c:
        c.model_info()  # pair 0's turn
        for failure in (error(400, "bad_tensor"), error(413, "batch_too_large")):
            assert c.predict_encoded(images_with_ink([1]))[0].pair == 1
            a.fail = {0: failure, 1: error(400, "share_mismatch")}
            before = len(b.posts)
            with pytest.raises(ServiceError) as info:
                c.predict_encoded(images_with_ink([1]))  # pair 0's turn: the caller's error
            assert info.value.replica == PAIRS[0][0] and info.value.status in (400, 413)
            assert len(b.posts) == before  # not sent to pair 1


def test_every_pair_down_is_the_last_pairs_error() -> None:
    a, b = FakeCluster(), FakeCluster()
    a.down, b.down = {0, 1}, {0}
    with PrivDigitClient(PAIRS, transport=paired(a, b)) as c, pytest.raises(ReplicaUnreachable):
        c.predict_encoded(images_with_ink([1]))
    with PrivDigitClient(PAIRS, transport=paired(a, b)) as c:
        b.down = set()
        assert c.predict_encoded(images_with_ink([3]))[0].label == 3


def test_async_client_fails_over_too() -> None:
    async def run() -> list[Any]:
        a, b = FakeCluster(), FakeCluster()
        a.down = {0}
        transport = paired(a, b, asynchronous=True)
        async with AsyncPrivDigitClient(PAIRS, transport=transport) as c:
            preds = [await c.predict_encoded(images_with_ink([k])) for k in (1, 2, 3)]
        return [(p[0].label, p[0].pair) for p in preds]

    assert asyncio.run(run()) == [(1, 1), (2, 1), (3, 1)]


# -- the CLI ---------------------------------------------------------------------------------


def run_cli(*args: str, module: bool = False) -> subprocess.CompletedProcess[str]:
    """`python clients/predict.py ARGS` (or `-m clients.predict`) from the repository root."""
    entry = ["-m", "clients.predict"] if module else ["clients/predict.py"]
    env = {**os.environ, "PYTHONPATH": ""}
    return subprocess.run(
        [sys.executable, *entry, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


@pytest.fixture
def digit_png(tmp_path: Path) -> Path:
    path = tmp_path / "seven.png"
    img = Image.new("L", (120, 160), 255)
    ImageDraw.Draw(img).line([(30, 30), (90, 30), (50, 140)], 0, 12)
    img.save(path)
    return path


@pytest.mark.parametrize("module", [False, True])
def test_cli_help(module: bool) -> None:
    result = run_cli("--help", module=module)
    assert result.returncode == 0 and "--replicas" in result.stdout and "--json" in result.stdout


def test_cli_usage_error() -> None:
    result = run_cli()
    assert result.returncode == 2 and "usage:" in result.stderr


def test_cli_bad_file_and_unreachable_replica(tmp_path: Path, digit_png: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    replicas = "http://127.0.0.1:9,http://127.0.0.1:10"
    result = run_cli(str(notes), "--replicas", replicas)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.splitlines() == [f"error: {notes}: not an image file (unknown format)"]

    result = run_cli(str(digit_png), "--replicas", replicas)
    assert result.returncode == 2 and result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: replica http://127.0.0.1:9 is unreachable")
    assert "Traceback" not in result.stderr

    result = run_cli(str(notes), "--json", "--replicas", replicas)
    assert result.returncode == 1
    assert json.loads(result.stdout) == {
        "file": str(notes),
        "error": "not an image file (unknown format)",
    }


def _patch_client(monkeypatch: pytest.MonkeyPatch, cluster: FakeCluster) -> None:
    """Make the CLI's PrivDigitClient talk to `cluster` instead of the network."""

    def factory(replicas: Any, **kw: Any) -> PrivDigitClient:
        return PrivDigitClient(URLS, transport=cluster.transport(), **kw)

    monkeypatch.setattr(cli, "PrivDigitClient", factory)


def test_cli_output(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    digit_png: Path,
) -> None:
    cluster = FakeCluster()
    _patch_client(monkeypatch, cluster)
    blank = tmp_path / "blank.png"
    Image.new("L", (40, 40), 255).save(blank)
    label = round(float(pd.preprocess(digit_png).sum())) % 10

    assert cli.main([str(digit_png)]) == 0
    assert capsys.readouterr().out == f"{digit_png}: {label}\n"

    assert cli.main([str(digit_png), str(blank), str(digit_png), "--scores"]) == 1
    out, err = capsys.readouterr()
    assert out.splitlines() == [f"{digit_png}: {label} (confidence 0.94)"] * 2
    assert err == f"error: {blank}: no digit found: the image is blank\n"
    assert len({b["request_id"] for _, b in cluster.posts}) == 2, "one request per CLI run"

    assert cli.main([str(blank), str(digit_png), "--json"]) == 1
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rows[0] == {"file": str(blank), "error": "no digit found: the image is blank"}
    assert rows[1]["file"] == str(digit_png) and rows[1]["label"] == label
    assert rows[1]["confidence"] is None and rows[1]["model_version"] == "v1"
    assert isinstance(rows[1]["latency_ms"], float)

    cluster.fail = {0: error(503, "not_ready", "peer not connected"), 1: error(504, "peer_timeout")}
    assert cli.main([str(digit_png)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1
    assert err.startswith(f"error: replica {URLS[0]} answered 503 not_ready") and "wait" in err


def test_cli_takes_several_pairs(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    digit_png: Path,
) -> None:
    a, b = FakeCluster(), FakeCluster()
    a.down = {0, 1}
    given: list[Any] = []

    def factory(replicas: Any, **kw: Any) -> PrivDigitClient:
        given.append(replicas)
        return PrivDigitClient(replicas, transport=paired(a, b), **kw)

    monkeypatch.setattr(cli, "PrivDigitClient", factory)
    listing = tmp_path / "pairs.txt"
    listing.write_text(",".join(PAIRS[1]) + "\n")
    label = round(float(pd.preprocess(digit_png).sum())) % 10
    argv = [str(digit_png), str(digit_png), "--replicas", ",".join(PAIRS[0])]
    assert cli.main([*argv, "--pairs-file", str(listing)]) == 0
    assert capsys.readouterr().out == f"{digit_png}: {label}\n" * 2  # pair 0 is down: no error
    assert cli.main([*argv, "--replicas", ",".join(PAIRS[1])]) == 0
    assert given == [[",".join(p) for p in PAIRS]] * 2
    assert cli.main([str(digit_png), "--pairs-file", str(tmp_path / "nope.txt")]) == 2
    assert "pairs file" in capsys.readouterr().err


# -- dependencies ----------------------------------------------------------------------------


def test_importing_the_client_does_not_import_torch() -> None:
    code = (
        "import sys, clients.privdigit, clients.predict; "
        "heavy = {'torch', 'service', 'training', 'fastapi'} & set(sys.modules); "
        "assert not heavy, heavy"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


def test_client_imports_only_small_dependencies() -> None:
    allowed = {"numpy", "httpx", "PIL", "clients", "__future__"} | set(sys.stdlib_module_names)
    for path in (ROOT / "clients").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                assert name.split(".")[0] in allowed, f"{path.name} imports {name}"


def test_the_label_prime_is_the_same_in_service_client_page_and_contract() -> None:
    from service.mpc.ring import PRIME

    assert pd.LABEL_PRIME == PRIME
    assert f"export const LABEL_PRIME = {PRIME}n;" in (ROOT / "web/js/sharing.js").read_text()
    assert f"mod the prime {PRIME}" in (ROOT / "openapi.yaml").read_text()
