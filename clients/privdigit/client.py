"""The thin transports: `PrivDigitClient` (sync) and `AsyncPrivDigitClient` (asyncio) over httpx.

Both drive the same `Session` (`clients/privdigit/session.py`): they perform the two calls it
yields at once (sync: party 1's in a worker thread; async: gathered), translate httpx's
transport errors into `ReplicaUnreachable`, and hand the replies back. Nothing else.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import httpx
import numpy as np

from clients.privdigit.errors import PrivDigitError, ReplicaUnreachable
from clients.privdigit.pairs import Replicas, parse_pairs
from clients.privdigit.preprocess import as_batch, preprocess, preprocess_all
from clients.privdigit.session import Call, Outcome, Prediction, Reply, Session, Steps

T = TypeVar("T")
API_KEY_ENV = "PRIVDIGIT_API_KEY"
USER_AGENT = "privdigit-client/0.1"


def _ssl_verify(verify: bool | str | ssl.SSLContext) -> bool | ssl.SSLContext:
    """httpx's `verify`: a bool, or an SSL context trusting the CA bundle at path `verify`."""
    if isinstance(verify, bool | ssl.SSLContext):
        return verify
    try:
        return ssl.create_default_context(cafile=str(verify))
    except (OSError, ssl.SSLError) as exc:
        raise PrivDigitError(f"cannot load CA certificates from {verify}: {exc}") from None


def _http_options(
    timeout: float, verify: bool | str | ssl.SSLContext, api_key: str | None, transport: Any
) -> dict[str, Any]:
    """The httpx client options both clients (sync and async) use for each replica."""
    key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
    headers = {"User-Agent": USER_AGENT, **({"X-API-Key": key} if key else {})}
    return {"timeout": timeout, "verify": _ssl_verify(verify), "transport": transport,
            "headers": headers}  # fmt: skip


def _unreachable(url: str, exc: httpx.TransportError, timeout: float) -> ReplicaUnreachable:
    """The `ReplicaUnreachable` for a transport failure talking to `url`."""
    if isinstance(exc, httpx.TimeoutException):
        return ReplicaUnreachable(url, f"no answer within {timeout:g} s")
    return ReplicaUnreachable(url, " ".join(str(exc).split()) or type(exc).__name__)


class _Base:
    """What both transports hold: the pairs, the session, the options."""

    def __init__(self, replicas: Replicas, timeout: float, scores: bool) -> None:
        self.pairs = parse_pairs(replicas)
        self.replicas = self.pairs[0]
        self.timeout = timeout
        self.scores = scores
        self._session = Session(self.pairs, scores=scores)

    @property
    def urls(self) -> list[str]:
        return [url for pair in self.pairs for url in pair]


