"""The client's sans-IO core: request bodies, answer checks, reconstruction, retries.

A `Session` holds no connection. Its methods are generators that yield one `Call` to each
replica of a pair (party 0's first) and receive each call's `Reply` or the `PrivDigitError` the
transport met; they return the result. The transports (`clients/privdigit/client.py` for sync
and async httpx, `benchmarks/load.py`'s lean http.client one) only move bytes.

Rounds, per pair: one exchange for /v1/model (cached until a reload), one per request of at
most `max_batch` images, one more after a 409 model_version_mismatch; with several pairs, a
request a pair fails with "down", "unready" or "overloaded" is sent again to the next pair
with a fresh request id and fresh shares (a 4xx about the input is the caller's error: never).
What each party learns: each replica one uniform share of the images and public metadata
(request id, shape, output kind, model version); the client the label (or the logits, when the
operator enables scores), nothing else.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import numpy as np

from clients.privdigit.errors import (
    BadResponse,
    PrivDigitError,
    ReplicaUnreachable,
    ServiceError,
    VersionMismatch,
)
from clients.privdigit.pairs import Pair, Picker
from clients.privdigit.sharing import (
    CLASSES,
    LABEL_SHARINGS,
    encode_fixed,
    reconstruct_label,
    reconstruct_scores,
    share_image,
    softmax,
)
from clients.privdigit.wire import decode_tensor, encode_tensor

T = TypeVar("T")
REQUEST_ID_HEADER = "X-Request-Id"  # the body's request id again, for L7 load balancers
RETRY_CODES = ("busy", "model_version_mismatch", "request_timeout")  # besides every 5xx


@dataclass(frozen=True)
class Call:
    """One HTTP call to one replica: GET `path` when `body` is None, else POST it as JSON."""

    url: str
    path: str
    body: dict[str, Any] | None = None
    headers: dict[str, str] | None = None


@dataclass(frozen=True)
class Reply:
    """A replica's HTTP answer: status and raw body."""

    status: int
    content: bytes


Outcome = Reply | PrivDigitError
Steps = Generator[tuple[Call, Call], tuple[Outcome, Outcome], T]


@dataclass
class Prediction:
    """One classified image: the label, its softmax probability (scores mode only) and context."""

    label: int
    confidence: float | None
    model_version: str
    request_id: str
    latency_ms: float
    pair: int = 0  # which replica pair answered (index in the client's list)


@dataclass(frozen=True)
class Model:
    """What both replicas of a pair agreed on in /v1/model."""

    version: str
    frac_bits: int
    max_batch: int
    info: dict[str, Any]


class Session:
    """The protocol state of a client: its pairs, the model each serves, whose turn it is."""

    def __init__(self, pairs: Sequence[Pair], *, scores: bool = False, cooldown_s: float = 5.0):
        self.pairs = tuple(pairs)
        self.output = "scores" if scores else "label"
        self._models: list[Model | None] = [None] * len(self.pairs)
        self._picker = Picker(len(self.pairs), cooldown_s)

    def forget_models(self) -> None:
        """Ask every pair for its model again before its next request."""
        self._models = [None] * len(self.pairs)

    def model(self, refresh: bool = False) -> Steps[Model]:
        """The model of the first pair that answers /v1/model, checked."""
        return (yield from self._failover(lambda k: self._model(k, refresh)))

    def predict(self, batch: np.ndarray) -> Steps[list[Prediction]]:
        """Predictions for float64 images (N, 1, 28, 28) in [0, 1], `max_batch` per request."""
        out: list[Prediction] = []
        while len(out) < len(batch):
            out += yield from self._failover(partial(self._chunk, batch=batch, start=len(out)))
        return out

    def _failover(self, steps: Callable[[int], Steps[T]]) -> Steps[T]:
        """`steps(k)` on pair k, pairs in the picker's order, until one does not fail for a
        reason another pair may not share; with one pair, its error as it is."""
        order = self._picker.order()
        for i, k in enumerate(order):
            try:
                result = yield from steps(k)
            except PrivDigitError as exc:
                if i == len(order) - 1 or not retryable(exc):
                    raise
                self._picker.failed(k)
                self._models[k] = None
                continue
            self._picker.served(k)
            return result
        raise AssertionError("unreachable")

    def _model(self, k: int, refresh: bool) -> Steps[Model]:
        model = self._models[k]
        if model is None or refresh:
            pair = self.pairs[k]
            outcomes = yield Call(pair[0], "/v1/model"), Call(pair[1], "/v1/model")
            model = self._models[k] = check_models(pair, bodies_of(pair, outcomes))
        return model

    def _chunk(self, k: int, *, batch: np.ndarray, start: int) -> Steps[list[Prediction]]:
        """One request on pair k for the images from `start`; after a 409 (the model changed
        under it), the model again and one more request."""
        pair = self.pairs[k]
        for attempt in (0, 1):
            model = yield from self._model(k, refresh=attempt == 1)
            x = batch[start : start + model.max_batch]
            request_id, bodies = predict_bodies(x, model, self.output)
            headers = {REQUEST_ID_HEADER: request_id}
            began = time.perf_counter()
            outcomes = yield (
                Call(pair[0], "/v1/predict", bodies[0], headers),
                Call(pair[1], "/v1/predict", bodies[1], headers),
            )
            try:
                answers = bodies_of(pair, outcomes)
            except ServiceError as exc:
                if exc.code == "model_version_mismatch" and attempt == 0:
                    continue
                raise
            latency = 1000.0 * (time.perf_counter() - began)
            preds = predictions(pair, answers, request_id, self.output, model, len(x), latency, k)
            if newer_served(answers, model):
                self._models[k] = None  # a reload finished: fetch /v1/model before the next one
            return preds
        raise AssertionError("unreachable")


