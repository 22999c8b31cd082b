"""Truncation: floor(x / 2^bits) or one more, on the whole supported range |x| < 2^62."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from service.mpc import truncation
from tests.conftest import opened, run_shared

LIMIT = 2**62
edge = st.sampled_from([0, 1, -1, 2**16, 2**16 - 1, -(2**16), LIMIT - 1, -LIMIT, -LIMIT + 1])
values = st.one_of(edge, st.integers(-LIMIT, LIMIT - 1))


@given(st.lists(values, min_size=1, max_size=64), st.sampled_from([1, 16, 18, 32, 61]))
def test_truncation_is_floor_or_floor_plus_one(xs, bits):
    x = torch.tensor(xs, dtype=torch.int64)
    result = run_shared(lambda p, a: truncation.truncate(p, a, bits), x)
    diff = opened(result) - (x >> bits)  # torch >> on int64 is floor division by 2^bits
    assert set(diff.tolist()) <= {0, 1}
    assert result.stats0.rounds == 1 and result.stats0.bytes_sent == 8 * len(xs)


def test_truncation_never_fails_on_a_million_large_values():
    # SecureML's local truncation fails with probability ~|x|/2^63: at |x| ~ 2^60 that is
    # ~1/8 per element, so this many elements would show many failures there.
    x = torch.randint(-(2**60), 2**60, (1_000_000,), dtype=torch.int64)
    diff = opened(run_shared(lambda p, a: truncation.truncate(p, a, 16), x)) - (x >> 16)
    assert diff.min() >= 0 and diff.max() <= 1


def test_truncation_refuses_bad_bit_counts():
    with pytest.raises(ValueError, match="bits"):
        run_shared(lambda p, a: truncation.truncate(p, a, 0), torch.zeros(2, dtype=torch.int64))
