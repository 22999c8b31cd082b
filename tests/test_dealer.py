"""The dealer: seed compression, once-only service, plan checking, and the material's sizes."""

import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from service.api.schemas import REQUEST_ID_PATTERN
from service.mpc.dealer import (
    Dealer,
    PlanMismatch,
    Randomness,
    RandomnessReused,
    Request,
    RunIdOutOfWindow,
    carry_spec,
    deal_pair,
    new_run_id,
    run_id_time,
    validate_plan,
)
from service.mpc.ring import from_plane

PLAN = (
    Request.beaver("matmul", (2, 3), (3, 4)),
    Request.and_((5,)),
    Request.trunc((6,), 16, nonneg=True),  # r_msb: the ReLU side's truncation
    Request.mux((7,)),
)


def _draw_all(plan=PLAN):
    r0, r1 = deal_pair(Dealer(), "req", plan)
    return [(r0.take(q), r1.take(q)) for q in plan]


def test_correlations_hold():
    (b0, b1), (a0, a1), (t0, t1), (m0, m1) = _draw_all()
    full = {k: b0[k] + b1[k] for k in b0}
    assert torch.equal(full["c"], full["a"] @ full["b"])
    a, b, c = (a0[k] ^ a1[k] for k in ("a", "b", "c"))
    assert torch.equal(c, a & b)
    r = t0["r"] + t1["r"]
    assert torch.equal(t0["r_hi"] + t1["r_hi"], (r >> 16) & ((1 << 48) - 1))
    assert torch.equal(t0["r_msb"] + t1["r_msb"], (r >> 63) & 1)
    # the low borrow's gate: ring shares of the AND of its masks (XOR-shared bit planes) per set
    spec = carry_spec(16)
    lam = t0["clam"] ^ t1["clam"]
    bits = torch.stack([from_plane(lam[i], (6,)) for i in range(spec.inputs)])
    for row, mask in enumerate(spec.sets):
        want = bits[[i for i in range(spec.inputs) if mask >> i & 1]].prod(0)
        assert torch.equal(t0["cL"][row] + t1["cL"][row], want)
    rb = from_plane(m0["rb"] ^ m1["rb"], (7,))  # one bit per element, dealt as a bit plane
    assert m0["rb"].shape == (1,) and set(rb.tolist()) <= {0, 1}
    assert torch.equal(m0["r"] + m1["r"], rb)
    assert torch.equal(m0["ar"] + m1["ar"], (m0["a"] + m1["a"]) * rb)


def test_bit_injection_material_is_the_same_bits_as_planes_and_as_ring_shares():
    shape = (3, 70)  # more than one word of planes
    (b0, b1), *_ = _draw_all((Request.b2a(shape, 2),))
    assert b0["rl"].shape == (2, 4) and b0["ra"].shape == (2, *shape)
    rl = b0["rl"] ^ b1["rl"]
    for i in range(2):
        want = from_plane(rl[i], shape)
        assert torch.equal(b0["ra"][i] + b1["ra"][i], want)
        assert 0.3 < want.double().mean() < 0.7  # random bits, not constants
    with pytest.raises(ValueError, match="b2a"):
        validate_plan((Request("b2a", ((4,),), (0,)),))


def test_party0_gets_only_a_seed_and_party1_only_corrections():
    dealer = Dealer()
    m0, m1 = dealer.deal("x", 0, PLAN), dealer.deal("x", 1, PLAN)
    # a seed and the dealer's public instance id
    assert m0.corrections == [] and m0.nbytes == 32 + 16
    # party 1: c (2x4), and-c (5), r_hi + r_msb (2x6), the low borrow's tables (6 x 8: two
    # 8-bit slices) and products (4 sets x 6), r + ar (2x7) words
    assert m1.nbytes == 32 + 16 + 8 * (8 + 5 + 12 + 48 + 24 + 14)
    assert m0.dealer == m1.dealer == dealer.instance and Dealer().instance != dealer.instance


def test_a_request_id_is_served_once_per_party():
    dealer = Dealer()
    dealer.deal("once", 0, PLAN)
    dealer.deal("once", 1, PLAN)
    with pytest.raises(RandomnessReused, match="already served"):
        dealer.deal("once", 0, PLAN)
    with pytest.raises(RandomnessReused):
        dealer.deal("once", 1, PLAN)


