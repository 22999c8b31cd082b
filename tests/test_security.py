"""What one party sees is independent of the secret.

Party 0's whole view (every tensor it receives) is recorded while it computes ReLU, and argmax,
on two different secrets. Every element carries fresh randomness, so a batch of N copies of one
secret is N independent runs. For each received tensor and each bit position the fraction of
ones must be the same under both secrets (two-proportion z-test, Bonferroni-bounded). A negative
control shows the test catches a leak as small as one bit.
"""

from __future__ import annotations

import json
import math
from functools import partial

import httpx
import pytest
import torch

from service.mpc import beaver, comparison, lut
from service.mpc.beaver import WeightMasks
from service.mpc.channel import InMemoryChannel, NullChannel
from service.mpc.dealer import Dealer, PlanRecorder, Request, deal_pair
from service.mpc.inprocess import run_two_party
from service.mpc.party import Party
from service.mpc.sharing import share
from tests.conftest import FP

N = 4000
Z_LIMIT = 6.0  # ~2e-9 per test; a few thousand tests per run


class RecordingChannel(InMemoryChannel):
    def __init__(self, inner: InMemoryChannel) -> None:
        self.__dict__.update(inner.__dict__)
        self.view: list[torch.Tensor] = []

    def exchange(self, tensors):
        received = super().exchange(tensors)
        self.view.extend(t.clone() for t in received)
        return received


def _view_of_party0(fn, secret: torch.Tensor) -> list[torch.Tensor]:
    x0, x1 = share(secret)
    recorder = PlanRecorder()
    fn(Party(0, NullChannel(), recorder, FP), x0)  # type: ignore[arg-type]
    r0, r1 = deal_pair(Dealer(), "view", tuple(recorder.plan))
    a, b = InMemoryChannel.pair()
    rec = RecordingChannel(a)
    run_two_party(lambda p: fn(p, x0 if p.index == 0 else x1), r0, r1, FP, channels=(rec, b))
    return [*rec.view, x0]  # party 0's own input share is part of its view too


