"""One-round gates with many inputs (`fanin`) against their clear functions (`anf`), per lane."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from service.mpc import anf, fanin
from service.mpc.dealer import Dealer, Request, deal_pair, validate_plan
from service.mpc.inprocess import run_two_party
from service.mpc.prg import random_ring
from tests.conftest import FP


def _lane(words: torch.Tensor, lane: int) -> np.ndarray:
    """Bit `lane` of every word, as 0/1."""
    return ((words >> lane) & 1).numpy()


def _run(fn, plan, mine0, mine1):
    r0, r1 = deal_pair(Dealer(), "fanin", plan)
    res = run_two_party(lambda p: fn(p, mine0 if p.index == 0 else mine1), r0, r1, FP)
    assert r0.exhausted and r1.exhausted
    return res


def test_the_tables_are_the_functions_they_name():
    for a in range(16):
        for b in range(16):
            assert anf.CARRY4(a, b) == (int(a + b >= 16), int(a ^ b == 15))
    for v in range(256):
        g, p = [v >> i & 1 for i in range(4)], [v >> (4 + i) & 1 for i in range(4)]
        if any(gi & pi for gi, pi in zip(g, p, strict=True)):
            continue  # a carry group never both generates and propagates
        carry = 0
        for i in range(4):  # ripple through the four groups, lowest first
            carry = g[i] | (p[i] & carry)
        assert anf.GP4(v) == (carry, int(all(p)))
    assert len(anf.GP4.subsets) == 22 and len(anf.G4.subsets) == 15


def test_the_arithmetic_top_is_the_sign_bit_as_an_integer_for_every_mask():
    """lt2: sum_R coefficients[v][R] Lambda_R = m ^ (G_hi ^ P_hi G_lo) for every valid input u
    and every opening v = u ^ lambda, with 10 mask sets and small coefficients."""
    fn = anf.LT2
    sets = np.array(fn.subsets)
    assert fn.subsets[0] == 0 and len(sets) == 10 and np.abs(fn.coefficients).max() <= 4
    lam = np.arange(16)
    products = ((lam[:, None] & sets[None, :]) == sets[None, :]).astype(np.int64)  # [lambda, R]
    for u in range(16):
        g_lo, g_hi, p_hi, m = (u >> i & 1 for i in range(4))
        if g_hi and p_hi:
            continue  # a carry group never both generates and propagates
        got = (fn.coefficients[u ^ lam] * products).sum(axis=1)
        assert (got == m ^ (g_hi ^ (p_hi & g_lo))).all(), u


def test_gp8_joins_eight_groups_like_a_ripple():
    rng = np.random.default_rng(7)
    for v in rng.integers(0, 1 << 16, 2000).tolist():
        g, p = [v >> i & 1 for i in range(8)], [v >> (8 + i) & 1 for i in range(8)]
        g = [gi & (1 - pi) for gi, pi in zip(g, p, strict=True)]  # valid: never both
        v = sum(gi << i for i, gi in enumerate(g)) | sum(pi << (8 + i) for i, pi in enumerate(p))
        carry = 0
        for i in range(8):
            carry = g[i] | (p[i] & carry)
        assert anf.GP8(v) == (carry, int(all(p)))


@pytest.mark.parametrize("words", [1, 3])
def test_cross_carry4_on_every_lane(words):
    # party 0's bits a and party 1's bits b, [4, groups, words], random in every lane
    groups = 4
    a, b = random_ring((4, groups, words)), random_ring((4, groups, words))
    res = _run(
        lambda p, bits: fanin.cross(p, bits, "carry4")[0],
        (Request.cross("carry4", (groups, words)),),
        a,
        b,
    )
    out = res.out0 ^ res.out1
    assert out.shape == (2, groups, words)
    for lane in (0, 1, 31, 63):
        av, bv = _lane(a, lane), _lane(b, lane)
        for g in range(groups):
            for w in range(words):
                x = sum(int(av[i, g, w]) << i for i in range(4))
                y = sum(int(bv[i, g, w]) << i for i in range(4))
                assert (_lane(out, lane)[:, g, w] == anf.CARRY4(x, y)).all()
    # one round; per party: the 15 monomials of a that are coefficients (of G or P) for its
    # a-side half and the 15 nonempty monomials of b for its b-side half
    assert anf.CARRY4.support == tuple(range(1, 16))
    assert res.stats0.rounds == 1
    assert res.stats0.bytes_sent == res.stats1.bytes_sent == 8 * 30 * (groups // 2) * words


@given(st.sampled_from(sorted(anf.MASKED)), st.integers(1, 3), st.integers(0, 2**32))
def test_masked_gates_on_xor_shared_inputs(name, words, seed):
    fn = anf.MASKED[name]
    gen = torch.Generator().manual_seed(seed)
    u = torch.randint(-(2**63), 2**63 - 1, (fn.inputs, 2, words), generator=gen)
    share0 = torch.randint(-(2**63), 2**63 - 1, u.shape, generator=gen)
    if name == "gp4":  # valid carry inputs only: a group never both generates and propagates
        u[:4] &= ~u[4:]
    if name == "g4":
        u[1:4] &= ~u[4:]
    res = _run(
        lambda p, s: fanin.masked(p, s, name)[0],
        (Request.mand(name, u.shape),),
        share0,
        share0 ^ u,
    )
    out = res.out0 ^ res.out1
    for lane in (0, 7, 63):
        bits = _lane(u, lane)
        for m in range(2):
            for w in range(words):
                v = sum(int(bits[i, m, w]) << i for i in range(fn.inputs))
                assert tuple(_lane(out, lane)[:, m, w]) == fn(v)
    assert res.stats0.rounds == 1 and res.stats0.bytes_sent == 8 * u.numel()


def test_ride_along_openings_share_the_round():
    x = random_ring((5,))
    bits = random_ring((4, 2, 1))
    r0, r1 = deal_pair(Dealer(), "ride", (Request.cross("carry4", (2, 1)),))
    res = run_two_party(
        lambda p: fanin.cross(p, bits, "carry4", [x if p.index == 0 else -x + 1])[1][0],
        r0,
        r1,
        FP,
    )
    assert res.out0.tolist() == res.out1.tolist() == [1] * 5
    assert res.stats0.rounds == 1


def test_party_0_gets_only_a_seed_and_party_1_the_products():
    plan = (Request.cross("carry4", (16, 2)), Request.mand("gp4", (8, 4, 2)))
    dealer = Dealer()
    m0, m1 = dealer.deal("s", 0, plan), dealer.deal("s", 1, plan)
    assert m0.corrections == []
    assert [tuple(c.shape) for c in m1.corrections] == [(2, 16, 2), (22, 4, 2)]
    assert m0.nbytes == m1.nbytes - 8 * (2 * 16 * 2 + 22 * 4 * 2)


@pytest.mark.parametrize(
    "req",
    [
        Request("cross", ((16, 2),), ("gp4",)),  # not a cross function
        Request("cross", ((15, 2),), ("carry4",)),  # odd number of groups
        Request("mand", ((7, 4, 2),), ("gp4",)),  # gp4 has 8 inputs
        Request("mand", ((8, 4, 2),), ("and99",)),
        Request("mand", ((8, 4, 2),), ()),
        Request("mand", ((8, 4, 2),), (["gp4"],)),  # params are names and integers only
    ],
)
def test_malformed_gate_requests_are_refused(req):
    with pytest.raises(ValueError):
        validate_plan((req,))


def test_a_gate_asks_the_dealer_for_the_shape_it_runs_on():
    plan = (Request.mand("g4", (7, 1, 1)),)
    r0, r1 = deal_pair(Dealer(), "shape", plan)
    with pytest.raises(Exception, match="plan"):
        run_two_party(
            lambda p: fanin.masked(p, torch.zeros((7, 2, 1), dtype=torch.int64), "g4"),
            r0,
            r1,
            FP,
        )


def test_a_cross_function_must_be_symmetric_because_the_parties_swap_roles():
    with pytest.raises(AssertionError, match="f\\(a, b\\) must equal f\\(b, a\\)"):
        anf._cross("asym", 1, 1, lambda a, b: (a & (1 - b),))


def test_cross_with_a_constant_term_and_no_coefficient_to_send(monkeypatch):
    # f = a0 a1 ^ b0 b1: the a side's only term is its constant, b0 b1's coefficient is 1,
    # so the a side sends nothing and the b side its 3 monomials
    fn = anf._cross("pairs", 2, 1, lambda a, b: (int(a == 3) ^ int(b == 3),))
    assert fn.support == () and fn.constant == (3,)
    monkeypatch.setitem(anf.CROSS, "pairs", fn)
    a, b = random_ring((2, 2, 1)), random_ring((2, 2, 1))
    res = _run(
        lambda p, bits: fanin.cross(p, bits, "pairs")[0],
        (Request.cross("pairs", (2, 1)),),
        a,
        b,
    )
    out = res.out0 ^ res.out1
    for lane in (0, 9, 63):
        av, bv = _lane(a, lane), _lane(b, lane)
        for g in range(2):
            x = int(av[0, g, 0]) | int(av[1, g, 0]) << 1
            y = int(bv[0, g, 0]) | int(bv[1, g, 0]) << 1
            assert _lane(out, lane)[0, g, 0] == fn(x, y)[0]
    assert res.stats0.bytes_sent == 8 * 3  # one slice pair: 0 + 3 words


def test_the_dealer_deals_the_gates_correlations():
    plan = (Request.cross("carry4", (4, 2)), Request.mand("gp4", (8, 3, 2)))
    r0, r1 = deal_pair(Dealer(), "corr", plan)
    c0, c1 = r0.take(plan[0]), r1.take(plan[0])
    z = c0["z"] ^ c1["z"]
    # half 0: party 0 holds a (its x), party 1 holds b (its y); half 1 the other way round
    for half, (x, y) in enumerate(((c0["x"], c1["y"]), (c1["x"], c0["y"]))):
        table = torch.cat([torch.zeros((2, *x.shape[1:]), dtype=x.dtype), x])  # rows 0, 1: no x
        for o, rows in enumerate(anf.CARRY4.rows):
            want = torch.zeros_like(y[0])
            for t, row in enumerate(rows):
                want ^= table[row] & y[t]
            assert torch.equal(z[o, 2 * half : 2 * half + 2], want)
    m0, m1 = r0.take(plan[1]), r1.take(plan[1])
    lam, products = m0["lam"] ^ m1["lam"], m0["L"] ^ m1["L"]
    for j, subset in enumerate(anf.GP4.subsets):
        want = torch.full_like(lam[0], -1)
        for i in range(8):
            if subset >> i & 1:
                want &= lam[i]
        assert torch.equal(products[j], want)
