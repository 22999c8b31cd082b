"""Federated benchmark: the FedAvg paper's MNIST CNN setup, IID and pathological non-IID.

    python -m benchmarks.federated [--json] [--splits iid,shards] [--server-opts fedavg,fedavgm]
                                   [--max-rounds N] [--stop-at-target] [--dp-table]

100 clients x 600 examples, C = 0.1, E = 5, B = 10 (McMahan et al. 2017, who needed 20 rounds
IID and 229 non-IID to reach 99%); those four are fixed. Per split and server optimizer it
trains for --max-rounds (default: 20 IID, 200 shards/dirichlet) and prints rounds_to_99 (first
round with test accuracy >= 99%), stays_99_from (first round of 10 in a row >= 99%),
min_last_5, final_accuracy, best_accuracy, wall_s, s_per_round and the model's private cost
per image (secure comparisons, multiply-adds).
The defaults of the free knobs (model, client rate and its decay, client momentum, server
optimizers) are the best settings found; see docs/federated-benchmark.md.
--dp-table adds central-DP runs on IID (clip --dp-clip, several noise multipliers; 0 = clipping
only) with their epsilon at --dp-delta from the RDP accountant.
SIGTERM or Ctrl-C ends the current run and still prints its row (the rounds completed).
Runs use one torch thread by default (--threads): on two shared cores, and with batches of 10,
more threads make a round slower, and the thread count changes float summation order.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from dataclasses import asdict, replace
from math import inf
from pathlib import Path

from training.__main__ import positive_float, positive_int, unit_interval
from training.fedavg import SERVER_OPTS, FedConfig, RoundMetrics, train
from training.model import MODELS, build_model, inference_cost
from training.partition import parse_partition

TARGET = 0.99
DEFAULT_ROUNDS = {"iid": 20}
DEFAULT_ROUNDS_NONIID = 200
DP_NOISES = "0,0.1,0.3,1.0"
DEFAULT_MODEL = "cnn-bn"  # the served architecture (python -m training's default)
# client schedule lr * decay**(round-1) and client-side random shifts (pixels): IID is
# python -m training's recipe; non-IID adds frozen batch-norm statistics from round 2
# (docs/federated-benchmark.md). cnn-max's rows used IID lr 0.1 / 1.0, non-IID 0.05 / 0.995.
IID_LR, IID_DECAY = 0.3, 0.85
NONIID_LR, NONIID_DECAY, NONIID_BN_FREEZE = 0.1, 0.99, 2
AUGMENT_SHIFT = 1
LAST = 5  # min_last_5: the minimum test accuracy over the last LAST rounds
STAY = 10  # stays_99_from: first round that starts STAY consecutive rounds >= 99%


def run(
    cfg: FedConfig, train_split, test_split, label: str, quiet: bool, stop_at_target: bool
) -> dict:
    from tqdm import tqdm

    bar = tqdm(total=cfg.rounds, desc=label, unit="round", disable=quiet, file=sys.stderr)
    reached: list[int] = []
    curve: list[float | None] = []
    eps: list[float] = []

    def progress(_: int, m: RoundMetrics) -> None:
        curve.append(m.test_accuracy)
        if m.epsilon is not None:
            eps.append(m.epsilon)
        bar.set_postfix(acc=f"{m.test_accuracy:.4f}", best=f"{max(c or 0 for c in curve):.4f}")
        bar.update(1)
        if m.test_accuracy is not None and m.test_accuracy >= TARGET and not reached:
            reached.append(m.round)
            reached_s.append(time.perf_counter() - started)

    reached_s: list[float] = []
    started = time.perf_counter()
    interrupted = False
    try:
        train(
            cfg,
            train_split,
            test_split,
            progress=progress,
            stop=lambda _: stop_at_target and bool(reached),
        )
    except KeyboardInterrupt:  # Ctrl-C / SIGINT: report the rounds run so far
        interrupted = True
    bar.close()
    wall = time.perf_counter() - started
    if not curve:  # interrupted before the first round ended
        raise KeyboardInterrupt
    done = [c for c in curve if c is not None]
    stays = next(
        (
            i + 1
            for i in range(len(curve) - STAY + 1)
            if all(c is not None and c >= TARGET for c in curve[i : i + STAY])
        ),
        None,
    )
    return {
        "split": cfg.partition,
        "server_opt": cfg.server_opt,
        "model": cfg.model,
        "rounds_run": len(curve),
        "interrupted": interrupted,
        "rounds_to_99": reached[0] if reached else None,
        "final_accuracy": round(done[-1], 4) if done else None,
        "best_accuracy": round(max(done), 4) if done else None,
        f"min_last_{LAST}": round(min(done[-LAST:]), 4) if done else None,
        "stays_99_from": stays,
        # epsilon at dp_delta; None without DP and for noise 0 (clipping only: epsilon = inf)
        "epsilon": None if not eps or eps[-1] == inf else round(eps[-1], 3),
        "dp_noise": cfg.dp_noise if cfg.dp_clip is not None else None,
        "wall_s": round(wall, 1),
        "wall_s_to_99": round(reached_s[0], 1) if reached_s else None,
        "s_per_round": round(wall / len(curve), 2),
        # private-inference cost per image of the model (the engine's comparisons dominate)
        **{f"{k}_per_image": v for k, v in _cost(cfg.model).items()},
        "accuracy_curve": [None if c is None else round(c, 4) for c in curve],
        "config": asdict(cfg),
    }


def _cost(model: str) -> dict[str, int]:
    import torch

    with torch.device("meta"):
        return inference_cost(build_model(model).layers())


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _server_opts(text: str) -> list[str]:
    opts = _csv(text)
    bad = [o for o in opts if o not in SERVER_OPTS]
    if not opts or bad:
        raise argparse.ArgumentTypeError(f"server optimizers must be in {SERVER_OPTS}, got {text}")
    return opts


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _splits(text: str) -> list[str]:
    splits = _csv(text)
    try:
        for s in splits:
            parse_partition(s)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not splits:
        raise argparse.ArgumentTypeError("need at least one split")
    return splits


def _noises(text: str) -> list[float]:
    try:
        values = [float(t) for t in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"need comma-separated numbers, got {text}") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"noise multipliers must be >= 0, got {text}")
    return values


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.federated",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--json", action="store_true", help="one JSON object per run, no progress bar")
    p.add_argument("--splits", type=_splits, default="iid,shards", help="iid, shards, dirichlet:A")
    p.add_argument("--server-opts", type=_server_opts, default="fedavg,fedavgm", help="comma list")
    p.add_argument(
        "--max-rounds",
        type=positive_int,
        default=None,
        help=f"rounds per run (default {DEFAULT_ROUNDS['iid']} IID, {DEFAULT_ROUNDS_NONIID} "
        "non-IID)",
    )
    p.add_argument(
        "--stop-at-target",
        action="store_true",
        help="stop a run at the first round with test accuracy >= 99%%",
    )
    p.add_argument(
        "--model", choices=sorted(MODELS), default=DEFAULT_MODEL, help=f"({DEFAULT_MODEL})"
    )
    p.add_argument(
        "--lr",
        type=positive_float,
        default=None,
        help=f"client rate (IID {IID_LR}, non-IID {NONIID_LR})",
    )
    p.add_argument(
        "--lr-decay",
        type=unit_interval(True, False),
        default=None,
        help=f"client rate x this per round (IID {IID_DECAY}, non-IID {NONIID_DECAY})",
    )
    p.add_argument(
        "--client-momentum",
        type=unit_interval(False, True),
        default=0.0,
        help="client SGD momentum (0)",
    )
    p.add_argument(
        "--augment-shift",
        type=int,
        choices=range(5),
        default=None,
        metavar="PIXELS",
        help=f"client-side random shifts of up to this many pixels, 0-4 ({AUGMENT_SHIFT})",
    )
    p.add_argument(
        "--bn-freeze-round",
        type=_non_negative,
        default=None,
        metavar="R",
        help="from round R on, clients train with batch norm in inference mode (global running "
        f"statistics, frozen); 0: never (IID 0, non-IID {NONIID_BN_FREEZE})",
    )
    p.add_argument(
        "--server-lr",
        type=positive_float,
        default=None,
        help="server rate (1.0; 0.01 for fedadam)",
    )
    p.add_argument(
        "--server-momentum",
        type=unit_interval(False, True),
        default=0.9,
        help="fedavgm momentum (0.9)",
    )
    p.add_argument("--out", type=Path, default=None, help="also append each JSON row to this file")
    p.add_argument("--seed", type=int, default=0, help="seed (0)")
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads (1)")
    p.add_argument("--dp-table", action="store_true", help="add central-DP runs (IID)")
    p.add_argument(
        "--dp-only", action="store_true", help="only the central-DP runs (implies --dp-table)"
    )
    p.add_argument("--dp-noises", type=_noises, default=DP_NOISES, help=f"({DP_NOISES})")
    p.add_argument("--dp-clip", type=positive_float, default=1.0, help="update clip norm (1.0)")
    p.add_argument("--dp-delta", type=positive_float, default=1e-5, help="DP delta (1e-5)")
    p.add_argument("--dp-rounds", type=positive_int, default=20, help="rounds per DP run (20)")
    p.add_argument("--dp-server-opt", choices=SERVER_OPTS, default="fedavg", help="(fedavg)")
    return p


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # SIGTERM ends a run like Ctrl-C: the rounds so far are reported (a job started in the
    # background has SIGINT ignored, so SIGTERM is the way to stop it early)
    signal.signal(signal.SIGTERM, _interrupt)
    import torch

    from training.data import MnistUnavailable, load_mnist

    torch.set_num_threads(args.threads)
    try:
        train_split, test_split = load_mnist("train"), load_mnist("test")
    except MnistUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    splits, opts, noises = args.splits, args.server_opts, args.dp_noises  # parsed by type=
    base = FedConfig(
        clients=100,
        fraction=0.1,
        local_epochs=5,
        batch_size=10,
        client_momentum=args.client_momentum,
        augment_shift=AUGMENT_SHIFT if args.augment_shift is None else args.augment_shift,
        model=args.model,
        seed=args.seed,
        server_momentum=args.server_momentum,
    )

    def server_lr(opt: str) -> float:
        return args.server_lr or (0.01 if opt == "fedadam" else 1.0)

    def schedule(split: str) -> dict[str, float]:
        iid = split == "iid"
        freeze = args.bn_freeze_round
        return {
            "lr": args.lr or (IID_LR if iid else NONIID_LR),
            "lr_decay": args.lr_decay or (IID_DECAY if iid else NONIID_DECAY),
            "bn_freeze_round": freeze if freeze is not None else (0 if iid else NONIID_BN_FREEZE),
        }

    runs: list[FedConfig] = []
    if not args.dp_only:
        for s in splits:
            rounds = args.max_rounds or DEFAULT_ROUNDS.get(s, DEFAULT_ROUNDS_NONIID)
            runs += [
                replace(
                    base,
                    rounds=rounds,
                    partition=s,
                    server_opt=o,
                    server_lr=server_lr(o),
                    **schedule(s),
                )
                for o in opts
            ]
    if args.dp_table or args.dp_only:
        runs += [
            replace(
                base,
                rounds=args.dp_rounds,
                partition="iid",
                **schedule("iid"),
                server_opt=args.dp_server_opt,
                server_lr=server_lr(args.dp_server_opt),
                dp_clip=args.dp_clip,
                dp_noise=z,
                dp_delta=args.dp_delta,
            )
            for z in noises
        ]
    for cfg in runs:
        label = f"{cfg.partition}/{cfg.server_opt}" + (
            f"/dp z={cfg.dp_noise}" if cfg.dp_clip is not None else ""
        )
        row = run(cfg, train_split, test_split, label, args.json, args.stop_at_target)
        if args.out is not None:
            with args.out.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            eps = f"  epsilon {row['epsilon']}" if row["epsilon"] is not None else ""
            print(
                f"{row['split']:>8} {row['server_opt']:>8}  rounds to 99%: "
                f"{row['rounds_to_99']}  stays from {row['stays_99_from']}  min last {LAST} "
                f"{100 * row[f'min_last_{LAST}']:.2f}%  final "
                f"{100 * row['final_accuracy']:.2f}%  best "
                f"{100 * row['best_accuracy']:.2f}%{eps}  {row['wall_s']} s "
                f"({row['s_per_round']} s/round)",
                flush=True,
            )
        if row["interrupted"]:
            break
    return 0


if __name__ == "__main__":
    sys.exit(main())
