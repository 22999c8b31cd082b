"""The comparison protocols, registered by name: the one list the engine, the settings, the
command lines, the docs and the tests read.

A comparison protocol computes, on additive shares over Z_2^64, the network's three non-linear
steps: ReLU with the pending rescale fused in (`relu(party, x, trunc_bits, select=None)`), max
pooling (`max_pool2d(party, x, kernel)`) and the label (`argmax(party, x)`). Each simple
protocol is a module of this package with those three functions and a `LABEL_SHARING` ("zero":
a zero test in Z_p; "xor": XOR shares of a one-hot vector); the client decodes the label by
it. Rounds, bytes and what each party sees are in each module's docstring; the figures for the
served CNN come from `python -m service protocols`, which measures them.

A composite protocol is data, not a branch: `BySize(small, large, limit)` uses `small` for a
layer of at most `limit` comparisons per image and `large` above. The network asks
`protocol.for_layer(per_image)` for each layer and never branches on a protocol's name.

Adding a protocol: write its module (and its dealer material kinds), then add one
`register(...)` line below. This module imports no torch, so that command lines list the
protocols cheaply; a module is imported the first time one of its gates runs.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any


@dataclass(frozen=True)
class Comparison:
    """One protocol module's gates, by name."""

    name: str
    summary: str  # one line, for --help, the settings, /v1/model and the docs
    module: str  # the module under service.mpc with relu, max_pool2d, argmax, LABEL_SHARING
    selects: bool  # relu can apply a following small linear layer in its select round
    max_batch: int | None = None  # a deployment's default batch cap, when material is large

    def impl(self) -> ModuleType:
        return importlib.import_module(f"service.mpc.{self.module}")

    @property
    def label_sharing(self) -> str:
        """How argmax hands out the label: "zero" (a zero test in Z_p) or "xor"."""
        return self.impl().LABEL_SHARING

    def for_layer(self, per_image: int) -> Comparison:
        """The protocol that runs a layer of `per_image` comparisons per image: itself."""
        return self

    def relu(self, party, x, trunc_bits: int, select=None) -> Any:
        """This party's share of max(x, 0) >> trunc_bits; with `select`, of select(relu(x))."""
        if select is None:
            return self.impl().relu(party, x, trunc_bits)
        if not self.selects:
            raise ValueError(f"{self.name}'s ReLU cannot apply a linear layer in its select")
        return self.impl().relu(party, x, trunc_bits, select=select)

    def max_pool2d(self, party, x, kernel: int) -> Any:
        return self.impl().max_pool2d(party, x, kernel)

    def argmax(self, party, x) -> Any:
        return self.impl().argmax(party, x)


@dataclass(frozen=True)
class BySize:
    """`small` for layers of at most `limit` comparisons per image, `large` above."""

    name: str
    summary: str
    small: Comparison
    large: Comparison
    limit: int
    max_batch: int | None = None

    def for_layer(self, per_image: int) -> Comparison:
        return (self.small if per_image <= self.limit else self.large).for_layer(per_image)


Protocol = Comparison | BySize
REGISTRY: dict[str, Protocol] = {}


def register(protocol: Protocol) -> Protocol:
    if protocol.name in REGISTRY:
        raise ValueError(f"protocol {protocol.name!r} is registered twice")
    REGISTRY[protocol.name] = protocol
    return protocol


def get(name: str) -> Protocol:
    """The registered protocol `name`; a ValueError naming the known ones otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown comparison protocol {name!r}; known: {', '.join(NAMES)}"
        ) from None


def label_sharing(protocol: Protocol, classes: int) -> str:
    """How `protocol`'s argmax over `classes` classes hands out the label."""
    return protocol.for_layer(classes * (classes - 1) // 2).label_sharing


A2B = register(
    Comparison(
        "a2b",
        "arithmetic-to-binary conversion and a carry tree of one-round gates: the reference, "
        "no keys, the least dealer material",
        "comparison",
        selects=True,
    )
)
FSS = register(
    Comparison(
        "fss",
        "function secret sharing (DCF keys from the dealer): the fewest rounds, the most dealer "
        "material and CPU",
        "fss",
        selects=False,
        max_batch=8,  # its keys take megabytes per image and party
    )
)
LUT = Comparison(
    "lut",
    "the dealer's truth tables of its mask's slices: a sign in 2 rounds",
    "lut",
    selects=True,
)
register(
    BySize(
        "lut",
        "table lookups for layers of at most 1,024 comparisons per image, a2b for larger ones: "
        "the best latency at a little more dealer material",
        small=LUT,
        large=A2B,
        limit=1024,
    )
)
register(
    BySize(
        "hybrid",
        "fss for layers of at most 1,024 comparisons per image, a2b for larger ones",
        small=FSS,
        large=A2B,
        limit=1024,
    )
)

GATES = {p.name: p for p in (A2B, FSS, LUT)}  # the simple protocols, each one module

DEFAULT = "lut"  # the deployments', the command lines' and the engine's default
NAMES = (DEFAULT, *(n for n in REGISTRY if n != DEFAULT))


def help_text() -> str:
    """One line per protocol, the default first: for --help and the settings' description."""
    return "; ".join(
        f"{n}{' (default)' if n == DEFAULT else ''}: {REGISTRY[n].summary}" for n in NAMES
    )
