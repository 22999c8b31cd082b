"""Bytes on the wire, owned once: tensors in JSON, the dealer's material, the peer's frames.

Tensor in JSON (documented in `openapi.yaml`, mirrored by `clients/privdigit/wire.py`):
    {"dtype": "int64", "shape": [n, ...], "data": base64(little-endian int64, C order)}

Dealer material (application/octet-stream): the 32-byte seed, the dealer's 16-byte instance id,
then party 1's corrections as
little-endian int64 in plan order, then (both parties) the DCF keys of the plan's fss gates as
little-endian 64-bit words in plan order, then (both parties) one 32-byte weight-mask seed per
request with a fixed weight mask, beaverw or muxw (all sizes follow from the public plan).

Peer frame (one WebSocket binary message):
    u8 kind | u16 len(request id) | request id (ASCII) | body
    kind DATA:  u32 round | u16 count | count x (u8 ndim | ndim x u32 dim | int64 LE data)
    kind ABORT, HAVE, ARRIVED, BATCH, REJECT, WITHDRAW, PREFETCH, LANES, DISCARD: a UTF-8
    JSON object
A lane (`lanes.py`) carries the same DATA and ABORT frames, each after a u32 big-endian length.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from service.mpc.dealer import (
    INSTANCE_BYTES,
    WEIGHT_MASK_KINDS,
    PartyMaterial,
    Request,
    correction_shapes,
    key_words,
)

SEED_BYTES = 32


class WireError(ValueError):
    """Bytes that do not decode to what the protocol expects."""


# -- tensors in JSON -----------------------------------------------------------------------------


def tensor_to_json(t: torch.Tensor) -> dict[str, Any]:
    arr = t.detach().contiguous().numpy().astype("<i8", copy=False)
    return {"dtype": "int64", "shape": list(t.shape), "data": base64.b64encode(arr).decode()}


def tensor_from_json(dtype: str, shape: Sequence[int], data: str) -> torch.Tensor:
    if dtype != "int64":
        raise WireError(f"dtype must be 'int64', got {dtype!r}")
    if any(int(d) < 0 or int(d) >= 2**31 for d in shape):
        raise WireError("shape dimensions must be in [0, 2^31)")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise WireError("data is not valid base64") from None
    expected = 8 * math.prod(shape)
    if len(raw) != expected:
        raise WireError(f"data holds {len(raw)} bytes; shape {list(shape)} needs {expected}")
    arr = np.frombuffer(raw, dtype="<i8").astype(np.int64, copy=True)
    try:
        return torch.from_numpy(arr.reshape(tuple(int(d) for d in shape)))
    except ValueError as exc:  # e.g. a zero dimension beside one too large to index
        raise WireError(f"shape {list(shape)} cannot hold this data ({exc})") from None


# -- dealer material -----------------------------------------------------------------------------


def plan_to_json(plan: Sequence[Request]) -> list[dict[str, Any]]:
    return [
        {"kind": r.kind, "shapes": [list(s) for s in r.shapes], "params": list(r.params)}
        for r in plan
    ]


def plan_from_json(items: Sequence[dict[str, Any]]) -> tuple[Request, ...]:
    return tuple(
        Request(
            str(it["kind"]),
            tuple(tuple(int(d) for d in s) for s in it["shapes"]),
            tuple(it.get("params", ())),
        )
        for it in items
    )


def material_to_bytes(m: PartyMaterial) -> bytearray:
    """The material as one buffer, each array copied once, straight into place."""
    arrays = [c.contiguous().numpy().astype("<i8", copy=False) for c in m.corrections]
    arrays += [k.astype("<u8", copy=False) for k in m.keys]
    head, tail = m.seed + m.dealer, b"".join(m.mask_seeds)
    out = bytearray(len(head) + sum(a.nbytes for a in arrays) + len(tail))
    out[: len(head)] = head
    pos = len(head)
    for a in arrays:
        np.frombuffer(out, dtype=a.dtype, count=a.size, offset=pos)[:] = a.reshape(-1)
        pos += a.nbytes
    out[pos:] = tail
    return out


def material_from_bytes(
    data: bytes | bytearray, request_id: str, party: int, plan: tuple[Request, ...]
) -> PartyMaterial:
    """The material from its bytes; the corrections are views of `data` when it is a
    writable bytearray (copied from bytes)."""
    shapes = correction_shapes(plan) if party == 1 else []
    keys = key_words(plan)
    n_masks = sum(r.kind in WEIGHT_MASK_KINDS for r in plan)
    head = SEED_BYTES + INSTANCE_BYTES
    words_end = head + 8 * (sum(math.prod(s) for s in shapes) + sum(keys))
    expected = words_end + SEED_BYTES * n_masks
    if len(data) != expected:
        raise WireError(f"dealer sent {len(data)} bytes, the plan needs {expected}")
    count = (words_end - head) // 8
    flat = np.frombuffer(data, dtype="<i8", count=count, offset=head)
    if not flat.flags.writeable:
        flat = flat.copy()
    corrections, pos = [], 0
    for s in shapes:
        n = math.prod(s)
        corrections.append(torch.from_numpy(flat[pos : pos + n].reshape(s)))
        pos += n
    words = []
    for n in keys:
        words.append(flat[pos : pos + n].view("<u8"))
        pos += n
    masks = [
        bytes(data[words_end + i * SEED_BYTES : words_end + (i + 1) * SEED_BYTES])
        for i in range(n_masks)
    ]
    return PartyMaterial(
        request_id,
        party,
        bytes(data[:SEED_BYTES]),
        plan,
        corrections,
        words,
        masks,
        bytes(data[SEED_BYTES:head]),
    )


# -- peer frames ---------------------------------------------------------------------------------

DATA, ABORT, HAVE = 1, 3, 4
ARRIVED, BATCH, REJECT, WITHDRAW = 5, 6, 7, 8  # pairing and batching (see messages.py)
PREFETCH = 9  # party 0 names dealer material to fetch ahead (see messages.py)
LANES = 10  # party 1 names the port of its lanes (see messages.py)
DISCARD = 11  # party 0 dropped prefetched entries unused; party 1 drops them too (messages.py)
CONTROL = frozenset({ARRIVED, BATCH, REJECT, WITHDRAW, PREFETCH, LANES, DISCARD})
_HEAD = struct.Struct("<BH")
_ROUND = struct.Struct("<IH")


@dataclass
class Frame:
    kind: int
    request_id: str
    round: int = 0
    tensors: list[torch.Tensor] | None = None
    payload: dict[str, Any] | None = None


def encode_data(request_id: str, round_: int, tensors: Sequence[torch.Tensor]) -> bytes:
    rid = request_id.encode("ascii")
    parts = [_HEAD.pack(DATA, len(rid)), rid, _ROUND.pack(round_, len(tensors))]
    for t in tensors:
        parts.append(struct.pack(f"<B{t.dim()}I", t.dim(), *t.shape))
        parts.append(t.contiguous().numpy().astype("<i8", copy=False).tobytes())
    return b"".join(parts)


def encode_json(kind: int, request_id: str, payload: dict[str, Any]) -> bytes:
    rid = request_id.encode("ascii")
    return _HEAD.pack(kind, len(rid)) + rid + json.dumps(payload).encode()


def decode_frame(data: bytes) -> Frame:
    try:
        kind, n = _HEAD.unpack_from(data, 0)
        pos = _HEAD.size
        rid = data[pos : pos + n].decode("ascii")
        pos += n
        if kind != DATA:
            if kind not in (ABORT, HAVE) and kind not in CONTROL:
                raise WireError(f"unknown frame kind {kind}")
            return Frame(kind, rid, payload=json.loads(data[pos:]))
        round_, count = _ROUND.unpack_from(data, pos)
        pos += _ROUND.size
        tensors = []
        for _ in range(count):
            (ndim,) = struct.unpack_from("<B", data, pos)
            shape = struct.unpack_from(f"<{ndim}I", data, pos + 1)
            pos += 1 + 4 * ndim
            size = 8 * math.prod(shape)
            if pos + size > len(data):
                raise WireError("frame is shorter than its tensors")
            arr = np.frombuffer(data, dtype="<i8", count=size // 8, offset=pos)
            tensors.append(torch.from_numpy(arr.astype(np.int64, copy=True).reshape(shape)))
            pos += size
        if pos != len(data):
            raise WireError("frame has trailing bytes")
        return Frame(DATA, rid, round_, tensors)
    except (struct.error, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WireError(f"malformed peer frame ({exc})") from None
