"""`python -m training evaluate DIR`: the test set through the model, in the clear and privately.

    python -m training evaluate models/default                   # plaintext accuracy
    python -m training evaluate models/default --private         # + the two-party engine
    python -m training evaluate models/default --replicas https://r0:8000,https://r1:8001

The seed tutorial's last step, "test on the encrypted dataset and model", for all 10,000 MNIST
test images. `--private` runs them through the two-party engine on the two share files
(in-process parties, the real dealer code, the deployment's comparison protocol, the model's
fixed weight masks as a replica uses them); `--replicas` sends them through a running
deployment with the thin client. Either way the labels are compared with the plaintext model's
(`model.safetensors`, run by the manifest's own layer list): every disagreement is listed by
test index. `--confusion PATH` draws the confusion matrix of the private (or plaintext) labels.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
import torch.nn.functional as F

from service.mpc import protocols


class EvaluateError(RuntimeError):
    """The model directory or the deployment cannot be evaluated as asked."""


@dataclass
class Evaluation:
    model_version: str
    images: int
    plaintext_accuracy: float
    mode: str = "plaintext"  # "plaintext" | "in-process" | "replicas"
    comparison: str | None = None
    private_accuracy: float | None = None
    agreement: float | None = None  # private labels equal to plaintext labels
    images_per_s: float | None = None
    disagreements: list[dict[str, int]] = field(default_factory=list)


def plaintext_logits(layers: list[dict[str, Any]], state: dict[str, torch.Tensor], x: torch.Tensor):
    """The float model a manifest describes: its layer list over `model.safetensors`."""
    for layer in layers:
        kind = layer["type"]
        if kind == "conv2d":
            name = layer["name"]
            x = F.conv2d(
                x,
                state[f"{name}.weight"],
                state[f"{name}.bias"],
                stride=int(layer.get("stride", 1)),
                padding=int(layer.get("padding", 0)),
            )
        elif kind == "linear":
            x = F.linear(x, state[f"{layer['name']}.weight"], state[f"{layer['name']}.bias"])
        elif kind == "avgpool2d":
            x = F.avg_pool2d(x, int(layer["kernel_size"]))
        elif kind == "maxpool2d":
            x = F.max_pool2d(x, int(layer["kernel_size"]))
        elif kind == "relu":
            x = F.relu(x)
        elif kind == "flatten":
            x = x.flatten(1)
        else:
            raise EvaluateError(f"unknown layer type {kind!r} in the manifest")
    return x


class ManifestModel(torch.nn.Module):
    """The plaintext model of a model directory as a torch module (float32 logits)."""

    def __init__(self, directory: Path) -> None:
        from safetensors.torch import load_file

        super().__init__()
        directory = Path(directory)
        self.layers = _manifest(directory)["architecture"]["layers"]
        weights = directory / "model.safetensors"
        if not weights.is_file():
            raise EvaluateError(f"{weights} not found: only the model owner's directory has it")
        self.state = {k: v.to(torch.float32) for k, v in load_file(str(weights)).items()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return plaintext_logits(self.layers, self.state, x.to(torch.float32))


def _manifest(directory: Path) -> dict[str, Any]:
    path = directory / "manifest.json"
    if not path.is_file():
        raise EvaluateError(f"{path} not found: pass a directory written by `python -m training`")
    return json.loads(path.read_text())


def plaintext_labels(directory: Path, images: np.ndarray, batch: int = 1000) -> np.ndarray:
    """The plaintext model's labels for uint8 images (N, 28, 28)."""
    model = ManifestModel(directory)
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = torch.from_numpy(images[i : i + batch]).to(torch.float32)[:, None] / 255.0
            out.append(model(x).argmax(-1).numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def private_labels_in_process(
    directory: Path, images: np.ndarray, comparison: str, batch: int, progress=None
) -> np.ndarray:
    """Both parties in this process, on the two share files, with the real dealer code."""
    from service.mpc.beaver import WeightMasks
    from service.mpc.dealer import Dealer
    from service.mpc.inprocess import private_forward, share_images
    from service.store import StoreError, load_share

    try:
        m0, m1 = (load_share(directory, p, comparison) for p in (0, 1))
    except StoreError as exc:
        raise EvaluateError(str(exc)) from None
    net, dealer = m0.network, Dealer()
    masks = (WeightMasks(m0.mask_id), WeightMasks(m1.mask_id))
    out = []
    for i in range(0, len(images), batch):
        x = torch.from_numpy(images[i : i + batch]).to(torch.float64)[:, None] / 255.0
        run = private_forward(
            net, (m0.weights, m1.weights), share_images(x, net.fp), dealer,
            secrets.token_urlsafe(18), "label", masks,
        )  # fmt: skip
        out.append(net.open_label(run.out0, run.out1).numpy())  # -1: a row naming no class
        if progress is not None:
            progress(len(out[-1]))
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def private_labels_from_replicas(
    urls: tuple[str, str], images: np.ndarray, verify: Any, progress=None
) -> tuple[np.ndarray, str]:
    """Through a running deployment, with the thin client (its own sharing and checks)."""
    from clients.privdigit import PrivDigitClient, PrivDigitError

    labels: list[int] = []
    try:
        with PrivDigitClient(list(urls), verify=verify) as client:
            version = str(client.model_info().get("model_version"))
            step = 256
            for i in range(0, len(images), step):
                chunk = client.predict_encoded(images[i : i + step])
                labels += [p.label for p in chunk]
                if progress is not None:
                    progress(len(chunk))
    except PrivDigitError as exc:
        raise EvaluateError(f"the deployment failed: {exc}") from None
    return np.asarray(labels, dtype=np.int64), version


def plot_confusion(true: np.ndarray, predicted: np.ndarray, title: str, path: Path | IO) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = np.zeros((10, 10), dtype=np.int64)
    np.add.at(matrix, (true, predicted), 1)
    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    shown = np.where(matrix > 0, np.log10(matrix + 1), 0)
    ax.imshow(shown, cmap="Blues")
    for t in range(10):
        for p in range(10):
            if matrix[t, p]:
                colour = "white" if t == p else "black"
                ax.text(p, t, str(matrix[t, p]), ha="center", va="center", fontsize=7, color=colour)
    ax.set(xticks=range(10), yticks=range(10), xlabel="predicted", ylabel="true", title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def evaluate(
    directory: Path,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    private: bool = False,
    replicas: tuple[str, str] | None = None,
    verify: Any = True,
    comparison: str = protocols.DEFAULT,
    batch: int = 64,
    progress=None,
) -> tuple[Evaluation, np.ndarray]:
    """The evaluation, and the labels it reports on (private where asked, else plaintext)."""
    manifest = _manifest(directory)
    plain = plaintext_labels(directory, images)
    result = Evaluation(
        model_version=str(manifest["model_version"]),
        images=len(images),
        plaintext_accuracy=float((plain == labels).mean()) if len(images) else 0.0,
    )
    if not private and replicas is None:
        return result, plain
    started = time.perf_counter()
    if replicas is not None:
        got, served = private_labels_from_replicas(replicas, images, verify, progress)
        if served != result.model_version:
            raise EvaluateError(
                f"the deployment serves model version {served}, {directory} holds "
                f"{result.model_version}: evaluate the directory the replicas serve"
            )
        result.mode = "replicas"
    else:
        got = private_labels_in_process(directory, images, comparison, batch, progress)
        result.mode, result.comparison = "in-process", comparison
    seconds = time.perf_counter() - started
    result.private_accuracy = float((got == labels).mean()) if len(images) else 0.0
    result.agreement = float((got == plain).mean()) if len(images) else 1.0
    result.images_per_s = round(len(images) / seconds, 1) if seconds > 0 else None
    result.disagreements = [
        {
            "index": int(i),
            "true": int(labels[i]),
            "plaintext": int(plain[i]),
            "private": int(got[i]),
        }
        for i in np.flatnonzero(got != plain)
    ]
    return result, got


def with_private_accuracy(
    origin: dict, images: np.ndarray | None, labels: np.ndarray | None, enabled: bool
):
    """An `export_model(amend=...)` callback: the manifest's provenance is `origin`, plus, when
    `enabled`, the plaintext and private test accuracy of the shares just written (before they
    are published) on `images` and `labels` (needed only then)."""

    def amend(directory: Path, manifest: dict) -> dict:
        if not enabled:
            return {"provenance": origin}
        done, _ = evaluate(directory, images, labels, private=True)
        return {
            "provenance": {
                **origin,
                "plaintext_test_accuracy": done.plaintext_accuracy,
                "test_images": done.images,
                "private_test_accuracy": done.private_accuracy,
                "private_label_agreement": done.agreement,
            }
        }

    return amend


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training evaluate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("directory", type=Path, help="a model directory written by python -m training")
    how = p.add_mutually_exclusive_group()
    how.add_argument(
        "--private",
        action="store_true",
        help="also run every image through the two-party engine on the two share files",
    )
    how.add_argument(
        "--replicas",
        help="also run every image through a running deployment: URL0,URL1 (its replicas)",
    )
    p.add_argument("--cacert", help="CA certificate that verifies https replicas")
    p.add_argument(
        "--comparison",
        choices=protocols.NAMES,
        default=protocols.DEFAULT,
        help=f"comparison protocol of --private ({protocols.DEFAULT}, the deployments' default)",
    )
    p.add_argument("--limit", type=int, default=None, help="the first N test images only")
    p.add_argument("--batch-size", type=int, default=64, help="images per private run (64)")
    p.add_argument("--confusion", type=Path, help="write the confusion matrix as a PNG here")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    return p


def main(argv: list[str]) -> int:
    from tqdm import tqdm

    from training.data import MnistUnavailable, load_mnist

    a = parser().parse_args(argv)
    if a.limit is not None and a.limit < 1:
        print("error: --limit must be a positive integer", file=sys.stderr)
        return 2
    if not 1 <= a.batch_size <= 1024:
        print("error: --batch-size must be in 1..1024", file=sys.stderr)
        return 2
    replicas = None
    if a.replicas:
        urls = tuple(u.strip().rstrip("/") for u in a.replicas.split(","))
        if len(urls) != 2 or not all(u.startswith(("http://", "https://")) for u in urls):
            print("error: --replicas must be two URLs: http(s)://R0,http(s)://R1", file=sys.stderr)
            return 2
        replicas = urls
    try:
        test = load_mnist("test")
    except MnistUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    images, labels = test.images[: a.limit], test.labels[: a.limit]
    bar = tqdm(
        total=len(images), desc="private", unit="img", disable=a.json or not (a.private or replicas)
    )
    try:
        result, shown = evaluate(
            a.directory,
            images,
            labels,
            private=a.private,
            replicas=replicas,
            verify=a.cacert or True,
            comparison=a.comparison,
            batch=a.batch_size,
            progress=bar.update,
        )
    except EvaluateError as exc:
        bar.close()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    bar.close()
    if a.confusion:
        kind = "private" if result.private_accuracy is not None else "plaintext"
        acc = result.private_accuracy if kind == "private" else result.plaintext_accuracy
        title = f"{kind} labels, {result.images} test images: {100 * acc:.2f}%"
        plot_confusion(labels, shown, title, a.confusion)
    if a.json:
        print(json.dumps(asdict(result)))
        return 0
    print(f"model {result.model_version}: {result.images} test images")
    print(f"plaintext accuracy  {100 * result.plaintext_accuracy:.2f}%")
    if result.private_accuracy is not None:
        where = f"{result.mode}, {result.comparison}" if result.comparison else result.mode
        print(f"private accuracy    {100 * result.private_accuracy:.2f}%  ({where})")
        print(
            f"label agreement     {100 * result.agreement:.2f}% with plaintext "
            f"({len(result.disagreements)} disagreements), {result.images_per_s} images/s"
        )
        for d in result.disagreements:
            print(f"  test image {d['index']}: true {d['true']}, plaintext {d['plaintext']}, "
                  f"private {d['private']}")  # fmt: skip
    if a.confusion:
        print(f"confusion matrix: {a.confusion}")
    return 0
