"""Comparison by table lookup (`lut`): the sign exact on the whole ring, the lookups at the
slices' edges, rounds and bytes, the dealer's tables and zero-test material, what a party sees,
and the network. ReLU, argmax and max pooling against torch: tests/test_comparison.py, for both
a2b and lut."""

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from service.mpc import anf, lut
from service.mpc.dealer import (
    Dealer,
    Request,
    carry_spec,
    deal_pair,
    pairs,
    slice_layout,
    table_words,
    validate_plan,
)
from service.mpc.inprocess import private_forward, share_images, share_model
from service.mpc.party import Party
from service.mpc.prg import random_ring
from service.mpc.ring import PRIME, from_plane, from_planes_packed
from tests.conftest import FP, opened, opened_xor, run_shared
from tests.test_fss import _images, _model

edge = st.sampled_from([0, 1, -1, 2**63 - 1, -(2**63), -(2**63) + 1, 2**62, -(2**62), 2**16])
ring_values = st.one_of(edge, st.integers(-(2**63), 2**63 - 1))


def _msb(p: Party, x: torch.Tensor) -> torch.Tensor:
    return from_plane(lut.msb_plane(p, x), x.shape)


def test_slices_cover_63_bits_as_equal_as_can_be():
    assert [w for _, w, _ in slice_layout(7)] == [7] * 9
    assert [w for _, w, _ in slice_layout(11)] == [11, 11, 11, 10, 10, 10]
    for w in (7, 11):
        layout = slice_layout(w)
        assert sum(width for _, width, _ in layout) == 63
        assert all(s == sum(x for _, x, _ in layout[:i]) for i, (s, _, _) in enumerate(layout))
    assert table_words(7) == 9 * 2 and table_words(11) == 3 * 32 + 3 * 16


@pytest.mark.parametrize("w", [7, 11])
def test_table_lookups_give_lt_and_eq_of_every_slice_at_its_edges(w):
    """The two lookups per slice, against [c_s < r_s] and [c_s = r_s] in the clear, for opened
    values c whose slices hit 0 (the T[-1] = 1 case), the top of the slice, r_s and r_s +- 1."""
    from service.mpc.dealer import _tables

    layout = slice_layout(w)
    r = random_ring((1,)).repeat(5 * len(layout))
    low = int(r[0]) & (2**63 - 1)
    cs = []
    for shift, width, _ in layout:  # one slice at an edge, the others random
        r_s = low >> shift & (2**width - 1)
        for v in (0, 2**width - 1, r_s, max(r_s - 1, 0), min(r_s + 1, 2**width - 1)):
            c = int(random_ring((1,))[0]) & ~(((2**width) - 1) << shift)
            cs.append(c | v << shift)
    c = torch.tensor(cs, dtype=torch.int64)
    truth = _tables(r, w)
    share0 = random_ring(truth.shape)
    got = [
        lut._lookup(Party(i, None, None, FP), c, t, w)  # type: ignore[arg-type]
        for i, t in enumerate((share0, share0 ^ truth))
    ]
    planes = got[0] ^ got[1]
    n = len(cs)
    for s, (shift, width, _) in enumerate(layout):
        c_s = (c & (2**63 - 1)) >> shift & (2**width - 1)
        r_s = low >> shift & (2**width - 1)
        assert torch.equal(from_plane(planes[s], (n,)), (c_s < r_s).long()), s
        if s:
            eq = from_plane(planes[len(layout) + s - 1], (n,))
            assert torch.equal(eq, (c_s == r_s).long()), s


