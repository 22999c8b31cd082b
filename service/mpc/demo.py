"""Engine demo: classify MNIST test digits on secret shares, two parties in-process.

    python -m service.mpc.demo [--images 5]

Shares the trained CNN's weights and each image between two parties, runs the network on the
shares with a dealer's randomness, and reconstructs only the label. Prints, per image, the
private label, the plaintext label and the true label, and what one party sent and received.
(Until the service exists this is `make demo`; it then becomes the local cluster.)
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid

import torch

from benchmarks.engine import _images, _setup, _share_images
from service.mpc.dealer import Dealer
from service.mpc.inprocess import private_forward


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m service.mpc.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--images", type=int, default=5, help="how many test digits (1-1000)")
    args = parser.parse_args(argv)
    if not 1 <= args.images <= 1000:
        parser.error("--images must be between 1 and 1000")
    import numpy as np

    from benchmarks.engine import FIXTURES

    truth = np.load(FIXTURES / "mnist_test_1000.npz")["labels"]
    model, net, weights = _setup("cnn")
    dealer = Dealer()
    x = _images(args.images)
    with torch.no_grad():
        plain = model(x).argmax(-1)
    print("private inference: 2 parties, additive shares over Z_2^64, 16 fractional bits")
    net.plan(1, "label", {k: tuple(v.shape) for k, v in weights[0].items()})  # public, cached
    for i in range(args.images):
        t = time.perf_counter()
        res = private_forward(net, weights, _share_images(x[i : i + 1]), dealer, uuid.uuid4().hex)
        ms = (time.perf_counter() - t) * 1e3
        label = int(net.open_label(res.out0, res.out1))
        print(
            f"digit {i}: private label {label}  (plaintext {int(plain[i])}, true {int(truth[i])})"
            f"  {ms:.1f} ms incl. dealer, {res.stats0.rounds} rounds,"
            f" {res.stats0.bytes_sent / 1e6:.2f} MB sent per party"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
