"""One-round comparison gates from function secret sharing: sign, ReLU (+ truncation), argmax.

Boyle et al. (Eurocrypt 2021) style: the dealer picks a uniform mask r, shares it, and hands both
parties keys of one DCF (`dcf.py`) for alpha = r mod 2^63 whose payload carries the products
the gate needs. Online, the parties open x^ = x + r (1 round; uniform, so it reveals nothing),
and evaluate the keys locally at a = x^ mod 2^63, getting shares of c * beta with
c = [a < r mod 2^63], the borrow of the low 63 bits of x^ - r. Then, with w = msb(x^) ^ msb(r):
    msb(x) = w ^ c,   so   [x >= 0] = (1 - w) + c (2w - 1)
Every product of c with a mask-dependent value is a payload coordinate, every mask-dependent
constant a dealer share, and every x^-dependent factor public, so the result is a local linear
combination: exact on the whole ring Z_2^64, wrap-around included.

Gates (N elements; bytes are what each party sends; dealer key sizes in `dcf.py`):
- `sign(x)`:  [x >= 0]. 1 round, 8 N bytes. DCF payload (2 msb(r) - 1); constant [msb(r)].
- `relu(x, k)`: [max(x, 0) >> k], the truncation fused in, exact on the whole ring:
  for x >= 0, x = a - r' + 2^63 c (r' = r mod 2^63), so x >> k = (a >> k) - (r' >> k)
  + 2^(63-k) c - b, b the borrow of the low k bits [a_lo < r'_lo]. The DCF part gives
  [s ((a >> k) - (r' >> k) + 2^(63-k) c)] (s = [x >= 0]) locally; the product s b cannot be
  (two comparisons of different bits), so for k > 0 a second round opens `truncation`'s gate
  with s as an extra factor and subtracts [s b]. 1 round (k = 0) or 2, 8 N + (2L) N / 8 bytes
  (L = 2 slices for k = 16). Payload (1, s, s (r' >> k)) with s = 2 msb(r) - 1; constants
  [msb(r)], [r' >> k], [msb(r) (r' >> k)]; for k > 0 also the gate's tables and products.
- `argmax(x)`: XOR shares of the one-hot first maximum. All n(n-1)/2 pairwise signs in one
  round; each row's wins are counted locally; the winner is the one class with n - 1 wins,
  found by one more sign. 2 rounds, 8 (n(n-1)/2 + n) bytes per row.
- `max_pool2d`: max(x, y) = y + relu(x - y): 1 round per tree level (2 for 2x2).
What a party sees: only x^ = x + r for fresh uniform r, and its DCF keys, which are
pseudorandom on their own. Outputs stay shared.
"""

from __future__ import annotations

import numpy as np
import torch

from service.mpc import comparison, dcf, truncation
from service.mpc.dealer import FSS_PAYLOAD, Request
from service.mpc.party import Party

LABEL_SHARING = "xor"  # `argmax` hands out XOR shares of a one-hot vector
LOW_BITS = 63  # the DCF compares the low 63 bits; the top bit is handled by w
_LOW = np.uint64((1 << LOW_BITS) - 1)
_U = np.dtype("<u8")


def _u64(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().reshape(-1).numpy().view(_U)


def _tensor(a: np.ndarray, shape) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a).view(np.int64)).reshape(shape)


def _open_and_eval(party: Party, x: torch.Tensor, gate: str, bits: int = 0):
    """The gate's one round: open x^ = x + r, evaluate the DCF at x^ mod 2^63 (local)."""
    t = party.rand.take(Request.fss(x.shape, gate, bits))
    (xh,) = party.open(x + t["r"])
    u = _u64(xh)
    a, mx = u & _LOW, (u >> np.uint64(LOW_BITS)).astype(bool)
    keys = t["keys"]
    if keys is None:  # a dry run (plan recording): no keys, zero shares
        shares = np.zeros((u.size, FSS_PAYLOAD[gate]), dtype=_U)
    else:
        shares = dcf.eval_(party.index, _u64(t["root"]).reshape(-1, 2), keys, a)
    return t, a, mx, shares, u