@given(st.lists(ring_values, min_size=1, max_size=130))
def test_msb_is_exact_on_the_whole_ring(xs):
    x = torch.tensor(xs, dtype=torch.int64)
    result = run_shared(_msb, x)
    assert torch.equal(opened_xor(result), (x < 0).long())
    assert result.stats0.rounds == result.stats1.rounds == 2
    # c (8 bytes per element), then the 17 masked inputs of the 9-slice top as bit planes
    assert result.stats0.bytes_sent == 8 * len(xs) + 8 * 17 * -(-len(xs) // 64)


def test_msb_on_a_large_random_batch():
    x = random_ring((100_000,))
    assert torch.equal(opened_xor(run_shared(_msb, x)), (x < 0).long())


def test_relu_edges_in_the_last_bit_and_at_the_truncation_range():
    x = torch.tensor([0, 1, -1, 2, -2, 2**40, -(2**40), 2**62 - 1, -(2**62)], dtype=torch.int64)
    got = opened(run_shared(lut.relu, x)).tolist()
    assert got == [0, 1, 0, 2, 0, 2**40, 0, 2**62 - 1, 0]
    # with truncation: exact (floor) on the whole ring (`truncation`), past |x| = 2^62 too
    x = torch.cat([x, torch.tensor([2**63 - 1, -(2**63), 2**62 + 2**16 - 1], dtype=torch.int64)])
    t = opened(run_shared(lambda p, a: lut.relu(p, a, 16), x))
    assert torch.equal(t, torch.div(x.clamp(min=0), 2**16, rounding_mode="floor"))


# -- the dealer's material ----------------------------------------------------------------------


def _step_bits(tables: torch.Tensor, w: int) -> list[np.ndarray]:
    """Each slice's table as 0/1 over v = 0..2^width - 1, [elements, 2^width]."""
    out = []
    for _, width, first in slice_layout(w):
        words = tables[:, first : first + max(1, 2**width // 64)].contiguous().numpy()
        bits = np.unpackbits(words.view(np.uint8), axis=1, bitorder="little")
        out.append(bits[:, : 2**width])
    return out


@pytest.mark.parametrize("bits", [0, 16])
def test_lut_material_is_the_step_tables_of_the_mask_and_its_sign(bits):
    """T_s[v] = [v < r_s], m = msb(r) (no offset: the truncation is exact without one), and
    with truncation the `trunc` fields of r and its low borrow's tables; XOR shares, fresh."""
    req = Request.lut((3, 50), 7, bits)
    validate_plan((req,))
    seen = []
    for rid in ("l1", "l2"):
        r0, r1 = deal_pair(Dealer(), rid, (req,))
        t0, t1 = r0.take(req), r1.take(req)
        r = t0["r"] + t1["r"]
        shifted = r
        low = (shifted.reshape(-1) & (2**63 - 1)).numpy().astype(np.uint64)
        tables = t0["T"] ^ t1["T"]
        assert tables.shape == (150, table_words(7))
        for (shift, width, _), got in zip(slice_layout(7), _step_bits(tables, 7), strict=True):
            r_s = (low >> np.uint64(shift)) & np.uint64(2**width - 1)
            want = np.arange(2**width)[None, :] < r_s[:, None].astype(np.int64)
            assert np.array_equal(got, want)
        m = from_plane(t0["m"] ^ t1["m"], (3, 50))
        assert torch.equal(m, (shifted < 0).long())
        if bits:
            assert torch.equal(t0["r_msb"] + t1["r_msb"], (r < 0).long())
            hi = t0["r_hi"] + t1["r_hi"]
            assert torch.equal(hi, (r >> bits) & (2 ** (64 - bits) - 1))
            spec = carry_spec(bits)  # the low slices' step tables (`truncation`)
            low = t0["cT"] ^ t1["cT"]
            for shift, width, first in spec.slices:
                words = low[:, first : first + max(1, 2**width // 64)].contiguous().numpy()
                got = np.unpackbits(words.view(np.uint8), axis=1, bitorder="little")[:, : 2**width]
                r_s = ((r.reshape(-1) >> shift) & (2**width - 1)).numpy()
                assert np.array_equal(got, np.arange(2**width)[None, :] < r_s[:, None])
        seen.append(r)
    assert not torch.equal(seen[0], seen[1])


def test_zlut_material_scales_the_carrys_mask_products_by_rho_signed_by_msb_r():
    """Per comparison and side rho (rho_j: X, rho_i: Y): rho (1 - 2 msb(r)) Lambda_R for every
    set R of the carry `c6` (the empty one first), then rho msb(r); rho fresh in 1..p-1."""
    rows, n = 5, 4
    fn = anf.ARITH["c6"]
    req = Request.zlut(fn.name, (rows, n), 11)
    validate_plan((req,))
    r0, r1 = deal_pair(Dealer(), "zl", (req,))
    t0, t1 = r0.take(req), r1.take(req)
    r = t0["r"] + t1["r"]
    assert r.shape == (rows, 6) and t0["lam"].shape == (fn.inputs, 1)
    packed = from_planes_packed(t0["lam"] ^ t1["lam"], rows * 6).reshape(rows, 6, 1)
    sets = torch.tensor(fn.subsets)
    products = ((packed & sets) == sets).long()
    lam_m = (r < 0).long().unsqueeze(-1)
    rho = (t0["rho"] + t1["rho"]) % PRIME
    assert (rho > 0).all()
    iu, ju = pairs(n)
    for key, side in (("X", rho[:, ju, None]), ("Y", rho[:, iu, None])):
        want = torch.cat([products * (1 - 2 * lam_m) * side, lam_m * side], -1) % PRIME
        assert torch.equal((t0[key] + t1[key]) % PRIME, want), key
    low = (r.reshape(-1) & (2**63 - 1)).numpy().astype(np.uint64)
    tables = _step_bits(t0["T"] ^ t1["T"], 11)
    for (shift, width, _), got in zip(slice_layout(11), tables, strict=True):
        r_s = (low >> np.uint64(shift)) & np.uint64(2**width - 1)
        assert np.array_equal(got, np.arange(2**width)[None, :] < r_s[:, None].astype(np.int64))


@pytest.mark.parametrize(
    "req",
    [
        Request("lut", ((3,),), (8, 0)),  # a slice width without tables here
        Request("lut", ((3,),), (7,)),
        Request("lut", ((3,),), (7, 62)),
        Request("lut", ((3,),), (7, "16")),
        Request("zlut", ((3, 10),), ("lt2", 11)),  # the top does not fit 6 slices
        Request("zlut", ((3, 10),), ("c6", 7)),
        Request("zlut", ((3, 11),), ("c6", 11)),
        Request("zlut", ((30,),), ("c6", 11)),
        Request("zlut", ((3, 10),), ("g9", 11)),
        Request("zlut", ((3, 10),), ("c6",)),
    ],
)
def test_bad_lut_requests_are_refused(req):
    with pytest.raises(ValueError):
        validate_plan((req,))


# -- the network ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "rounds"), [("cnn", 15), ("fcnet", 10)])
def test_network_with_lut_matches_plaintext_labels_and_logits(kind, rounds):
    from service.mpc.beaver import WeightMasks

    model = _model(kind)
    x, _ = _images(48)
    shared = share_model(model.layers(), model.state_dict(), (1, 28, 28), FP, "lut")
    net, weights, pair = shared.net, shared.weights, share_images(x, FP)
    dealer = Dealer()
    masks = (WeightMasks("lut-net"), WeightMasks("lut-net"))
    private_forward(net, weights, pair, dealer, "lut-warm", "label", masks)  # opens W - b
    labels = private_forward(net, weights, pair, dealer, "lut-net-1", "label", masks)
    logits = private_forward(net, weights, pair, dealer, "lut-net-2", "logits")
    with torch.no_grad():
        plain = model(x)
    assert net.label_sharing(10) == "zero"
    assert torch.equal(net.open_label(labels.out0, labels.out1), plain.argmax(-1))
    assert (FP.decode(logits.out0 + logits.out1) - plain.double()).abs().max() < 0.01
    assert labels.stats0.rounds == rounds


def test_lut_is_the_deployments_default_and_the_protocol_lists_agree():
    from typing import get_args

    from service.api.settings import ReplicaSettings
    from service.mpc import PROTOCOLS

    field = ReplicaSettings.model_fields["comparison"]
    assert set(get_args(field.annotation)) == set(PROTOCOLS)
    assert field.default == PROTOCOLS[0] == "lut"
    compose = (Path(__file__).resolve().parent.parent / "docker-compose.yml").read_text()
    assert compose.count("PRIVDIGIT_COMPARISON: ${PRIVDIGIT_COMPARISON:-lut}") == 2