class PrivDigitClient(_Base):
    """Classifies digits on a replica pair (party 0 first); each replica sees only a random share.

    `replicas` is "URL0,URL1", a sequence of two URLs, several pairs ("A0,A1;B0,B1" or a list
    of pairs: requests take turns and fail over to another pair), or None for
    $PRIVDIGIT_REPLICAS or the local default. `verify` is True, False or a CA bundle path.
    `scores=True` asks for the logits (when the operator enabled them) so predictions carry a
    confidence. `api_key` (or $PRIVDIGIT_API_KEY) goes in X-API-Key where the operator requires
    one. `transport` replaces httpx's network transport (tests).
    """

    def __init__(
        self,
        replicas: Replicas = None,
        *,
        timeout: float = 30.0,
        verify: bool | str | ssl.SSLContext = True,
        scores: bool = False,
        api_key: str | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(replicas, timeout, scores)
        options = _http_options(timeout, verify, api_key, transport)
        self._http = {url: httpx.Client(base_url=url, **options) for url in self.urls}
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="privdigit")

    def _call(self, call: Call) -> Outcome:
        """One call; its reply, or `ReplicaUnreachable`."""
        try:
            if call.body is None:
                r = self._http[call.url].get(call.path, headers=call.headers)
            else:
                r = self._http[call.url].post(call.path, json=call.body, headers=call.headers)
        except httpx.TransportError as exc:
            return _unreachable(call.url, exc, self.timeout)
        return Reply(r.status_code, r.content)

    def _run(self, steps: Steps[T]) -> T:
        """Drive the session: both calls of each step at once, until it returns."""
        try:
            calls = next(steps)
            while True:
                future = self._pool.submit(self._call, calls[1])
                first = self._call(calls[0])
                calls = steps.send((first, future.result()))
        except StopIteration as done:
            return done.value

    def model_info(self, refresh: bool = False) -> dict[str, Any]:
        """Party 0's /v1/model description, once party 1 is checked to agree with it."""
        return dict(self._run(self._session.model(refresh)).info)

    def predict_encoded(self, x: np.ndarray) -> list[Prediction]:
        """Predictions for MNIST-style arrays (N,28,28) or (N,1,28,28) in [0, 1], unprocessed."""
        return self._run(self._session.predict(as_batch(x)))

    def predict_batch(self, images: Sequence[Any]) -> list[Prediction]:
        """Predictions for many images (anything `preprocess` takes), in as few requests as fit."""
        return self.predict_encoded(preprocess_all(images))

    def predict(self, image: Any) -> Prediction:
        """The prediction for one image (anything `preprocess` takes)."""
        return self.predict_encoded(preprocess(image)[None])[0]

    def close(self) -> None:
        """Close the HTTP connections and the worker threads."""
        for http in self._http.values():
            http.close()
        self._pool.shutdown(wait=False)

    def __enter__(self) -> PrivDigitClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncPrivDigitClient(_Base):
    """`PrivDigitClient` for asyncio: the same methods as coroutines, both posts gathered."""

    def __init__(
        self,
        replicas: Replicas = None,
        *,
        timeout: float = 30.0,
        verify: bool | str | ssl.SSLContext = True,
        scores: bool = False,
        api_key: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(replicas, timeout, scores)
        options = _http_options(timeout, verify, api_key, transport)
        self._http = {url: httpx.AsyncClient(base_url=url, **options) for url in self.urls}

    async def _call(self, call: Call) -> Outcome:
        """One call; its reply, or `ReplicaUnreachable`."""
        try:
            if call.body is None:
                r = await self._http[call.url].get(call.path, headers=call.headers)
            else:
                r = await self._http[call.url].post(call.path, json=call.body, headers=call.headers)
        except httpx.TransportError as exc:
            return _unreachable(call.url, exc, self.timeout)
        return Reply(r.status_code, r.content)

    async def _run(self, steps: Steps[T]) -> T:
        """Drive the session: both calls of each step gathered, until it returns."""
        try:
            calls = next(steps)
            while True:
                first, second = await asyncio.gather(self._call(calls[0]), self._call(calls[1]))
                calls = steps.send((first, second))
        except StopIteration as done:
            return done.value

    async def model_info(self, refresh: bool = False) -> dict[str, Any]:
        """Party 0's /v1/model description, once party 1 is checked to agree with it."""
        return dict((await self._run(self._session.model(refresh))).info)

    async def predict_encoded(self, x: np.ndarray) -> list[Prediction]:
        """Predictions for MNIST-style arrays (N,28,28) or (N,1,28,28) in [0, 1], unprocessed."""
        return await self._run(self._session.predict(as_batch(x)))

    async def predict_batch(self, images: Sequence[Any]) -> list[Prediction]:
        """Predictions for many images (anything `preprocess` takes), in as few requests as fit."""
        return await self.predict_encoded(preprocess_all(images))

    async def predict(self, image: Any) -> Prediction:
        """The prediction for one image (anything `preprocess` takes)."""
        return (await self.predict_encoded(preprocess(image)[None]))[0]

    async def close(self) -> None:
        """Close the HTTP connections."""
        for http in self._http.values():
            await http.aclose()

    async def __aenter__(self) -> AsyncPrivDigitClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
