"""Function secret sharing: the DCF against its definition, the gates against plaintext torch.

Exact on the whole ring (wrap-around included), rounds and bytes as documented, what one party
sees independent of the secret, keys that do not reveal the comparison point, randomness used
once, and the dealer's wire format for keys.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from service.api.transport import wire
from service.mpc import dcf, fss
from service.mpc.dealer import (
    Dealer,
    RandomnessReused,
    Request,
    carry_spec,
    deal_pair,
    key_words,
    validate_plan,
)
from service.mpc.network import ModelSpecError, PrivateNetwork
from service.mpc.prg import random_ring
from tests.conftest import FP, opened, opened_xor, run_shared
from tests.test_security import (
    CLASSES,
    ROWS,
    _assert_alike,
    _assert_independent,
    _row_bits,
    _secret,
)

U64 = np.dtype("<u8")
edge = st.sampled_from([0, 1, -1, 2**63 - 1, -(2**63), -(2**63) + 1, 2**62, -(2**62), 2**16])
ring_values = st.one_of(edge, st.integers(-(2**63), 2**63 - 1))


def _words(n: int) -> np.ndarray:
    return np.frombuffer(os.urandom(8 * n), dtype=U64).copy()


def _keys(alpha, beta, bits):
    n = len(alpha)
    r0, r1 = _words(2 * n).reshape(n, 2), _words(2 * n).reshape(n, 2)
    return dcf.gen(np.array(alpha, dtype=U64), beta, bits, r0, r1), r0, r1


def _dcf_sum(keys, r0, r1, x):
    x = np.array(x, dtype=U64)
    return dcf.eval_(0, r0, keys, x) + dcf.eval_(1, r1, keys, x)


@given(
    st.sampled_from([1, 2, 7, 63, 64]),
    st.sampled_from([1, 3]),
    st.lists(
        st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1)), min_size=1, max_size=16
    ),
)
def test_dcf_is_beta_times_x_below_alpha(bits, d, pairs):
    top = (1 << bits) - 1
    alpha = [a & top for a, _ in pairs]
    # the points: random, alpha itself and its neighbours (clamped to the domain), 0 and the top
    xs = [x & top for _, x in pairs] + alpha + [max(a - 1, 0) for a in alpha]
    xs += [min(a + 1, top) for a in alpha] + [0] * len(alpha) + [top] * len(alpha)
    k = len(xs) // len(alpha)
    beta = _words(len(alpha) * d).reshape(-1, d)
    # (numpy reads a list holding both 0 and 2^63 + 1 as float64: convert explicitly)
    keys, r0, r1 = _keys(np.repeat(np.array(alpha, dtype=U64), k), np.repeat(beta, k, 0), bits)
    xs_by_alpha = np.array(xs, dtype=U64).reshape(k, -1).T.reshape(-1)
    got = _dcf_sum(keys, r0, r1, xs_by_alpha)
    want = np.where(
        (xs_by_alpha < np.repeat(np.array(alpha, dtype=U64), k))[:, None],
        np.repeat(beta, k, axis=0),
        np.uint64(0),
    )
    assert np.array_equal(got, want)


def test_dcf_keys_round_trip_through_words_and_match_the_documented_size():
    keys, _, _ = _keys([5, 9, 0], _words(9).reshape(3, 3), 63)
    words = keys.to_words()
    assert len(words) == keys.words() == dcf.key_words(63, 3, 3)
    back = dcf.DcfKeys.from_words(words, 63, 3, 3)
    pairs = zip(vars(keys).values(), vars(back).values(), strict=True)
    assert all(np.array_equal(a, b) for a, b in pairs)
    with pytest.raises(ValueError):
        dcf.DcfKeys.from_words(words[:-1], 63, 3, 3)


def test_one_key_does_not_reveal_alpha():
    # Party 0's correction words for alpha = 0 and alpha = 2^63 - 1 (payload fixed): every bit
    # of every word must be balanced alike (the statistics of test_security), per word of a key
    # (one key per run) and per bit position over all its words.
    n = 4000
    views = []
    for alpha in (0, 2**63 - 1):
        keys, root0, _ = _keys([alpha] * n, np.ones((n, 1), dtype=U64), 63)
        per_element = np.concatenate(
            [
                root0,
                keys.s_cw.transpose(1, 0, 2).reshape(n, -1),
                keys.v_cw[:, :, 0].T,
                keys.t_l[:, None],
                keys.t_r[:, None],
                keys.final,
            ],
            axis=1,
        )
        views.append([torch.from_numpy(per_element.view(np.int64).copy())])
    # t_l / t_r hold one bit per level only: compare them as the other words, bit by bit
    _assert_alike(_row_bits(views[0], n), _row_bits(views[1], n), "per word of a key")
    pooled = [_row_bits([v[0].reshape(-1, 1)], v[0].numel()) for v in views]
    _assert_alike(*pooled, "per bit position")


@given(st.lists(ring_values, min_size=1, max_size=64))
def test_sign_is_exact_on_the_whole_ring(xs):
    x = torch.tensor(xs, dtype=torch.int64)
    result = run_shared(fss.sign, x)
    assert torch.equal(opened(result), (x >= 0).long())
    assert result.stats0.rounds == 1
    assert result.stats0.bytes_sent == 8 * len(xs)


@given(st.lists(ring_values, min_size=1, max_size=64), st.sampled_from([0, 1, 16, 18, 61]))
def test_relu_with_fused_truncation_on_the_whole_ring(xs, bits):
    x = torch.tensor(xs, dtype=torch.int64)
    result = run_shared(lambda p, a: fss.relu(p, a, bits), x)
    got, want = opened(result), torch.clamp(x, min=0) >> bits
    # exact (floor) for every shift; a shift costs the low borrow's round (`truncation`):
    # its gate's inputs, the low slices' lt and eq and the sign, as bit planes
    inputs = carry_spec(bits, extra=True).inputs if bits else 0
    assert result.stats0.rounds == (2 if bits else 1)
    assert result.stats0.bytes_sent == 8 * len(xs) + 8 * inputs * -(-len(xs) // 64)
    assert torch.equal(got, want)


def test_relu_on_a_large_random_batch_and_its_rounding_is_floor():
    x = random_ring((50_000,))
    assert torch.equal(opened(run_shared(fss.relu, x)), torch.clamp(x, min=0))
    # was stochastic rounding (floor + 1 with probability frac, decided by the mask): now floor,
    # so the same input gives the same value every time
    small = torch.randint(0, 1 << 30, (50_000,))
    got = opened(run_shared(lambda p, a: fss.relu(p, a, 16), small))
    assert torch.equal(got, small >> 16)


def test_relu_refuses_a_shift_it_cannot_do():
    with pytest.raises(ValueError):
        run_shared(lambda p, a: fss.relu(p, a, 62), torch.zeros(2, dtype=torch.int64))


@given(st.integers(1, 5), st.integers(2, 12), st.data())
def test_argmax_is_the_first_maximum(rows, n, data):
    values = data.draw(
        st.lists(
            st.one_of(st.integers(-3, 3), st.integers(-(2**40), 2**40)),
            min_size=rows * n,
            max_size=rows * n,
        )
    )
    x = torch.tensor(values, dtype=torch.int64).reshape(rows, n)
    result = run_shared(fss.argmax, x)
    onehot = opened_xor(result)
    assert torch.equal(onehot, torch.nn.functional.one_hot(x.argmax(-1), n))
    assert result.stats0.rounds == 2
    assert result.stats0.bytes_sent == 8 * rows * (n * (n - 1) // 2 + n)


def test_argmax_of_equal_logits_is_class_zero_and_max_pool_is_exact():
    ties = torch.full((3, 10), 7, dtype=torch.int64)
    assert torch.equal(opened_xor(run_shared(fss.argmax, ties)).argmax(-1), torch.zeros(3).long())
    x = torch.randint(-(2**40), 2**40, (2, 3, 4, 4))
    result = run_shared(lambda p, a: fss.max_pool2d(p, a, 2), x)
    assert torch.equal(opened(result), torch.nn.functional.max_pool2d(x.double(), 2).long())
    assert result.stats0.rounds == 2


def test_relu_view_does_not_depend_on_the_secret():
    relu = lambda p, x: fss.relu(p, x, 16)  # noqa: E731
    assert _assert_independent(relu, _secret(3.25, 1) << 16, _secret(-1000.5, 1) << 16) >= 1


def test_argmax_view_does_not_depend_on_the_label():
    a = torch.zeros(ROWS, CLASSES, dtype=torch.int64)
    b = torch.zeros(ROWS, CLASSES, dtype=torch.int64)
    a[:, 0], b[:, 2] = 1 << 20, 1 << 30
    _assert_independent(fss.argmax, a, b)


def test_masks_are_fresh_and_keys_are_served_once():
    plan = (Request.fss((4,), "relu", 16),)
    dealer = Dealer()
    r0, _ = deal_pair(dealer, "fresh-1", plan)
    q0, _ = deal_pair(dealer, "fresh-2", plan)
    a, b = r0.take(plan[0]), q0.take(plan[0])
    assert not torch.equal(a["r"], b["r"]) and not np.array_equal(a["keys"].s_cw, b["keys"].s_cw)
    with pytest.raises(RandomnessReused):
        r0.take(plan[0])
    with pytest.raises(RandomnessReused):
        dealer.deal("fresh-1", 1, plan)


def test_dealer_material_with_keys_survives_the_wire_for_both_parties():
    plan = (Request.fss((2, 3), "sign"), Request.trunc((5,), 16), Request.fss((7,), "relu", 3))
    validate_plan(plan)
    dealer = Dealer()
    for party in (0, 1):
        m = dealer.deal("wire-1", party, plan)
        data = wire.material_to_bytes(m)
        assert len(data) == m.nbytes
        back = wire.material_from_bytes(data, "wire-1", party, plan)
        assert [k.tolist() for k in back.keys] == [k.tolist() for k in m.keys]
        assert [len(k) for k in back.keys] == key_words(plan)
        with pytest.raises(wire.WireError):
            wire.material_from_bytes(data[:-8], "wire-1", party, plan)


@pytest.mark.parametrize(
    "params", [("max", 0), ("relu", 62), ("relu", -1), ("sign", 3), ("relu",), ("relu", "16")]
)
def test_validate_plan_refuses_bad_fss_requests(params):
    with pytest.raises(ValueError):
        validate_plan((Request("fss", ((3,),), params),))


def test_an_unknown_protocol_is_refused():
    with pytest.raises(ModelSpecError):
        PrivateNetwork((), (1, 28, 28), FP, "garbled")


def test_weight_mask_seeds_survive_the_wire_and_bad_beaverw_requests_are_refused():
    plan = (Request.beaverw("matmul", (1, 4), (4, 2), (), "abc123", "fc1.weight"),)
    validate_plan(plan)
    dealer = Dealer()
    for party in (0, 1):
        m = dealer.deal("wmask-1", party, plan)
        assert len(m.mask_seeds) == 1
        back = wire.material_from_bytes(wire.material_to_bytes(m), "wmask-1", party, plan)
        assert back.mask_seeds == m.mask_seeds
    for params in (("matmul", (), "bad id!", "w"), ("conv2d", (), "abc", "w")):
        op, extra, mask_id, name = params
        with pytest.raises(ValueError):
            validate_plan((Request.beaverw(op, (1, 1, 4, 4), (2, 1, 3, 3), extra, mask_id, name),))
