"""Truncation: exactly floor(x / 2^bits) (the signed shift x >> bits) for every x in the ring,
alone and fused into each protocol's ReLU; the same shares' sum for every dealing."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from service.mpc import protocols, truncation
from service.mpc.dealer import carry_spec
from tests.conftest import opened, run_shared

LOW16 = 2**16 - 1
# 0, +-1, the old range's edges +-2^62 (+-1), the ring's +-2^63, all-ones low bits, and values
# whose low bits are one below or at a power of two (the borrow's edges)
EDGES = [0, 1, -1, 2, -2, 2**62, -(2**62), 2**62 + 1, 2**62 - 1, -(2**62) + 1, -(2**62) - 1]
EDGES += [2**63 - 1, -(2**63), -(2**63) + 1, 2**63 - 2, 2**63 - 2**16, LOW16, -LOW16, 2**16]
EDGES += [-(2**16), 2**18 - 1, -(2**18) + 1, (5 << 40) | LOW16, -((5 << 40) | LOW16)]
EDGES += [(2**62 + 2**61) | LOW16, -(2**62) - 2**61, 2**32 - 1, -(2**32)]
edge = st.sampled_from(EDGES)
ring_values = st.one_of(edge, st.integers(-(2**63), 2**63 - 1))
BITS = [1, 16, 18, 32, 61]


def _bytes(n: int, slices: int) -> int:
    """c (8 per element), then the gate's 2S - 1 masked inputs as bit planes."""
    return 8 * n + 8 * (2 * slices - 1) * -(-n // 64)


@given(st.lists(ring_values, min_size=1, max_size=64), st.sampled_from(BITS))
def test_truncation_is_the_signed_shift_on_the_whole_ring(xs, bits):
    x = torch.tensor(xs, dtype=torch.int64)
    result = run_shared(lambda p, a: truncation.truncate(p, a, bits), x)
    assert torch.equal(opened(result), x >> bits)  # torch >> on int64: floor division
    assert result.stats0.rounds == result.stats1.rounds == 2
    slices = len(carry_spec(bits, whole=True).slices)
    assert result.stats0.bytes_sent == _bytes(len(xs), slices)


def test_truncation_is_exact_on_a_large_random_batch():
    # SecureML's local truncation fails with probability ~|x|/2^63, and the old offset one was
    # off by 1 (low borrow) about half the time and by 2^48 beyond |x| >= 2^62
    x = torch.cat(
        [
            torch.randint(-(2**63), 2**63 - 1, (200_000,), dtype=torch.int64),
            torch.randint(2**62 - 2**20, 2**62 + 2**20, (50_000,), dtype=torch.int64),
        ]
    )
    assert torch.equal(opened(run_shared(lambda p, a: truncation.truncate(p, a, 16), x)), x >> 16)


def test_truncation_refuses_bad_bit_counts():
    with pytest.raises(ValueError, match="bits"):
        run_shared(lambda p, a: truncation.truncate(p, a, 0), torch.zeros(2, dtype=torch.int64))


RELUS = protocols.GATES  # every simple protocol, from the registry
RELU_ROUNDS = {"a2b": 4, "lut": 3, "fss": 2}  # with a shift; fss: 1 without


@pytest.mark.parametrize("protocol", RELUS)
@given(st.lists(ring_values, min_size=1, max_size=64), st.sampled_from([1, 16, 18, 32]))
def test_relu_with_truncation_is_exact_on_the_whole_ring(protocol, xs, bits):
    x = torch.tensor(xs, dtype=torch.int64)
    result = run_shared(lambda p, a: RELUS[protocol].relu(p, a, bits), x)
    assert torch.equal(opened(result), x.clamp(min=0) >> bits)
    assert result.stats0.rounds == RELU_ROUNDS[protocol]


@pytest.mark.parametrize("protocol", RELUS)
def test_the_same_input_gives_the_same_sum_for_every_dealing(protocol):
    # near ties: low bits all ones or zero, where floor-or-floor+1 used to depend on the mask
    x = torch.tensor(EDGES * 8, dtype=torch.int64)
    want = x.clamp(min=0) >> 16
    for _ in range(10):
        assert torch.equal(opened(run_shared(lambda p, a: RELUS[protocol].relu(p, a, 16), x)), want)
        assert torch.equal(
            opened(run_shared(lambda p, a: truncation.truncate(p, a, 16), x)), x >> 16
        )
