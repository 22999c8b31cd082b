"""What the client sends and how it checks what the replicas answer (no I/O).

`predict_bodies` makes the two predict bodies (fresh shares, fresh request id); `bodies_of`
turns both replicas' replies into JSON objects or the likeliest error; `check_models` checks
the two /v1/model descriptions agree; `predictions` checks both predict answers belong to the
request and reconstructs the label (or the logits). `session.py` puts them in order.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from clients.privdigit.errors import (
    BadResponse,
    PrivDigitError,
    ReplicaUnreachable,
    ServiceError,
    VersionMismatch,
)
from clients.privdigit.pairs import Pair
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


@dataclass(frozen=True)
class Reply:
    """A replica's HTTP answer: status and raw body."""

    status: int
    content: bytes


Outcome = Reply | PrivDigitError


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
