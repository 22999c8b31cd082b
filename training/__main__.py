"""`python -m training`: federated training of the MNIST CNN, exported as two secret shares.

    python -m training --out models/latest        # 20 rounds, 100 clients, C = 0.1, cnn-bn
    python -m training --recipe noniid --out models/shards   # the 2-shards-per-client split
    python -m training resplit models/latest      # fresh shares (new version), same model
    python -m training evaluate models/latest --private   # 10,000 test images, privately

A run shows a progress bar and writes, atomically into --out: the plaintext model, the two
replica share files and the public manifest.json, metrics.json (per round) and curves.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import IO

EPILOG = """examples:
  python -m training --rounds 5 --out models/quick
  python -m training --recipe noniid --out models/shards
  python -m training --partition dirichlet:0.3 --server-opt fedadam --out models/noniid
  python -m training --model cnn-max --lr 0.1 --augment-shift 1 --rounds 15 --out models/max
  python -m training --dp-clip 1.0 --dp-noise 1.0 --out models/dp
  python -m training --secure-agg --out models/secagg
  python -m training resplit models/quick
"""


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a float > 0."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def unit_interval(low_open: bool, high_open: bool):
    """argparse type: a float in the unit interval, each end open or closed as asked."""

    def parse(text: str) -> float:
        value = float(text)
        ok = (value > 0 if low_open else value >= 0) and (value < 1 if high_open else value <= 1)
        if not ok:
            lo, hi = "(" if low_open else "[", ")" if high_open else "]"
            raise argparse.ArgumentTypeError(f"must be in {lo}0, 1{hi}, got {text}")
        return value

    return parse


_fraction = unit_interval(low_open=True, high_open=False)  # (0, 1]: C, lr decay
_momentum = unit_interval(low_open=False, high_open=True)  # [0, 1)


def _partition(text: str) -> str:
    from training.partition import parse_partition

    try:
        parse_partition(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


# --recipe noniid: the FedAvg paper's pathological split (2 shards of one digit per client) and
# the settings measured for it (docs/federated-benchmark.md); flags given explicitly still win
RECIPES: dict[str, dict[str, object]] = {
    "iid": {},
    "noniid": {
        "partition": "shards",
        "rounds": 150,
        "lr": 0.1,
        "lr_decay": 0.99,
        "bn_freeze_round": 2,
    },
}


def train_parser(recipe: str = "iid") -> argparse.ArgumentParser:
    from training.model import MODEL_HELP, MODELS

    p = argparse.ArgumentParser(
        prog="python -m training",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--recipe",
        choices=sorted(RECIPES),
        default="iid",
        help="iid: the defaults below; noniid: --partition shards --rounds 150 --lr 0.1 "
        "--lr-decay 0.99 --bn-freeze-round 2 (flags given still win)",
    )
    p.add_argument("--rounds", type=positive_int, default=20, help="federated rounds (20)")
    p.add_argument("--clients", type=positive_int, default=100, help="data holders (100)")
    p.add_argument("--fraction", type=_fraction, default=0.1, help="clients per round C (0.1)")
    p.add_argument("--local-epochs", type=positive_int, default=5, help="local epochs E (5)")
    p.add_argument("--batch-size", type=positive_int, default=10, help="local batch B (10)")
    p.add_argument("--lr", type=positive_float, default=0.3, help="client SGD rate (0.3)")
    p.add_argument(
        "--lr-decay",
        type=_fraction,
        default=0.85,
        help="multiply the client rate by this every round: lr * decay**(round-1), in (0, 1] "
        "(0.85)",
    )
    p.add_argument(
        "--client-momentum",
        type=_momentum,
        default=0.0,
        help="heavy-ball momentum of the clients' local SGD, in [0, 1), reset each round (0)",
    )
    p.add_argument(
        "--partition",
        type=_partition,
        default="iid",
        help="iid | dirichlet:ALPHA | shards (FedAvg paper's 2 shards per client)",
    )
    p.add_argument("--server-opt", choices=["fedavg", "fedavgm", "fedadam"], default="fedavg")
    p.add_argument(
        "--server-lr",
        type=positive_float,
        default=None,
        help="server rate (1.0; 0.01 for fedadam)",
    )
    p.add_argument(
        "--server-momentum",
        type=_momentum,
        default=0.9,
        help="fedavgm: server momentum, in [0, 1) (0.9)",
    )
    p.add_argument(
        "--model",
        choices=sorted(MODELS),
        default="cnn-bn",
        help="; ".join(f"{name}: {text}" for name, text in MODEL_HELP.items()),
    )
    p.add_argument(
        "--augment-shift",
        type=int,
        choices=range(5),
        default=1,
        metavar="PIXELS",
        help="client-side augmentation: move each training image by a random shift of up to "
        "this many pixels each way, 0-4 (0: off; 1)",
    )
    p.add_argument(
        "--bn-freeze-round",
        type=int,
        choices=range(1000),
        default=0,
        metavar="R",
        help="from round R on, clients train with batch norm in inference mode: they normalise "
        "with the global running statistics, which stay fixed (0: never; 0)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for partitions, sampling, init")
    p.add_argument(
        "--threads",
        type=positive_int,
        default=1,
        help="torch threads (1: with batches of 10 more threads are slower, and the thread "
        "count changes float summation order, so a run is reproducible at a fixed count)",
    )
    p.add_argument(
        "--dp-clip",
        type=positive_float,
        default=None,
        help="central DP: clip each client's update to this L2 norm",
    )
    p.add_argument(
        "--dp-noise",
        type=float,
        default=0.0,
        help="central DP: noise multiplier (std = noise * clip on the sum)",
    )
    p.add_argument("--dp-delta", type=positive_float, default=1e-5, help="DP delta (1e-5)")
    p.add_argument(
        "--secure-agg",
        action="store_true",
        help="clients send two additive shares to two aggregators",
    )
    p.add_argument(
        "--eval-limit",
        type=positive_int,
        default=None,
        help="evaluate on the first N test images only (faster)",
    )
    p.add_argument(
        "--private-eval",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the test set through the two-party engine on the new shares and record the "
        "private accuracy in the manifest's provenance (default on; about 10 s per 10,000 "
        "images)",
    )
    p.add_argument("--out", type=Path, default=Path("models/latest"), help="output directory")
    p.add_argument("--force", action="store_true", help="replace an existing model in --out")
    p.add_argument("--json", action="store_true", help="print the final metrics as JSON")
    p.set_defaults(**RECIPES[recipe])
    return p


def parse_train_args(argv: list[str]) -> argparse.Namespace:
    """The training flags, with the defaults of the ``--recipe`` named in ``argv``."""
    pre = argparse.ArgumentParser(prog="python -m training", add_help=False)
    pre.add_argument("--recipe", choices=sorted(RECIPES), default="iid")
    recipe = pre.parse_known_args(argv)[0].recipe
    return train_parser(recipe).parse_args(argv)


def plot_curves(history: list[dict], path: Path | IO[bytes]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [h["round"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(rounds, [100 * h["test_accuracy"] for h in history], marker="o")
    ax1.set(xlabel="round", ylabel="test accuracy (%)", title="Accuracy")
    ax1.grid(alpha=0.3)
    ax2.plot(rounds, [h["test_loss"] for h in history], marker="o", label="test")
    ax2.plot(rounds, [h["train_loss"] for h in history], marker="o", label="clients (train)")
    ax2.set(xlabel="round", ylabel="loss", title="Loss")
    ax2.legend()
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def git_commit() -> str | None:
    """The commit of the code that trains (with "-dirty" when it has changes), if known."""
    import subprocess

    repo = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def provenance(argv: list[str], cfg, history: list[dict]) -> dict:
    """How this model was made: the manifest's public `provenance` object."""
    import shlex
    from importlib.metadata import PackageNotFoundError, version

    try:
        package = version("privdigit")
    except PackageNotFoundError:
        package = None
    dp = None
    if cfg.dp_clip is not None:
        dp = {
            "clip": cfg.dp_clip,
            "noise_multiplier": cfg.dp_noise,
            "epsilon": history[-1].get("epsilon"),
            "delta": cfg.dp_delta,
        }
    return {
        "command": "python -m training " + shlex.join(argv),
        "package_version": package,
        "git_commit": git_commit(),
        "trained_by": "federated averaging in process (training.fedavg)",
        "model": cfg.model,
        "rounds": cfg.rounds,
        "partition": cfg.partition,
        "clients": cfg.clients,
        "fraction": cfg.fraction,
        "local_epochs": cfg.local_epochs,
        "batch_size": cfg.batch_size,
        "server_optimizer": cfg.server_opt,
        "seed": cfg.seed,
        "bn_freeze_round": cfg.bn_freeze_round,
        "dp": dp,
        "secure_aggregation": cfg.secure_agg,
        "plaintext_test_accuracy": history[-1]["test_accuracy"],
        "test_images": None,
        "private_test_accuracy": None,
        "private_label_agreement": None,
    }


