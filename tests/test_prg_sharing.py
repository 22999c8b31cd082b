import numpy as np
import pytest
import torch

from service.mpc.prg import PRG, fresh_seed, random_ring
from service.mpc.sharing import reconstruct, reconstruct_xor, share, share_xor


def test_prg_is_deterministic_per_seed_and_streams():
    seed = fresh_seed()
    a, b = PRG(seed), PRG(seed)
    assert torch.equal(a.ring((3, 4)), b.ring((3, 4)))
    assert torch.equal(a.ring((5,)), b.ring((5,)))
    assert not torch.equal(PRG(seed).ring((8,)), PRG(fresh_seed()).ring((8,)))
    c = PRG(seed)
    first, second = c.ring((8,)), c.ring((8,))
    assert not torch.equal(first, second)


def test_prg_is_aes_ctr_keystream():
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    seed = bytes(range(32))
    expected = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor().update(bytes(16))
    got = PRG(seed).ring((2,))
    assert got.numpy().astype("<i8").tobytes() == expected


def test_prg_bits_look_uniform():
    x = random_ring((200_000,))
    for bit in (0, 31, 62, 63):
        ones = ((x >> bit) & 1).double().mean().item()
        assert abs(ones - 0.5) < 0.01  # 4.5 sigma


def test_prg_refuses_short_seed():
    with pytest.raises(ValueError, match="32 bytes"):
        PRG(b"short")


@pytest.mark.parametrize("shape", [(1,), (64, 1, 28, 28)])
def test_share_reconstruct(shape):
    x = random_ring(shape)
    x0, x1 = share(x)
    assert torch.equal(reconstruct(x0, x1), x)
    b0, b1 = share_xor(x)
    assert torch.equal(reconstruct_xor(b0, b1), x)
    assert not torch.equal(x0, x)


def test_prg_is_the_aes_ctr_keystream_across_draws_and_chunk_boundaries():
    """Draws are consecutive slices of AES-256-CTR(seed, zero IV) over zeros, whatever their
    sizes (1 MB encryption chunks inside), so two holders of a seed agree on every tensor."""
    import numpy as np
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    from service.mpc.prg import PRG

    seed = bytes(range(32))
    sizes = [1, 3, 131_071, 131_072, 131_073, 300_000, 5]  # elements: around 1 MB = 131,072
    stream = (
        Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor().update(bytes(8 * sum(sizes)))
    )
    prg, pos = PRG(seed), 0
    for n in sizes:
        got = prg.ring((n,))
        want = np.frombuffer(stream[8 * pos : 8 * (pos + n)], dtype="<i8")
        assert np.array_equal(got.numpy(), want), n
        got += 1  # each draw is its own writable tensor: changing it touches nothing else
        pos += n
    assert prg.bytes_drawn == 8 * pos


def test_prg_mod_p_keeps_the_draws_below_a_multiple_of_p_and_looks_uniform():
    """Exactly uniform: 16-bit draws (32-bit above 2^16) below the largest multiple of p that
    fits are kept, the others skipped, in stream order."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    seed = bytes(range(32))
    stream = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor().update(bytes(4096))
    for p, dtype in ((65521, "<u2"), (40_000, "<u2"), (2**20 + 7, "<u4")):
        draws = np.frombuffer(stream, dtype=dtype)[:19]  # one pass for 3 values: 3 + 16 draws
        limit = (1 << (8 * draws.itemsize)) // p * p
        kept = [int(v) % p for v in draws if v < limit]
        assert p != 40_000 or len(kept) < 19  # 39% of 16-bit draws skipped for 40,000
        assert PRG(seed).mod((3,), p).tolist() == kept[:3], p
    x = PRG(bytes(32)).mod((300_000,), 65521)
    assert x.min() >= 0 and x.max() < 65521
    counts = torch.bincount(x * 20 // 65521, minlength=20).double()  # 20 equal bins
    assert ((counts - 15_000).abs() < 600).all()  # about 5 sigma
    big = PRG(bytes(32)).mod((100_000,), 40_000)  # many skipped draws, several passes
    assert big.min() >= 0 and big.max() < 40_000 and len(big.unique()) > 35_000
    with pytest.raises(ValueError):
        PRG(seed).mod((1,), 2**31 - 1)


def test_open_label_names_one_class_per_row_or_minus_one():
    """A row whose shares name no single class (none or several) opens to -1, never a class."""
    from service.mpc.ring import PRIME
    from service.mpc.sharing import open_label

    y0 = torch.tensor([[5, 7, 9], [1, 2, 3], [4, 4, 4]])
    y1 = torch.tensor([[3, PRIME - 7, 2], [5, 5, 5], [PRIME - 4, PRIME - 4, 1]])
    assert open_label(y0, y1, "zero").tolist() == [1, -1, -1]
    one_hot = torch.tensor([[0, 0, 1], [0, 0, 0], [1, 1, 0]])
    assert open_label(one_hot, torch.zeros_like(one_hot), "xor").tolist() == [2, -1, -1]
