"""The private model runner against plaintext torch, with realistic trained weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from service.mpc import protocols
from service.mpc.beaver import WeightMasks
from service.mpc.channel import NullChannel
from service.mpc.dealer import Dealer, PlanRecorder
from service.mpc.inprocess import private_forward, share_model
from service.mpc.network import ModelSpecError, PrivateNetwork
from service.mpc.party import Party
from service.mpc.ring import PRIME
from service.mpc.sharing import open_label, share, share_tensors
from tests.conftest import FP
from training.model import DigitCNN, FCNet

FIXTURES = Path(__file__).parent / "fixtures"


def _model(kind: str):
    model = DigitCNN() if kind == "cnn" else FCNet()
    model.load_state_dict(load_file(FIXTURES / f"{kind}.safetensors"))
    return model.eval()


def _images(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    data = np.load(FIXTURES / "mnist_test_1000.npz")
    x = torch.from_numpy(data["images"][:n]).float().unsqueeze(1) / 255.0
    return x, torch.from_numpy(data["labels"][:n]).long()


def _private(model, x: torch.Tensor, output: str, dealer: Dealer, rid: str, masks=None):
    net = PrivateNetwork(tuple(model.layers()), (1, 28, 28), FP, "a2b")  # the reference
    weights = share_tensors({k: v.double() for k, v in model.state_dict().items()}, FP)
    images = share_tensors({"x": x.double()}, FP)
    pair = (images[0]["x"], images[1]["x"])
    return private_forward(net, weights, pair, dealer, rid, output, masks)


@pytest.mark.parametrize("kind", ["cnn", "fcnet"])
def test_labels_on_1000_mnist_images_equal_plaintext(kind):
    """As deployed: fixed weight masks, so the last ReLU and layer run as one step."""
    model, dealer = _model(kind), Dealer()
    masks = (WeightMasks("net"), WeightMasks("net"))
    x, truth = _images(1000)
    with torch.no_grad():
        plain = model(x)
    labels, logits = [], []
    for i, chunk in enumerate(torch.split(x, 250)):
        res = _private(model, chunk, "label", dealer, f"l{i}", masks)
        zero = (res.out0 + res.out1) % PRIME == 0  # a2b's label: the one zero of the sum mod p
        assert torch.equal(zero.sum(-1), torch.ones(len(chunk), dtype=torch.int64))
        labels.append(zero.long().argmax(-1))
        res = _private(model, chunk, "logits", dealer, f"g{i}", masks)
        logits.append(FP.decode(res.out0 + res.out1))
    labels_t, logits_t = torch.cat(labels), torch.cat(logits)
    assert torch.equal(labels_t, plain.argmax(-1)), "label agreement must be 100%"
    assert (logits_t - plain.double()).abs().max() <= 1e-2
    assert (labels_t == truth).double().mean() >= (0.985 if kind == "cnn" else 0.97)


# Every registered protocol on both fixture models, as deployed (fixed weight masks, already
# opened): rounds and bytes party 0 sends for one label, then 48 images' labels and logits
# against plaintext. One round more per fss ReLU with a shift (the exact truncation's borrow).
NETWORK_CASES = [  # (model, protocol, rounds, peer bytes for one label)
    ("cnn", "lut", 15, 144_848),
    ("cnn", "a2b", 18, 158_096),
    ("cnn", "fss", 12, 51_256),
    ("cnn", "hybrid", 14, 141_976),
    ("fcnet", "lut", 10, 12_512),
    ("fcnet", "a2b", 13, 21_824),
    ("fcnet", "fss", 9, 10_936),
    ("fcnet", "hybrid", 9, 10_936),
]


def test_the_table_covers_every_registered_protocol():
    assert {c[1] for c in NETWORK_CASES} == set(protocols.NAMES)


@pytest.mark.parametrize(("kind", "protocol", "rounds", "peer_bytes"), NETWORK_CASES)
def test_network_matches_plaintext_labels_and_logits(kind, protocol, rounds, peer_bytes):
    model = _model(kind)
    x, _ = _images(48)
    net = PrivateNetwork(tuple(model.layers()), (1, 28, 28), FP, protocol)
    weights = share_tensors({k: v.double() for k, v in model.state_dict().items()}, FP)
    pair, one = share(FP.encode(x.double())), share(FP.encode(x[:1].double()))
    dealer, masks = Dealer(), (WeightMasks("net"), WeightMasks("net"))
    private_forward(net, weights, one, dealer, "warm", "label", masks)  # opens W - b once
    single = private_forward(net, weights, one, dealer, "one", "label", masks)
    assert single.stats0.rounds == single.stats1.rounds == rounds
    assert single.stats0.bytes_sent == single.stats1.bytes_sent == peer_bytes
    labels = private_forward(net, weights, pair, dealer, "labels", "label", masks)
    logits = private_forward(net, weights, pair, dealer, "logits", "logits", masks)
    with torch.no_grad():
        plain = model(x)
    assert torch.equal(net.open_label(labels.out0, labels.out1), plain.argmax(-1))
    assert (FP.decode(logits.out0 + logits.out1) - plain.double()).abs().max() < 0.01


def test_cnn_round_count_and_batch_one_with_weights_masked_per_query():
    model = _model("cnn")
    x, _ = _images(8)
    dealer = Dealer()
    for i in range(8):
        res = _private(model, x[i : i + 1], "label", dealer, f"one{i}", None)
        # 4 linear, 3 x (3 + 1) ReLU, 3 argmax: with weights masked per query the last linear
        # layer cannot run in the last ReLU's select round
        assert res.stats0.rounds == res.stats1.rounds == 19
        assert res.stats0.bytes_sent < 1.5e6
        label = open_label(res.out0, res.out1, "zero")
        with torch.no_grad():
            assert label.item() == model(x[i : i + 1]).argmax(-1).item()


def test_bad_layer_lists_and_inputs_are_refused():
    with pytest.raises(ModelSpecError, match="unknown type"):
        PrivateNetwork(({"type": "softmax"},), (1, 28, 28))
    with pytest.raises(ModelSpecError, match="power of two"):
        PrivateNetwork(({"type": "avgpool2d", "kernel_size": 3},), (1, 28, 28))
    net = PrivateNetwork(({"type": "flatten"},), (1, 28, 28))
    party = Party(0, NullChannel(), PlanRecorder(), FP)  # type: ignore[arg-type]
    with pytest.raises(ModelSpecError, match="input shape"):
        net.forward(party, torch.zeros(1, 2, 2, dtype=torch.int64), {}, "label")
    with pytest.raises(ValueError, match="output"):
        net.forward(party, torch.zeros(1, 1, 28, 28, dtype=torch.int64), {}, "scores")


def _near_tie(model) -> torch.Tensor:
    """An image on the boundary between two classes (plaintext bisection between two test
    images of different labels), where floor-or-floor+1 rounding used to decide the label."""
    x, truth = _images(20)
    a, b = x[0:1], x[int((truth != truth[0]).nonzero()[0])][None]
    lo, hi = 0.0, 1.0
    with torch.no_grad():
        first = model(a).argmax(-1)
        for _ in range(40):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if model((1 - mid) * a + mid * b).argmax(-1) == first else (lo, mid)
    return (1 - lo) * a + lo * b


def _crafted(model) -> torch.Tensor:
    """Ring values a malicious client can share: near +-2^62 and +-2^63 (past the old
    truncation's range), with all-ones low bits, and fixed-point near-tie images."""
    g = torch.Generator().manual_seed(15)
    big = [2**62, 2**62 + 1, 2**62 - 1, -(2**62), -(2**62) - 1, 2**63 - 1, -(2**63), 2**62 + 2**61]
    big += [(2**62 + 2**61) | (2**16 - 1), -(2**63) + 2**16 - 1]
    rows = []
    for i in range(3):
        img = FP.encode(torch.rand((1, 1, 28, 28), generator=g, dtype=torch.float64))
        where = torch.randperm(784, generator=g)[: 4 + 3 * i]
        img.view(-1)[where] = torch.tensor(big)[torch.arange(len(where)) % len(big)]
        rows.append(img)
    tie = _near_tie(model).double()
    rows += [FP.encode(tie), FP.encode(tie) + 1]  # the tie, and one fixed-point step over
    return torch.cat(rows)


@pytest.mark.parametrize(("kind", "protocol"), [("cnn", "lut"), ("cnn", "a2b"), ("fcnet", "fss")])
def test_a_crafted_input_gets_the_same_label_on_every_run(kind, protocol):
    """Issue 15: the label (and the logits) must be a function of the shared input alone, for
    every input in the ring: fresh dealer randomness and fresh input shares on every run."""
    model = _model(kind)
    shared = share_model(model.layers(), model.state_dict(), (1, 28, 28), FP, protocol)
    net, weights = shared.net, shared.weights
    x = _crafted(model)
    masks = (WeightMasks("m"), WeightMasks("m"))  # as deployed: lut fuses the last layer
    labels, logits = set(), set()
    dealer = Dealer()
    for run in range(12):
        res = private_forward(net, weights, share(x), dealer, f"l{run}", "label", masks)
        labels.add(tuple(net.open_label(res.out0, res.out1).tolist()))
        res = private_forward(net, weights, share(x), dealer, f"g{run}", "logits", masks)
        logits.add(tuple((res.out0 + res.out1).reshape(-1).tolist()))
    assert len(labels) == 1, f"labels changed between runs: {labels}"
    assert len(logits) == 1, "logits changed between runs"
