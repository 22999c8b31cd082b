"""Thin client for privdigit: classify a digit image on two replicas that each see only a share.

The client turns an image into an MNIST-style 28x28 array (`preprocess`), encodes it in fixed
point, splits it into two additive shares over Z_2^64 (`share_image`), posts one share to each
replica and reconstructs only the result: the label (`reconstruct_label`) or, when the operator
enabled it, the logits (`reconstruct_scores`). Given several replica pairs, it spreads requests
over them and retries on another pair when one is down.

Modules, one concept each: `errors`, `wire` (tensor JSON), `sharing` (fixed point, shares,
reconstruction), `preprocess` (images), `pairs` (URLs, which pair next), `messages` (bodies
and answer checks), `session` (the sans-IO protocol core: order, retries, failover) and
`client` (sync and async httpx transports over the session).

Dependencies: numpy, httpx, Pillow and the standard library only.
"""

from __future__ import annotations

import os  # noqa: F401  (tests patch `clients.privdigit.os.urandom`: the one CSPRNG entry)

from clients.privdigit.client import API_KEY_ENV, AsyncPrivDigitClient, PrivDigitClient
from clients.privdigit.errors import (
    REPLICAS_ENV,
    BadResponse,
    ImageError,
    PrivDigitError,
    ReplicaUnreachable,
    ServiceError,
    VersionMismatch,
)
from clients.privdigit.pairs import DEFAULT_REPLICAS, parse_pairs, read_pairs_file
from clients.privdigit.preprocess import preprocess
from clients.privdigit.session import REQUEST_ID_HEADER, Prediction, Session
from clients.privdigit.sharing import (
    CLASSES,
    LABEL_PRIME,
    LABEL_SHARINGS,
    encode_fixed,
    reconstruct_label,
    reconstruct_scores,
    share_image,
)
from clients.privdigit.wire import decode_tensor, encode_tensor

__all__ = [
    "API_KEY_ENV",
    "CLASSES",
    "DEFAULT_REPLICAS",
    "LABEL_PRIME",
    "LABEL_SHARINGS",
    "REPLICAS_ENV",
    "REQUEST_ID_HEADER",
    "AsyncPrivDigitClient",
    "BadResponse",
    "ImageError",
    "Prediction",
    "PrivDigitClient",
    "PrivDigitError",
    "ReplicaUnreachable",
    "ServiceError",
    "Session",
    "VersionMismatch",
    "decode_tensor",
    "encode_fixed",
    "encode_tensor",
    "parse_pairs",
    "preprocess",
    "read_pairs_file",
    "reconstruct_label",
    "reconstruct_scores",
    "share_image",
]
