import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from service.mpc.ring import (
    EncodingError,
    FixedPoint,
    from_plane,
    logical_shift_right,
    msb,
    to_planes,
)


@given(st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=50))
def test_encode_decode_round_trip_within_half_ulp(values):
    fp = FixedPoint(16)
    x = torch.tensor(values, dtype=torch.float64)
    assert (fp.decode(fp.encode(x)) - x).abs().max() <= 0.5 / fp.scale + 1e-12


def test_ring_wraps_modulo_2_64():
    big = torch.tensor([2**63 - 1], dtype=torch.int64)
    assert int(big + 1) == -(2**63)
    assert int(torch.tensor([2**62]) * 4) == 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), 1e30])
def test_encode_refuses_unrepresentable_values(bad):
    with pytest.raises(EncodingError):
        FixedPoint(16).encode(torch.tensor([1.0, bad]))


def test_encode_limit_is_exact():
    fp = FixedPoint(16)
    fp.encode(torch.tensor([fp.max_abs * 0.999]))
    with pytest.raises(EncodingError, match="exceeds"):
        fp.encode(torch.tensor([-fp.max_abs]))


def test_precision_is_a_value_not_a_global():
    assert int(FixedPoint(8).encode(torch.tensor([1.0]))) == 256
    assert int(FixedPoint(16).encode(torch.tensor([1.0]))) == 65536
    with pytest.raises(ValueError):
        FixedPoint(40)


def test_msb_and_logical_shift():
    x = torch.tensor([-1, 0, 1, -(2**63), 2**63 - 1], dtype=torch.int64)
    assert msb(x).tolist() == [1, 0, 0, 1, 0]
    assert logical_shift_right(x, 60).tolist() == [15, 0, 0, 8, 7]


@given(
    st.lists(
        st.one_of(
            st.sampled_from([0, 1, -1, 2**63 - 1, -(2**63), 2**32, -(2**32) + 1]),
            st.integers(-(2**63), 2**63 - 1),
        ),
        min_size=1,
        max_size=300,
    )
)
def test_bit_planes_hold_each_bit_of_each_element(xs):
    x = torch.tensor(xs, dtype=torch.int64)
    planes = to_planes(x)
    assert planes.shape == (64, -(-len(xs) // 64))
    for i in range(64):
        assert torch.equal(from_plane(planes[i], x.shape), (x >> i) & 1), i
    # the padding past the last element is zero in every plane
    tail = len(xs) % 64
    if tail:
        assert not (planes[:, -1] >> tail).any()


def test_bit_planes_of_a_tensor_follow_c_order():
    x = torch.arange(-300, 300, dtype=torch.int64).reshape(2, 3, 100) * 0x0123456789ABC
    planes = to_planes(x)
    for i in (0, 1, 17, 40, 63):
        assert torch.equal(from_plane(planes[i], x.shape), (x >> i) & 1)