def sign(party: Party, x: torch.Tensor) -> torch.Tensor:
    """Additive shares of [x >= 0] (0/1) for shared x. 1 round."""
    t, _, mx, shares, _ = _open_and_eval(party, x, "sign")
    mr, cs = _u64(t["mr"]), shares[:, 0]
    one = np.uint64(party.index == 0)
    return _tensor(np.where(mx, mr - cs, one - mr + cs), x.shape)


def relu(party: Party, x: torch.Tensor, trunc_bits: int = 0) -> torch.Tensor:
    """Shares of max(x, 0) >> trunc_bits, exact on the whole ring. 1 round; 2 with a shift (the
    low borrow times the sign, `truncation`'s gate)."""
    if not 0 <= trunc_bits < LOW_BITS - 1:
        raise ValueError(f"truncation bits must be in [0, 62), got {trunc_bits}")
    t, a, mx, shares, u_open = _open_and_eval(party, x, "relu", trunc_bits)
    mr, r_hi, mr_hi = _u64(t["mr"]), _u64(t["rhi"]), _u64(t["mrhi"])
    c, cs, cs_hi = shares[:, 0], shares[:, 1], shares[:, 2]
    a_hi = a >> np.uint64(trunc_bits)  # public
    k = np.uint64(1 << (LOW_BITS - trunc_bits))
    half_k = np.uint64(1 << (LOW_BITS - 1 - trunc_bits))  # k * c * msb(r) = half_k (c + c s)
    c_mr_k = half_k * (c + cs)
    mine = a_hi if party.index == 0 else np.zeros_like(a_hi)
    if_w_is_mr = mine - r_hi - mr * a_hi + mr_hi + c_mr_k + a_hi * cs - cs_hi
    if_w_not_mr = mr * a_hi - mr_hi + k * c - c_mr_k - a_hi * cs + cs_hi
    out = _tensor(np.where(mx, if_w_not_mr, if_w_is_mr), x.shape)
    if not trunc_bits:
        return out
    # exact: minus [s * low borrow], s = [x >= 0] (XOR shares: the low bits of its shares)
    one = np.uint64(party.index == 0)
    s = _tensor(np.where(mx, mr - cs, one - mr + cs), x.shape)
    spec = truncation.carry_spec(trunc_bits, extra=True)
    low, mine_msg = truncation.carry_begin(party, _tensor(u_open, x.shape), t, spec, extra=s)
    (theirs,) = party.channel.exchange([mine_msg])
    return out - truncation.carry_finish(low, theirs)[0].reshape(x.shape)


def maximum(party: Party, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[max(x, y)] = y + relu(x - y). 1 round."""
    return y + relu(party, x - y)


def max_pool2d(party: Party, x: torch.Tensor, kernel: int) -> torch.Tensor:
    """2D max pooling, stride = kernel, as a tree of `maximum`. Rounds: ceil(log2(k*k))."""
    return comparison.max_pool2d(party, x, kernel, maximum)


def argmax(party: Party, x: torch.Tensor) -> torch.Tensor:
    """XOR shares of the one-hot argmax over the last axis (first maximum on ties). 2 rounds.

    i wins against j > i when x_i >= x_j and against j < i when x_i > x_j; exactly one class
    (the first maximum) wins all n - 1 duels.
    """
    n = x.shape[-1]
    if n < 2:
        return party.public(torch.ones_like(x))
    iu, ju = torch.triu_indices(n, n, offset=1)
    ge = sign(party, x[..., iu] - x[..., ju])  # [x_i >= x_j] for each pair i < j
    wins = torch.zeros_like(x)
    wins.index_add_(-1, iu, ge)
    wins.index_add_(-1, ju, party.public(torch.ones_like(ge)) - ge)
    winner = sign(party, wins - party.public(torch.full_like(wins, n - 1)))
    return winner & 1  # additive shares of a bit: their low bits are XOR shares of it