def retryable(exc: PrivDigitError) -> bool:
    """True when another pair may well succeed where this one failed: unreachable, unready,
    overloaded, between models or broken (5xx); never for a 4xx about the request itself."""
    if isinstance(exc, ReplicaUnreachable | VersionMismatch):
        return True
    if isinstance(exc, ServiceError):
        return exc.status >= 500 or exc.code in RETRY_CODES
    return isinstance(exc, BadResponse) and (exc.status or 0) >= 500


# -- answers ----------------------------------------------------------------------------------


def _one_line(text: str) -> str:
    """`text` with every run of whitespace (newlines included) collapsed to one space."""
    return " ".join(text.split())


def json_body(url: str, outcome: Outcome) -> dict[str, Any]:
    """The JSON object of a 2xx answer; `ServiceError` for an error answer, else `BadResponse`."""
    if isinstance(outcome, BaseException):
        raise outcome
    try:
        body = json.loads(outcome.content)
    except ValueError:
        body = None
    if not 200 <= outcome.status < 300:
        err = body.get("error") if isinstance(body, dict) else None
        code = err.get("code") if isinstance(err, dict) else None
        message = err.get("message") if isinstance(err, dict) else None
        if not (isinstance(code, str) and isinstance(message, str)):
            raise BadResponse(
                f"replica {url} answered {outcome.status} without a JSON error body",
                status=outcome.status,
            )
        raise ServiceError(url, outcome.status, code, _one_line(message))
    if not isinstance(body, dict):
        raise BadResponse(f"replica {url} answered {outcome.status} without a JSON object")
    return body


def first_error(errors: Sequence[BaseException | None]) -> BaseException | None:
    """The error to report from the two replicas' outcomes: the likeliest root cause first."""
    found = [e for e in errors if e is not None]

    def rank(e: BaseException) -> int:
        if isinstance(e, ReplicaUnreachable):
            return 0
        if isinstance(e, ServiceError) and not e.code.startswith("peer_"):
            return 1
        return 2 if isinstance(e, PrivDigitError) else 3

    return min(found, key=rank) if found else None


def bodies_of(pair: Pair, outcomes: Sequence[Outcome]) -> list[dict[str, Any]]:
    """Both replicas' JSON answers, or the likeliest error of the two."""
    results: list[Any] = [None, None]
    errors: list[BaseException | None] = [None, None]
    for p in (0, 1):
        try:
            results[p] = json_body(pair[p], outcomes[p])
        except PrivDigitError as exc:
            errors[p] = exc
    error = first_error(errors)
    if error is not None:
        raise error
    return results


