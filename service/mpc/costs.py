"""What each registered comparison protocol costs on one network, measured rather than typed.

For a network (its layer list and weight shapes) and a protocol, one label at batch 1 as a
replica serves it (fixed weight masks, already opened by an earlier run): the rounds, the bytes
each party sends the other, and the dealer material each party receives. The counts depend
only on the architecture, never on the values, so the run is on shares of zeros, in one
process (`inprocess`). `python -m service protocols` prints them; docs/protocols.md carries
that table and a test keeps it current.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import torch

from service.mpc import protocols
from service.mpc.beaver import WeightMasks
from service.mpc.dealer import Dealer
from service.mpc.inprocess import private_forward
from service.mpc.network import PrivateNetwork
from service.mpc.ring import DEFAULT_FP, FixedPoint


@dataclass(frozen=True)
class Cost:
    """One protocol's figures for one label at batch 1."""

    comparison: str
    default: bool
    summary: str
    label_sharing: str
    rounds: int
    peer_bytes: int  # what party 0 sends party 1 (party 1 sends as much)
    dealer_bytes: tuple[int, int]  # material to party 0, to party 1

    def row(self) -> dict:
        return {**asdict(self), "dealer_bytes": list(self.dealer_bytes)}


def measure(
    layers: Sequence[dict],
    input_shape: tuple[int, ...],
    weight_shapes: Mapping[str, Sequence[int]],
    comparison: str,
    fp: FixedPoint = DEFAULT_FP,
) -> Cost:
    """The cost of one label of `layers` with `comparison` (see the module docstring)."""
    net = PrivateNetwork(tuple(layers), tuple(input_shape), fp, comparison)
    shapes = {k: tuple(s) for k, s in weight_shapes.items()}
    zeros = {k: torch.zeros(s, dtype=torch.int64) for k, s in shapes.items()}
    image = torch.zeros((1, *input_shape), dtype=torch.int64)
    masks = (WeightMasks("costs"), WeightMasks("costs"))
    plan = net.plan(1, "label", shapes, "costs")
    dealer = Dealer()
    for _ in range(2):  # the first run opens the masked weights, once per model
        res = private_forward(
            net, (zeros, zeros), (image, image), dealer, uuid.uuid4().hex, "label", masks
        )
    material = tuple(dealer.deal(uuid.uuid4().hex, p, plan).nbytes for p in (0, 1))
    protocol = protocols.get(comparison)
    return Cost(
        comparison,
        comparison == protocols.DEFAULT,
        protocol.summary,
        net.label_sharing(int(res.out0.shape[-1])),
        res.stats0.rounds,
        res.stats0.bytes_sent,
        material,  # type: ignore[arg-type]
    )


def markdown(costs: Sequence[Cost]) -> str:
    """The table docs/protocols.md carries."""
    lines = [
        "| protocol | rounds | bytes each replica sends | dealer to party 0 | dealer to party 1 "
        "| label | what it is |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for c in costs:
        name = f"{c.comparison} (default)" if c.default else c.comparison
        lines.append(
            f"| {name} | {c.rounds} | {c.peer_bytes:,} | {c.dealer_bytes[0]:,} "
            f"| {c.dealer_bytes[1]:,} | {c.label_sharing} | {c.summary} |"
        )
    return "\n".join(lines) + "\n"


TABLE_START = "<!-- protocols table: python -m service protocols --write-docs -->\n"
TABLE_END = "<!-- end of protocols table -->\n"


def with_table(text: str, costs: Sequence[Cost]) -> str:
    """`text` (a Markdown page) with the table between its markers replaced by `costs`'."""
    head, sep, rest = text.partition(TABLE_START)
    _, sep2, tail = rest.partition(TABLE_END)
    if not sep or not sep2:
        raise ValueError(f"the page has no {TABLE_START.strip()} ... {TABLE_END.strip()} markers")
    return head + TABLE_START + markdown(costs) + TABLE_END + tail