def _bit_fractions(view: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (received tensor, bit position): fraction of ones over its elements, and the count."""
    fractions, counts = [], []
    for t in view:
        flat = t.reshape(-1)
        bits = (flat.unsqueeze(-1) >> torch.arange(64)) & 1
        fractions.append(bits.sum(dim=0).double() / flat.numel())
        counts.append(torch.full((64,), flat.numel(), dtype=torch.float64))
    return torch.cat(fractions), torch.cat(counts)


def _max_z(view_a, view_b) -> float:
    (pa, n), (pb, _) = _bit_fractions(view_a), _bit_fractions(view_b)
    pooled = (pa + pb) / 2
    se = torch.sqrt(pooled * (1 - pooled) * 2 / n)
    z = torch.where(se > 0, (pa - pb).abs() / se.clamp(min=1e-12), (pa - pb).abs() * math.inf)
    return float(torch.nan_to_num(z, nan=0.0).max())


def _secret(value: float, width: int) -> torch.Tensor:
    return FP.encode(torch.full((N, width), value, dtype=torch.float64))


PROTOCOLS = {"a2b": comparison, "lut": lut}  # the comparison protocols built on these openings


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_relu_view_does_not_depend_on_the_sign_or_value(protocol):
    relu = lambda p, x: PROTOCOLS[protocol].relu(p, x, 16)  # noqa: E731
    view_pos = _view_of_party0(relu, _secret(3.25, 1) << 16)
    view_neg = _view_of_party0(relu, _secret(-1000.5, 1) << 16)
    assert len(view_pos) == len(view_neg) >= 3  # at least one message per round
    assert _max_z(view_pos, view_neg) < Z_LIMIT


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_argmax_view_does_not_depend_on_the_label(protocol):
    argmax = PROTOCOLS[protocol].argmax
    rows = 1000
    logits_a = torch.zeros(rows, 10, dtype=torch.int64)
    logits_b = torch.zeros(rows, 10, dtype=torch.int64)
    logits_a[:, 2] = 1 << 20
    logits_b[:, 7] = 1 << 30
    view_a = _view_of_party0(argmax, logits_a)
    view_b = _view_of_party0(argmax, logits_b)
    assert _max_z(view_a, view_b) < Z_LIMIT


def test_the_statistic_catches_a_one_bit_leak():
    # Negative control: a view that carries the sign bit in the clear must fail the test.
    pos, neg = _secret(3.25, 1), _secret(-3.25, 1)
    noise = share(torch.zeros(N, 1, dtype=torch.int64))[0]
    leak_a, leak_b = [noise, (pos >> 63) & 1], [noise, (neg >> 63) & 1]
    assert _max_z(leak_a, leak_b) > Z_LIMIT


# With the input shares held fixed, everything a party receives must be fresh uniform words:
# the peer's value XOR (or minus) dealer randomness that is new in every run. This is the
# simulation argument itself, and it also catches what the two-secret test above cannot: a
# share sent unmasked is uniform by itself (so its bit fractions match under both secrets),
# but with the shares fixed it is the same word in every run.
RUNS = 200


def _fixed_share_views(
    fn, x0: torch.Tensor, x1: torch.Tensor, party: int, dealer: Dealer | None = None
) -> torch.Tensor:
    """[RUNS, words]: everything `party` receives, run after run on the same shares."""
    recorder = PlanRecorder()
    fn(Party(0, NullChannel(), recorder, FP), x0)  # type: ignore[arg-type]
    dealer, runs = dealer or Dealer(), []
    for i in range(RUNS):
        r0, r1 = deal_pair(dealer, f"fixed-{party}-{i}", tuple(recorder.plan))
        pair = list(InMemoryChannel.pair())
        rec = pair[party] = RecordingChannel(pair[party])
        run_two_party(lambda p: fn(p, x0 if p.index == 0 else x1), r0, r1, FP, channels=tuple(pair))
        runs.append(torch.cat([t.reshape(-1) for t in rec.view]))
    return torch.stack(runs)


def _max_z_over_runs(views: torch.Tensor) -> float:
    """Largest deviation from 1/2 of any bit of any received word, over the runs (z-score)."""
    ones = ((views.unsqueeze(-1) >> torch.arange(64)) & 1).double().mean(dim=0)
    return float(((ones - 0.5).abs() / math.sqrt(0.25 / views.shape[0])).max())


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_with_fixed_shares_every_received_word_is_fresh(protocol):
    cmp = PROTOCOLS[protocol]
    relu = lambda p, x: cmp.relu(p, x, 16)  # noqa: E731
    logits = torch.zeros(3, 10, dtype=torch.int64)
    logits[:, 4] = 1 << 20
    for fn, secret in ((relu, _secret(-3.25, 1)[:70] << 16), (cmp.argmax, logits)):
        x0, x1 = share(secret)
        for party in (0, 1):
            views = _fixed_share_views(fn, x0, x1, party)
            assert views.shape[1] > 100
            assert _max_z_over_runs(views) < Z_LIMIT, (fn, party)


def test_with_fixed_shares_the_relu_fused_with_a_linear_layer_receives_only_fresh_words():
    """The last ReLU and the layer after it in one round (`beaver.select_linear`): after the
    weight's one opening (W - b, the same every time by design, see `beaver`), every word a
    party receives is fresh."""
    dealer, w = Dealer(), share(FP.encode(torch.linspace(-2, 2, 30).reshape(10, 3)))
    masks = (WeightMasks("sec"), WeightMasks("sec"))

    def fused(p: Party, x: torch.Tensor) -> torch.Tensor:
        sel = partial(beaver.select_linear, w=w[p.index], name="w", masks=masks[p.index])
        return comparison.relu(p, x, 16, select=sel)

    x0, x1 = share((_secret(-3.25, 1)[:70] << 16).reshape(7, 10))
    recorder = PlanRecorder()
    fused(Party(0, NullChannel(), recorder, FP), x0)  # type: ignore[arg-type]
    masks[0].opened.clear()  # the dry run "opened" zeros; the first real run opens W - b
    r0, r1 = deal_pair(dealer, "warm-up", tuple(recorder.plan))
    run_two_party(lambda p: fused(p, x0 if p.index == 0 else x1), r0, r1, FP)
    assert torch.equal(masks[0].opened["w"], masks[1].opened["w"])
    for party in (0, 1):
        views = _fixed_share_views(fused, x0, x1, party, dealer)
        assert views.shape[1] > 100
        assert _max_z_over_runs(views) < Z_LIMIT, party


def test_the_fixed_share_statistic_catches_an_unmasked_share():
    # Negative control: a round that sends party 1's share as it is must fail the test,
    # although that share is uniform on its own.
    def leaky(p: Party, x: torch.Tensor) -> torch.Tensor:
        t = p.rand.take(Request.and_(x.shape))  # fresh randomness alongside, as a protocol has
        (theirs,) = p.channel.exchange([x])
        return theirs ^ t["a"]

    x0, x1 = share(_secret(-3.25, 1)[:70])
    assert _max_z_over_runs(_fixed_share_views(leaky, x0, x1, 0)) > Z_LIMIT


# -- identity: the dealer serves party p's material to party p only -----------------------------


def _served_or_refused(url: str, key: bytes, party: int, plan) -> httpx.Response:
    from service.api import auth, wire
    from service.mpc.dealer import new_run_id

    body = json.dumps(
        {"request_id": new_run_id(), "party": party, "plan": wire.plan_to_json(plan)}
    ).encode()
    headers = {auth.AUTH_HEADER: auth.dealer_tag(key, party, body)}
    return httpx.post(f"{url}/v1/randomness", content=body, headers=headers, timeout=60)


def _weight_plan():
    from service.cluster import DEFAULT_MODEL
    from service.store import load_share

    model = load_share(DEFAULT_MODEL, 0, "lut")
    plan = model.network.plan(1, "label", model.weight_shapes, model.mask_id)
    return model, plan


def test_the_peers_weight_mask_seeds_would_give_away_the_weights():
    """Why the dealer must refuse: the positive control of the attack below, in process.

    A weight's fixed mask b does not depend on the run id, so party 1's mask seeds from any
    fresh run id, added to party 0's own, give b; the replicas open E = W - b once per model,
    and W = E + b."""
    from service.cluster import DEFAULT_MODEL
    from service.mpc.dealer import WEIGHT_MASK_KINDS
    from service.mpc.prg import PRG
    from service.store import load_share

    model0, plan = _weight_plan()
    model1 = load_share(DEFAULT_MODEL, 1, "lut")
    dealer = Dealer()
    own = dealer.deal("an-honest-run-id-00", 0, plan)
    stolen = dealer.deal("a-fresh-run-id-0001", 1, plan)  # what the dealer must never serve
    masked = [r for r in plan if r.kind in WEIGHT_MASK_KINDS]
    assert masked and len(own.mask_seeds) == len(masked)
    for req, s0, s1 in zip(masked, own.mask_seeds, stolen.mask_seeds, strict=True):
        name, shape = str(req.params[-1]), req.shapes[1]
        b0, b1 = PRG(s0).ring(shape), PRG(s1).ring(shape)
        w0, w1 = model0.weights[name].reshape(shape), model1.weights[name].reshape(shape)
        opened = (w0 - b0) + (w1 - b1)  # E, public to both replicas
        assert torch.equal(opened + b0 + b1, w0 + w1)  # the whole weight, in replica 0's hands


def test_replica_cannot_obtain_peer_material(tmp_path):
    """Replica 0, with every credential it holds, asks a real dealer process for party 1's
    material (weight masks included) under fresh run ids: refused, 403 and counted."""
    from service.cluster import Cluster, free_ports
    from service.mpc.dealer import WEIGHT_MASK_KINDS

    _, plan = _weight_plan()
    masks_only = tuple(r for r in plan if r.kind in WEIGHT_MASK_KINDS)
    c = Cluster(ports=free_ports(3), log_dir=tmp_path).prepare()
    c.start_process("dealer")
    try:
        _wait_healthy(c)
        own = c.key("replica-0", "dealer.key")
        assert _served_or_refused(c.dealer_url, own, 0, plan).status_code == 200  # its own: yes
        for wanted in (plan, masks_only):
            r = _served_or_refused(c.dealer_url, own, 1, wanted)
            assert r.status_code == 403 and r.json()["error"]["code"] == "wrong_party", r.text
            for name in ("peer.key", "admin.key"):  # its other keys are no key to the dealer
                r = _served_or_refused(c.dealer_url, c.key("replica-0", name), 1, wanted)
                assert r.status_code == 401, r.text
        metrics = httpx.get(f"{c.dealer_url}/metrics", timeout=10).text
        assert 'privdigit_dealer_refused_total{code="wrong_party"} 2.0' in metrics
        assert 'privdigit_dealer_served_total{party="1"}' not in metrics
    finally:
        c.stop()


def _wait_healthy(c) -> None:
    import time

    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{c.dealer_url}/v1/health", timeout=2, verify=c.verify).is_success:
                return
        except httpx.HTTPError:
            pass
        assert c.procs["dealer"].poll() is None, c.tail("dealer")
        assert time.monotonic() < deadline, c.tail("dealer")
        time.sleep(0.1)