def check_models(urls: Pair, infos: Sequence[dict[str, Any]]) -> Model:
    """The model to ask for, after checking the parties, versions and fixed point agree.

    The version is party 0's `serving_version` (the newest it knows both replicas hold; party 0
    picks the model for a request), so a reload on one replica does not fail requests; without
    one, both replicas must report the same `model_version`.
    """
    parties, versions, fracs, batches = [], [], [], []
    for url, info in zip(urls, infos, strict=True):
        fp = info.get("fixed_point")
        frac = fp.get("frac_bits") if isinstance(fp, dict) else None
        ring = fp.get("ring_bits", 64) if isinstance(fp, dict) else None
        party, version, batch = info.get("party"), info.get("model_version"), info.get("max_batch")
        if not (
            isinstance(info.get("serving_version"), str | None)
            and party in (0, 1)
            and isinstance(version, str)
            and version
            and isinstance(frac, int)
            and 0 <= frac <= 30
            and ring == 64
            and isinstance(batch, int)
            and batch >= 1
        ):
            raise BadResponse(f"replica {url} sent a malformed /v1/model description")
        parties.append(party)
        versions.append(version)
        fracs.append(frac)
        batches.append(batch)
    if parties == [1, 0]:
        raise PrivDigitError(
            f"the replica URLs are swapped: {urls[0]} is party 1 and {urls[1]} is party 0; "
            f"give party 0 first: --replicas {urls[1]},{urls[0]}"
        )
    if parties != [0, 1]:
        raise PrivDigitError(
            f"both replicas say they are party {parties[0]}; give party 0's URL, then party 1's"
        )
    serving = infos[0].get("serving_version")
    if not serving and versions[0] != versions[1]:
        raise VersionMismatch(
            f"the replicas hold different models and none in common: {urls[0]} has "
            f"{versions[0]}, {urls[1]} has {versions[1]}; wait for the reload to finish and retry"
        )
    if fracs[0] != fracs[1]:
        raise VersionMismatch(
            f"the replicas use different fixed point: frac_bits {fracs[0]} and {fracs[1]}"
        )
    return Model(serving or versions[0], fracs[0], min(batches), dict(infos[0]))


def newer_served(answers: Sequence[dict[str, Any]], model: Model) -> bool:
    """True when party 0's predict answer says another version than `model` is served now."""
    serving = answers[0].get("serving_version")
    return isinstance(serving, str) and serving != model.version


def predict_bodies(
    x: np.ndarray, model: Model, output: str
) -> tuple[str, tuple[dict[str, Any], dict[str, Any]]]:
    """A fresh request id and the two predict bodies carrying fresh shares of images `x`."""
    request_id = secrets.token_urlsafe(18)
    s0, s1 = share_image(encode_fixed(x, model.frac_bits))
    base = {"request_id": request_id, "output": output, "model_version": model.version}
    return request_id, ({**base, "input": encode_tensor(s0)}, {**base, "input": encode_tensor(s1)})


def share_of(
    url: str, party: int, body: dict[str, Any], request_id: str, output: str, model: Model, n: int
) -> tuple[np.ndarray, int]:
    """A predict answer's share (N, 10) and frac_bits, after checking it answers our request
    (its sharing is checked by the caller: both replicas must agree)."""
    if body.get("model_version") != model.version:
        raise VersionMismatch(
            f"replica {url} answered with model {body.get('model_version')!r}, "
            f"expected {model.version!r}"
        )
    expected = {"request_id": request_id, "party": party, "output": output}
    for key, value in expected.items():
        if body.get(key) != value:
            raise BadResponse(f"replica {url} answered {key}={body.get(key)!r}, expected {value!r}")
    sharings = LABEL_SHARINGS if output == "label" else ("additive",)
    if body.get("sharing") not in sharings:
        raise BadResponse(
            f"replica {url} answered sharing={body.get('sharing')!r}, expected one of {sharings}"
        )
    frac = body.get("frac_bits")
    if not isinstance(frac, int) or not 0 <= frac <= 62:
        raise BadResponse(f"replica {url} answered frac_bits={frac!r}")
    try:
        share = decode_tensor(body.get("share"))
    except BadResponse as exc:
        raise BadResponse(f"replica {url}: {exc}") from None
    if share.shape != (n, CLASSES):
        raise BadResponse(f"replica {url} answered a share of shape {list(share.shape)}")
    return share, frac


def predictions(
    urls: Pair,
    bodies: Sequence[dict[str, Any]],
    request_id: str,
    output: str,
    model: Model,
    n: int,
    latency_ms: float,
    pair: int = 0,
) -> list[Prediction]:
    """The predictions reconstructed from the two replicas' answers to one request."""
    (s0, f0), (s1, f1) = (
        share_of(urls[p], p, bodies[p], request_id, output, model, n) for p in (0, 1)
    )
    if output == "label":
        sharing = bodies[0]["sharing"]
        if bodies[1]["sharing"] != sharing:
            raise BadResponse(
                f"the replicas answered sharings {sharing} and {bodies[1]['sharing']}"
            )
        labels, conf = reconstruct_label(s0, s1, sharing), [None] * n
    else:
        if f0 != f1:
            raise BadResponse(f"the replicas answered frac_bits {f0} and {f1}")
        logits = reconstruct_scores(s0, s1, f0)
        labels = logits.argmax(axis=1)
        probs = softmax(logits)[np.arange(n), labels]
        conf = [float(p) for p in probs]
    return [
        Prediction(int(lab), c, model.version, request_id, latency_ms, pair)
        for lab, c in zip(labels, conf, strict=True)
    ]
