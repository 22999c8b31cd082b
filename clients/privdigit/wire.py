"""Tensors on the wire (documented in `openapi.yaml`, mirrored by `service/api/transport/wire.py`).

    {"dtype": "int64", "shape": [...], "data": base64(little-endian int64 values, C order)}

`tests/test_service_units.py` encodes with one side and decodes with the other.
"""

from __future__ import annotations

import base64
import binascii
import math
from typing import Any

import numpy as np

from clients.privdigit.errors import BadResponse


def encode_tensor(arr: np.ndarray) -> dict[str, Any]:
    """The JSON form of an integer array: base64 of its little-endian int64 values, C order."""
    a = np.asarray(arr)
    if a.dtype == np.uint64:
        a = a.view(np.int64)
    elif not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"only integer arrays go on the wire, got dtype {a.dtype}")
    raw = np.ascontiguousarray(a, dtype="<i8").tobytes()
    return {
        "dtype": "int64",
        "shape": [int(d) for d in a.shape],
        "data": base64.b64encode(raw).decode("ascii"),
    }


def decode_tensor(obj: Any) -> np.ndarray:
    """The int64 array a JSON tensor holds; `BadResponse` unless it is exactly well-formed."""
    if not isinstance(obj, dict):
        raise BadResponse(f"a tensor must be a JSON object, got {type(obj).__name__}")
    dtype, shape, data = obj.get("dtype"), obj.get("shape"), obj.get("data")
    if dtype != "int64":
        raise BadResponse(f"tensor dtype must be 'int64', got {dtype!r}")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise BadResponse(f"tensor shape must be a list of non-negative integers, got {shape!r}")
    if not isinstance(data, str):
        raise BadResponse("tensor data must be a base64 string")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise BadResponse("tensor data is not valid standard base64") from None
    expected = 8 * math.prod(shape)
    if len(raw) != expected:
        raise BadResponse(f"tensor data holds {len(raw)} bytes; shape {shape} needs {expected}")
    return np.frombuffer(raw, dtype="<i8").astype(np.int64).reshape(shape)
