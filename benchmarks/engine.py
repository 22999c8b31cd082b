"""Engine benchmark: the default CNN and the FC net 784-128-128-10, two parties in-process.

    python -m benchmarks.engine [--json] [--repeats 30] [--images 200]
                                [--comparison lut,a2b,fss,hybrid]

Per model and comparison protocol: rounds and bytes each party sends per image (batch 1, label
output); online latency at batch 1 (p50), with the dealer's randomness dealt and expanded
beforehand as a replica prefetches it, and that offline time (dealing plus both parties' seed
expansion); images/s at batch 64; plaintext torch latency; and, over `--images` MNIST test
images, label agreement with plaintext and the largest logit error; `wire_ms`: encoding and
decoding party 0's peer frames of one image (the serialisation the service adds per run). The
weights' masks are fixed per model (`beaver.linear`), as in the service: bytes are those of
every query after the first.

Weights: the trained fixtures in tests/fixtures (the service will use the training package's).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from service.api.transport import wire
from service.memory import keep_freed_memory
from service.mpc import protocols as registry
from service.mpc.beaver import WeightMasks
from service.mpc.channel import InMemoryChannel
from service.mpc.dealer import Dealer
from service.mpc.inprocess import private_forward, share_images, share_model
from service.mpc.ring import DEFAULT_FP
from training.model import DigitCNN, FCNet

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
MODELS = {"cnn": DigitCNN, "fcnet": FCNet}


def _setup(kind: str, comparison: str = registry.DEFAULT):
    model = MODELS[kind]()
    model.load_state_dict(load_file(FIXTURES / f"{kind}.safetensors"))
    model.eval()
    shared = share_model(model.layers(), model.state_dict(), (1, 28, 28), DEFAULT_FP, comparison)
    return model, shared.net, shared.weights


def _images(n: int) -> torch.Tensor:
    data = np.load(FIXTURES / "mnist_test_1000.npz")
    return torch.from_numpy(data["images"][:n]).float().unsqueeze(1) / 255.0


def _online(net, weights, images, dealer, output="label", masks=None, channels=None):
    """One private forward pass with the dealer's material expanded first, as a replica
    prefetches it (`masks`: both parties' fixed weight masks, as a replica keeps them)."""
    return private_forward(
        net, weights, images, dealer, uuid.uuid4().hex, output, masks,
        prefetch=True, channels=channels,
    )  # fmt: skip


class _Recording(InMemoryChannel):
    """Party 0's end of an in-memory channel that keeps what it sends, round by round."""

    def __init__(self, inner: InMemoryChannel) -> None:
        self.__dict__.update(inner.__dict__)
        self.rounds: list[list[torch.Tensor]] = []

    def exchange(self, tensors):
        self.rounds.append([t.clone() for t in tensors])
        return super().exchange(tensors)


def _wire_ms(net, weights, one, dealer, masks, repeats: int) -> float:
    """Milliseconds to encode and decode party 0's peer frames for one image (serialisation)."""
    a, b = InMemoryChannel.pair()
    rec = _Recording(a)
    _online(net, weights, one, dealer, masks=masks, channels=(rec, b))
    times = []
    for _ in range(max(repeats, 5)):
        t = time.perf_counter()
        for i, tensors in enumerate(rec.rounds):
            wire.decode_frame(wire.encode_data("bench-run-0123456789ab", i, tensors))
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def bench_model(kind: str, comparison: str, repeats: int, n_images: int, progress) -> dict:
    model, net, weights = _setup(kind, comparison)
    dealer = Dealer()
    one = share_images(_images(1))
    masks = (WeightMasks("bench"), WeightMasks("bench"))
    _online(net, weights, one, dealer, masks=masks)  # warm-up; opens the masked weights
    online, offline = [], []
    for _ in progress(range(repeats), desc=f"{kind} {comparison} batch 1"):
        res = _online(net, weights, one, dealer, masks=masks)
        online.append(res.online_s)
        offline.append(res.dealer_s)
    batch = share_images(_images(64))
    b_times = []
    for _ in progress(range(max(3, repeats // 10)), desc=f"{kind} {comparison} batch 64"):
        b_times.append(_online(net, weights, batch, dealer, masks=masks).online_s)
    x1 = _images(1)
    with torch.no_grad():
        plain_times = []
        for _ in range(max(repeats, 50)):
            t = time.perf_counter()
            model(x1)
            plain_times.append(time.perf_counter() - t)
        x = _images(n_images)
        plain = model(x)
    shared = share_images(x)
    labels = private_forward(net, weights, shared, dealer, uuid.uuid4().hex, "label")
    logits = private_forward(net, weights, shared, dealer, uuid.uuid4().hex, "logits")
    agree = (net.open_label(labels.out0, labels.out1) == plain.argmax(-1)).double().mean()
    err = (DEFAULT_FP.decode(logits.out0 + logits.out1) - plain.double()).abs().max()
    return {
        "model": kind,
        "comparison": comparison,
        "batch": 1,
        "rounds": res.stats0.rounds,
        "bytes_per_party": res.stats0.bytes_sent,
        "latency_ms_p50": round(statistics.median(online) * 1e3, 2),
        "dealer_ms_p50": round(statistics.median(offline) * 1e3, 2),
        "wire_ms": round(_wire_ms(net, weights, one, dealer, masks, repeats), 3),
        "images_per_s": round(64 / statistics.median(b_times), 1),
        "plaintext_latency_ms": round(statistics.median(plain_times) * 1e3, 3),
        "max_abs_logit_error": float(err),
        "label_agreement": float(agree),
        "images_checked": n_images,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.engine",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per model")
    parser.add_argument("--repeats", type=int, default=30, help="batch-1 runs per model")
    parser.add_argument("--images", type=int, default=200, help="images checked (<= 1000)")
    parser.add_argument("--models", default="cnn,fcnet", help="comma list of cnn, fcnet")
    parser.add_argument(
        "--comparison",
        default=",".join(registry.NAMES),
        help=f"comma list of comparison protocols: {', '.join(registry.NAMES)} (default: all)",
    )
    args = parser.parse_args(argv)
    keep_freed_memory()  # as the service's processes do
    kinds = [k.strip() for k in args.models.split(",") if k.strip()]
    protocols = [c.strip() for c in args.comparison.split(",") if c.strip()]
    bad = [k for k in kinds if k not in MODELS] + [
        c for c in protocols if c not in registry.REGISTRY
    ]
    if bad or not 1 <= args.images <= 1000 or args.repeats < 1:
        parser.error(
            f"unknown models or protocols {bad}" if bad else "--images in 1..1000, --repeats >= 1"
        )
    torch.set_num_threads(1)  # two parties share the two cores

    if args.json:

        def progress(it, desc):
            return it
    else:
        from tqdm import tqdm

        def progress(it, desc):
            return tqdm(it, desc=desc, leave=False)

    rows = [
        bench_model(k, c, args.repeats, args.images, progress) for k in kinds for c in protocols
    ]
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Private inference engine, two parties in-process (label output)")
    for key in rows[0]:
        table.add_column(key)
    for row in rows:
        table.add_row(*(f"{v:.3g}" if isinstance(v, float) else str(v) for v in row.values()))
    Console().print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
