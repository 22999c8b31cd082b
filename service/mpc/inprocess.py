"""Run both parties of a protocol in one process, on two threads joined by an in-memory channel.

The one public in-process path, for tests, benchmarks and the training package's private
evaluation (the service runs each party in its own process): share a model (`share_model`)
and its inputs (`share_images`), deal a forward pass's plan (`deal`: `PrivateNetwork.plan`, then
the dealer), and run it (`private_forward`; `run_two_party` for any other protocol function).
Both parties live here, so nothing in this module is private from the caller.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from service.mpc.beaver import WeightMasks
from service.mpc.channel import Channel, ChannelStats, InMemoryChannel
from service.mpc.dealer import Dealer, Randomness, deal_pair
from service.mpc.network import Output, PrivateNetwork
from service.mpc.party import Party
from service.mpc.ring import DEFAULT_FP, FixedPoint
from service.mpc.sharing import share_tensors


@dataclass
class TwoPartyResult:
    """Both parties' outputs and what their channel endpoints counted."""

    out0: Any
    out1: Any
    stats0: ChannelStats
    stats1: ChannelStats
    dealer_s: float = 0.0  # `private_forward`: dealing (and, with `prefetch`, expanding)
    online_s: float = 0.0  # `private_forward`: the two parties' run


@dataclass(frozen=True)
class SharedModel:
    """A model ready for private inference in one process: its network, both weight shares."""

    net: PrivateNetwork
    weights: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]


def share_model(
    layers: Sequence[dict],
    state: Mapping[str, torch.Tensor],
    input_shape: tuple[int, ...] = (1, 28, 28),
    fp: FixedPoint = DEFAULT_FP,
    comparison: str | None = None,
) -> SharedModel:
    """The private network for a layer list (`comparison`: None for the network's default)
    and both parties' fixed-point shares of the weights in `state`."""
    extra = {} if comparison is None else {"comparison": comparison}
    net = PrivateNetwork(tuple(layers), input_shape, fp, **extra)
    return SharedModel(net, share_tensors({k: v.double() for k, v in state.items()}, fp))


def share_images(x: torch.Tensor, fp: FixedPoint = DEFAULT_FP) -> tuple[torch.Tensor, torch.Tensor]:
    """Both parties' fixed-point shares of a batch of images (or any real tensor)."""
    s0, s1 = share_tensors({"x": x.double()}, fp)
    return s0["x"], s1["x"]


def deal(
    net: PrivateNetwork,
    weights: tuple[dict, dict],
    batch: int,
    dealer: Dealer,
    request_id: str,
    output: Output = "label",
    masks: tuple[WeightMasks, WeightMasks] | None = None,
) -> tuple[Randomness, Randomness]:
    """Both parties' randomness for one forward pass of `batch` images: the plan
    (`PrivateNetwork.plan`, public) dealt under `request_id`."""
    shapes = {k: tuple(v.shape) for k, v in weights[0].items()}
    plan = net.plan(batch, output, shapes, masks[0].mask_id if masks else None)
    return deal_pair(dealer, request_id, plan)


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
    *,
    prefetch: bool = False,
    channels: tuple[Channel, Channel] | None = None,
) -> TwoPartyResult:
    """One private forward pass of `net` on shared `images` with shared `weights`, both parties.

    The outputs are the parties' shares of the label (in the network's `label_sharing`) or
    additive shares of the logits. `masks`: each party's fixed weight masks (one mask id),
    reused across calls. `prefetch`: expand the dealer's material before the run starts, as a
    replica does ahead of a request, so `online_s` times the protocol alone. `channels`: as
    for `run_two_party`.
    """
    t0 = time.perf_counter()
    rand0, rand1 = deal(net, weights, images[0].shape[0], dealer, request_id, output, masks)
    if prefetch:
        rand0.prefetch(), rand1.prefetch()
    t1 = time.perf_counter()
    res = run_two_party(
        lambda p: net.forward(
            p, images[p.index], weights[p.index], output, masks[p.index] if masks else None
        ),
        rand0,
        rand1,
        net.fp,
        channels=channels,
    )
    res.online_s, res.dealer_s = time.perf_counter() - t1, t1 - t0
    return res