def test_run_ids_carry_their_minting_time():
    rid = new_run_id(1_718_000_000.9)
    assert re.fullmatch(r"1718000000-[A-Za-z0-9_-]{22}", rid) and re.match(REQUEST_ID_PATTERN, rid)
    assert run_id_time(rid) == 1_718_000_000 and run_id_time(new_run_id(0)) == 0
    assert new_run_id(5) != new_run_id(5)  # the random part
    for timeless in ("4fJx0v1bQk2m9Zr7TtYw3A", "171800000-abc", "17180000000-abc", "1718000000-"):
        assert run_id_time(timeless) is None


class _Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_a_windowed_dealer_refuses_old_future_and_timeless_run_ids():
    clock = _Clock(1_000_000.0)
    dealer = Dealer(window_s=600, clock=clock)
    plan = PLAN[:1]
    for t in (1_000_000 - 600, 1_000_000, 1_000_000 + 600):  # the window's edges are in
        dealer.deal(new_run_id(t), 0, plan)
    for t, why in ((1_000_000 - 601, "s old"), (1_000_000 + 601, "in the future")):
        with pytest.raises(RunIdOutOfWindow, match=why):
            dealer.deal(new_run_id(t), 0, plan)
    with pytest.raises(RunIdOutOfWindow, match="carries no time"):
        dealer.deal("4fJx0v1bQk2m9Zr7TtYw3A", 0, plan)


def test_a_windowed_dealer_serves_once_and_forgets_ids_that_leave_the_window():
    clock = _Clock(1_000_000.0)
    dealer = Dealer(window_s=600, clock=clock)
    plan = PLAN[:1]
    rid = new_run_id(clock.now)
    dealer.deal(rid, 0, plan)
    dealer.deal(rid, 1, plan)
    clock.now += 600  # still in the window: still remembered, still refused
    with pytest.raises(RandomnessReused, match="already served"):
        dealer.deal(rid, 0, plan)
    assert dealer.remembered == 2
    clock.now += 1  # out of the window: forgotten, and refused as too old
    with pytest.raises(RunIdOutOfWindow, match="s old"):
        dealer.deal(rid, 1, plan)
    assert dealer.remembered == 0
    clock.now -= 300  # a clock stepped back does not readmit the forgotten id
    with pytest.raises(RunIdOutOfWindow):
        dealer.deal(rid, 0, plan)


def test_a_windowed_dealers_memory_stays_bounded_under_steady_load():
    """100 runs a second for 20 windows: the dealer holds at most 2 windows' worth of ids."""
    clock = _Clock(1_000_000.0)
    dealer = Dealer(window_s=10, clock=clock)
    most = 0
    for _ in range(200):
        for _ in range(100):
            dealer.deal(new_run_id(clock.now), 0, PLAN[1:2])
        most = max(most, dealer.remembered)
        clock.now += 1
    assert 100 * 10 <= most <= 100 * 2 * 10 + 100


@given(
    st.lists(
        st.tuples(
            st.floats(-30, 30), st.integers(-25, 25), st.integers(0, 9), st.sampled_from([0, 1])
        ),
        max_size=60,
    )
)
def test_a_windowed_dealer_never_serves_a_run_id_twice(steps):
    """Against a model: clock moves (back too), ids of any age, repeats. Each (id, party) is
    served at most once; an id is served iff it is new and within the window of a floor that
    only rises; what the dealer remembers is only ids within the window."""
    clock = _Clock(1_000_000.0)
    dealer = Dealer(window_s=10, clock=clock)
    served: set[tuple[str, int]] = set()
    floor = float("-inf")
    ids = [new_run_id(0)[10:] for _ in range(10)]  # random tails, reused with several times
    for move, age, which, party in steps:
        clock.now += move
        floor = max(floor, clock.now - 10)
        t = int(clock.now) + age
        rid = f"{t:010d}{ids[which]}"
        fresh = (rid, party) not in served and floor <= t <= clock.now + 10
        try:
            dealer.deal(rid, party, PLAN[1:2])
            assert fresh, (rid, party)
            served.add((rid, party))
        except (RandomnessReused, RunIdOutOfWindow):
            assert not fresh, (rid, party)
        remembered = {(r, p) for r, p in served if run_id_time(r) >= floor}
        assert dealer.remembered == len(remembered)


def test_randomness_is_consumed_once_and_in_plan_order():
    r0, _ = deal_pair(Dealer(), "r", PLAN)
    with pytest.raises(PlanMismatch):
        r0.take(PLAN[1])
    for q in PLAN:
        r0.take(q)
    assert r0.exhausted
    with pytest.raises(RandomnessReused, match="past its plan"):
        r0.take(PLAN[0])


