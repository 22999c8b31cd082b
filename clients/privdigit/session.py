"""The client's sans-IO core: which calls, in what order, on which pair; retries and failover.

(The bodies it sends and the checks on the answers are `clients/privdigit/messages.py`.)

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
from clients.privdigit.messages import (
    Model,
    Outcome,
    Prediction,
    Reply,
    bodies_of,
    check_models,
    newer_served,
    predict_bodies,
    predictions,
)
from clients.privdigit.pairs import Pair, Picker

__all__ = ["Call", "Model", "Outcome", "Prediction", "Reply", "Session", "Steps", "retryable"]

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


Steps = Generator[tuple[Call, Call], tuple[Outcome, Outcome], T]


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