def run_train(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    from tqdm import tqdm

    from training.data import MnistUnavailable, load_mnist
    from training.export import ExportError, export_model
    from training.fedavg import FedConfig, train
    from training.model import export_state

    if args.dp_noise < 0:
        print("error: --dp-noise must be >= 0", file=sys.stderr)
        return 2
    if args.dp_noise > 0 and args.dp_clip is None:
        print(
            "error: --dp-noise needs --dp-clip (the sensitivity it is scaled by)", file=sys.stderr
        )
        return 2
    out = args.out
    if out.exists() and any(out.iterdir()) and not args.force:
        print(f"error: {out} already holds a model; pass --force to replace it", file=sys.stderr)
        return 2
    cfg = FedConfig(
        rounds=args.rounds,
        clients=args.clients,
        fraction=args.fraction,
        local_epochs=args.local_epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        lr_decay=args.lr_decay,
        client_momentum=args.client_momentum,
        augment_shift=args.augment_shift,
        bn_freeze_round=args.bn_freeze_round,
        partition=args.partition,
        seed=args.seed,
        model=args.model,
        server_opt=args.server_opt,
        server_lr=args.server_lr or (0.01 if args.server_opt == "fedadam" else 1.0),
        server_momentum=args.server_momentum,
        dp_clip=args.dp_clip,
        dp_noise=args.dp_noise,
        dp_delta=args.dp_delta,
        secure_agg=args.secure_agg,
        eval_limit=args.eval_limit,
    )
    try:
        train_split, test_split = load_mnist("train"), load_mnist("test")
    except MnistUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    import torch

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    bar = tqdm(total=cfg.rounds, desc="federated rounds", unit="round", disable=args.json)

    def progress(_: int, metrics) -> None:
        bar.set_postfix(acc=f"{metrics.test_accuracy:.4f}", loss=f"{metrics.test_loss:.3f}")
        bar.update(1)

    result = train(cfg, train_split, test_split, progress=progress)
    bar.close()
    history = [asdict(m) for m in result.history]
    metrics = {
        "config": asdict(cfg),
        "rounds": history,
        "wall_s": round(time.perf_counter() - started, 2),
    }
    origin = provenance(argv if argv is not None else sys.argv[1:], cfg, history)

    from training.evaluate import with_private_accuracy

    # the whole test set through the two-party engine on the shares just written
    private_eval = with_private_accuracy(
        origin, test_split.images, test_split.labels, args.private_eval
    )

    try:
        import io

        png = io.BytesIO()
        plot_curves(history, png)
        if args.private_eval and not args.json:
            print(f"evaluating {len(test_split.labels)} test images privately ...", flush=True)
        manifest = export_model(
            export_state(result.model),
            result.model.layers(),
            out,
            force=args.force,
            extra_files={
                "metrics.json": (json.dumps(metrics, indent=2) + "\n").encode(),
                "curves.png": png.getvalue(),
            },
            extra_manifest={
                "training": {
                    "final_test_accuracy": history[-1]["test_accuracy"],
                    "rounds": cfg.rounds,
                    "epsilon": history[-1].get("epsilon"),
                }
            },
            amend=private_eval,
        )
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary = {
        "out": str(out),
        "model_version": manifest["model_version"],
        "final_test_accuracy": history[-1]["test_accuracy"],
        "private_test_accuracy": manifest["provenance"]["private_test_accuracy"],
        "private_label_agreement": manifest["provenance"]["private_label_agreement"],
        "epsilon": history[-1].get("epsilon"),
        "wall_s": metrics["wall_s"],
    }
    if args.json:
        print(json.dumps(summary))
    else:
        eps = f", epsilon {summary['epsilon']:.2f}" if summary["epsilon"] else ""
        private = ""
        if summary["private_test_accuracy"] is not None:
            private = (
                f", private {100 * summary['private_test_accuracy']:.2f}% (labels equal to "
                f"plaintext on {100 * summary['private_label_agreement']:.2f}%)"
            )
        print(
            f"test accuracy {100 * summary['final_test_accuracy']:.2f}%{private}{eps}; wrote "
            f"{out}/ (model version {manifest['model_version']})"
        )
    return 0


def run_resplit(argv: list[str]) -> int:
    from training.export import ExportError, resplit

    p = argparse.ArgumentParser(
        prog="python -m training resplit",
        description="Fresh shares and a new model version for a model.",
    )
    p.add_argument("directory", type=Path, help="a directory written by python -m training")
    args = p.parse_args(argv)
    try:
        manifest = resplit(args.directory)
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"re-split {args.directory}: model version {manifest['model_version']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["resplit"]:
        return run_resplit(argv[1:])
    if argv[:1] == ["evaluate"]:
        from training.evaluate import main as run_evaluate

        return run_evaluate(argv[1:])
    return run_train(parse_train_args(argv), argv)


if __name__ == "__main__":
    sys.exit(main())
