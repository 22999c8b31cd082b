"""Run both parties of a protocol in one process, on two threads joined by an in-memory channel.

For tests, the engine benchmark and the demo; the service runs each party in its own process.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from service.mpc.beaver import WeightMasks
from service.mpc.channel import Channel, ChannelStats, InMemoryChannel
from service.mpc.dealer import Dealer, Randomness, deal_pair
from service.mpc.network import Output, PrivateNetwork
from service.mpc.party import Party
from service.mpc.ring import DEFAULT_FP, FixedPoint


@dataclass
class TwoPartyResult:
    """Both parties' outputs and what their channel endpoints counted."""

    out0: Any
    out1: Any
    stats0: ChannelStats
    stats1: ChannelStats


def run_two_party(
    fn: Callable[[Party], Any],
    rand0: Randomness,
    rand1: Randomness,
    fp: FixedPoint = DEFAULT_FP,
    *,
    timeout: float = 60.0,
    channels: tuple[Channel, Channel] | None = None,
) -> TwoPartyResult:
    """Run `fn(party)` as party 0 and party 1 concurrently; re-raise the first failure.

    `channels` replaces the default in-memory pair (e.g. to record what a party receives).
    """
    ch0, ch1 = channels or InMemoryChannel.pair(timeout=timeout)
    parties = (Party(0, ch0, rand0, fp), Party(1, ch1, rand1, fp))
    results: list[Any] = [None, None]
    errors: list[BaseException | None] = [None, None]

    def target(i: int) -> None:
        try:
            results[i] = fn(parties[i])
        except BaseException as exc:  # surfaced below, in the caller's thread
            errors[i] = exc

    other = threading.Thread(target=target, args=(1,), daemon=True)
    other.start()
    target(0)
    other.join(timeout)
    for err in errors:
        if err is not None:
            raise err
    if other.is_alive():
        raise TimeoutError("party 1 did not finish")
    return TwoPartyResult(results[0], results[1], ch0.stats, ch1.stats)


def private_forward(
    net: PrivateNetwork,
    weights: tuple[dict, dict],
    images: tuple,
    dealer: Dealer,
    request_id: str,
    output: Output = "label",
    masks: tuple[WeightMasks, WeightMasks] | None = None,
) -> TwoPartyResult:
    """One private forward pass of `net` on shared `images` with shared `weights`, both parties.

    The outputs are the parties' shares: XOR shares of one-hot labels, or additive logits.
    `masks`: each party's fixed weight masks (one mask id), reused across calls.
    """
    shapes = {k: tuple(v.shape) for k, v in weights[0].items()}
    plan = net.plan(images[0].shape[0], output, shapes, masks[0].mask_id if masks else None)
    rand0, rand1 = deal_pair(dealer, request_id, plan)
    return run_two_party(
        lambda p: net.forward(
            p, images[p.index], weights[p.index], output, masks[p.index] if masks else None
        ),
        rand0,
        rand1,
        net.fp,
    )