def test_material_cannot_be_drawn_twice_through_one_randomness():
    dealer = Dealer()
    material = dealer.deal("m", 0, PLAN[:1])
    rand = Randomness(material)
    rand.take(PLAN[0])
    with pytest.raises(RandomnessReused):
        rand.take(PLAN[0])


def test_different_requests_get_independent_randomness():
    dealer = Dealer()
    plan = (Request.and_((1000,)),)
    a, _ = deal_pair(dealer, "one", plan)
    b, _ = deal_pair(dealer, "two", plan)
    ta, tb = a.take(plan[0]), b.take(plan[0])
    assert not torch.equal(ta["a"], tb["a"])
    # no 64-bit mask value repeats inside or across requests
    words = torch.cat([ta["a"], ta["b"], tb["a"], tb["b"]])
    assert words.unique().numel() == words.numel()


def test_two_dealers_with_the_same_key_agree_and_fresh_keys_differ():
    key = bytes(32)
    m1 = Dealer(key).deal("id", 1, PLAN)
    m2 = Dealer(key).deal("id", 1, PLAN)
    assert m1.seed == m2.seed and all(map(torch.equal, m1.corrections, m2.corrections))
    assert Dealer().deal("id", 1, PLAN).seed != m1.seed


def test_bad_calls_are_refused():
    with pytest.raises(ValueError):
        Dealer().deal("", 0, PLAN)
    with pytest.raises(ValueError):
        Dealer().deal("id", 2, PLAN)
    with pytest.raises(ValueError, match="unknown"):
        Dealer().deal("id", 1, (Request("sqrt", ((1,),)),))


def test_prefetched_randomness_is_the_same_and_still_once_only():
    dealer = Dealer(bytes(32))
    lazy = [Randomness(dealer.deal("p", i, PLAN)) for i in (0, 1)]
    again = Dealer(bytes(32))
    eager = [Randomness(again.deal("p", i, PLAN)).prefetch() for i in (0, 1)]
    for q in PLAN:
        for lz, eg in zip(lazy, eager, strict=True):
            a, b = lz.take(q), eg.take(q)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(RandomnessReused):
        eager[0].take(PLAN[0])
    with pytest.raises(RandomnessReused, match="prefetch"):
        eager[1].prefetch()


def test_select_with_a_weight_deals_products_with_the_fixed_weight_mask():
    """muxw: the mux correlations plus [rb_j b_jk], [a_j b_jk], [a_j rb_j b_jk] for the weight's
    fixed mask b, the same b that `beaverw` uses for that weight; sizes follow the plan."""
    from service.api.transport import wire

    dealer = Dealer()
    sel = Request.muxw((3, 5), (5, 2), "model1", "fc2.weight")
    lin = Request.beaverw("matmul", (3, 5), (5, 2), (), "model1", "fc2.weight")
    plan = (sel, lin)
    validate_plan(plan)
    r0, r1 = deal_pair(dealer, "mw", plan)
    s0, s1 = r0.take(sel), r1.take(sel)
    l0, l1 = r0.take(lin), r1.take(lin)
    b = s0["b"] + s1["b"]
    assert torch.equal(b, l0["b"] + l1["b"])  # one fixed mask per (model, weight)
    rb, a = from_plane(s0["rb"] ^ s1["rb"], (3, 5)), s0["a"] + s1["a"]
    assert torch.equal(s0["r"] + s1["r"], rb) and torch.equal(s0["ar"] + s1["ar"], a * rb)
    for name, v in (("rbw", rb), ("aw", a), ("arw", a * rb)):
        assert torch.equal(s0[name] + s1[name], v.unsqueeze(-1) * b.unsqueeze(0))
    for party in (0, 1):
        m = dealer.deal("mw2", party, plan)
        assert len(m.mask_seeds) == 2
        back = wire.material_from_bytes(wire.material_to_bytes(m), "mw2", party, plan)
        assert back.mask_seeds == m.mask_seeds
        assert [c.shape for c in back.corrections] == [c.shape for c in m.corrections]
    # party 1: r, ar (2 x 15), three products (3 x 30), beaverw c (3 x 2) words
    assert dealer.deal("mw3", 1, plan).nbytes == 32 + 16 + 2 * 32 + 8 * (30 + 90 + 6)


def test_the_kept_weight_mask_is_each_weights_own_on_every_later_deal(monkeypatch):
    """The dealer keeps each fixed mask b (`Dealer._mask`) instead of expanding it per deal:
    later deals still give c = a @ b with b the sum of the parties' mask shares, for each
    (mask id, weight, shape) its own b, and at most MASK_WORDS_KEPT words of masks are kept."""
    from service.mpc import dealer as dealer_mod

    monkeypatch.setattr(dealer_mod, "MASK_WORDS_KEPT", 20)  # two of the masks below
    dealer = Dealer()
    reqs = [
        Request.beaverw("matmul", (3, 5), (5, 2), (), "model1", "fc2.weight"),
        Request.beaverw("matmul", (3, 5), (5, 2), (), "model2", "fc2.weight"),
        Request.beaverw("matmul", (3, 4), (4, 2), (), "model1", "fc1.weight"),
    ]
    masks = []
    for run in range(3):  # the first deal of each mask, then kept (or dropped and rebuilt)
        for i, req in enumerate(reqs):
            r0, r1 = deal_pair(dealer, f"kept-{run}-{i}", (req,))
            t0, t1 = r0.take(req), r1.take(req)
            b = t0["b"] + t1["b"]
            assert torch.equal(t0["c"] + t1["c"], (t0["a"] + t1["a"]) @ b), (run, i)
            if run == 0:
                masks.append(b)
            assert torch.equal(b, masks[i]), (run, i)  # fixed per (mask id, weight)
            assert sum(m.numel() for m in dealer._masks.values()) <= 20
    assert not torch.equal(masks[0], masks[1])  # another model's mask for the same weight


@pytest.mark.parametrize(
    "shapes, params",
    [
        (((3, 5), (4, 2)), ("m", "w")),  # inner sizes differ
        (((3, 5, 1), (5, 2)), ("m", "w")),  # rows must be flat
        (((3, 5), (5, 2)), ("m",)),  # no weight name
        (((3, 5), (5, 2)), ("bad id!", "w")),
        (((3, 5), (5, 2)), ("m", 7)),
    ],
)
def test_bad_select_with_a_weight_requests_are_refused(shapes, params):
    with pytest.raises(ValueError, match=r"muxw|params"):
        validate_plan((Request("muxw", shapes, params),))


def test_zero_test_material_scales_mask_products_by_secret_rho_in_z_p():
    """zmax: XOR-shared masks as bit planes; in Z_p, rho_j Lambda_R and rho_i Lambda_R per
    comparison (i, j) and rho_k per class, rho uniform on 1..p-1 and fresh per request."""
    from service.mpc import anf
    from service.mpc.dealer import pairs
    from service.mpc.ring import PRIME

    rows, n = 70, 4
    req = Request.zmax("lt2", (rows, n))
    validate_plan((req,))
    fn, (iu, ju) = anf.ARITH["lt2"], pairs(n)
    draws = []
    for rid in ("z1", "z2"):
        r0, r1 = deal_pair(Dealer(), rid, (req,))
        t0, t1 = r0.take(req), r1.take(req)
        assert t0["lam"].shape == (4, 7)  # 70 x 6 comparisons in 64-lane words
        for k in ("X", "Y", "rho"):
            assert ((t0[k] >= 0) & (t0[k] < PRIME) & (t1[k] >= 0) & (t1[k] < PRIME)).all()
        rho = (t0["rho"] + t1["rho"]) % PRIME
        assert rho.shape == (rows, n) and (rho > 0).all()
        lam = t0["lam"] ^ t1["lam"]
        bits = torch.stack([from_plane(lam[i], (rows * len(iu),)) for i in range(4)])
        packed = (bits << torch.arange(4).unsqueeze(1)).sum(0).reshape(rows, -1, 1)
        sets = torch.tensor(fn.subsets[1:])
        products = ((packed & sets) == sets).long()
        assert torch.equal((t0["X"] + t1["X"]) % PRIME, products * rho[:, ju, None] % PRIME)
        assert torch.equal((t0["Y"] + t1["Y"]) % PRIME, products * rho[:, iu, None] % PRIME)
        draws.append(rho)
    assert not torch.equal(draws[0], draws[1])
    assert len(draws[0].unique()) > rows * n * 0.9  # spread over 1..p-1, not a few values


@pytest.mark.parametrize(
    "req",
    [
        Request("zmax", ((3, 10),), ("g4",)),  # not an arithmetic function
        Request("zmax", ((3, 1),), ("lt2",)),  # one class needs no test
        Request("zmax", ((3, 11),), ("lt2",)),
        Request("zmax", ((30,),), ("lt2",)),
        Request("zmax", ((3, 10),), ()),
    ],
)
def test_bad_zero_test_requests_are_refused(req):
    with pytest.raises(ValueError, match="zmax"):
        validate_plan((req,))
