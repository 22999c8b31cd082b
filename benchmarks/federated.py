"""Federated benchmark: the FedAvg paper's MNIST CNN setup, IID and pathological non-IID.

    python -m benchmarks.federated [--json] [--splits iid,shards] [--max-rounds 60]
                                   [--server-opts fedavg,fedavgm] [--dp-table]

100 clients x 600 examples, C = 0.1, E = 5, B = 10 (McMahan et al. 2017, who needed 20 rounds
IID and 229 non-IID to reach 99%). Per split and server optimizer it trains until the test
accuracy reaches 99% (or --max-rounds) and prints rounds_to_99, final_accuracy and wall_s.
--dp-table adds central DP runs (clip 1.0, several noise multipliers) with their epsilon.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace

from training.data import load_mnist
from training.fedavg import FedConfig, train


def run(cfg: FedConfig, train_split, test_split, label: str, quiet: bool) -> dict:
    from tqdm import tqdm

    bar = tqdm(total=cfg.rounds, desc=label, unit="round", disable=quiet, leave=False)
    reached: list[int] = []

    def progress(i: int, m) -> None:
        bar.set_postfix(acc=f"{m.test_accuracy:.4f}")
        bar.update(1)
        if m.test_accuracy >= 0.99 and not reached:
            reached.append(m.round)

    started = time.perf_counter()
    result = train(cfg, train_split, test_split, progress=progress)
    bar.close()
    last = result.history[-1]
    return {
        "split": cfg.partition,
        "server_opt": cfg.server_opt,
        "rounds_run": len(result.history),
        "rounds_to_99": reached[0] if reached else None,
        "final_accuracy": round(last.test_accuracy, 4),
        "best_accuracy": round(max(m.test_accuracy for m in result.history), 4),
        "epsilon": last.epsilon,
        "dp_noise": cfg.dp_noise,
        "wall_s": round(time.perf_counter() - started, 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.federated",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--json", action="store_true", help="one JSON object per run")
    p.add_argument("--splits", default="iid,shards", help="comma list: iid, shards, dirichlet:A")
    p.add_argument("--server-opts", default="fedavg,fedavgm", help="comma list")
    p.add_argument("--max-rounds", type=int, default=60, help="rounds per run (60)")
    p.add_argument("--lr", type=float, default=0.05, help="client learning rate (0.05)")
    p.add_argument("--dp-table", action="store_true", help="add central-DP runs (IID)")
    args = p.parse_args(argv)
    train_split, test_split = load_mnist("train"), load_mnist("test")
    base = FedConfig(
        rounds=args.max_rounds, clients=100, fraction=0.1, local_epochs=5, batch_size=10, lr=args.lr
    )
    runs = [
        replace(base, partition=s, server_opt=o)
        for s in args.splits.split(",")
        for o in args.server_opts.split(",")
    ]
    if args.dp_table:
        runs += [
            replace(base, rounds=min(args.max_rounds, 30), dp_clip=1.0, dp_noise=z, fraction=0.1)
            for z in (0.5, 1.0, 2.0)
        ]
    rows = []
    for cfg in runs:
        row = run(cfg, train_split, test_split, f"{cfg.partition}/{cfg.server_opt}", args.json)
        rows.append(row)
        print(
            json.dumps(row)
            if args.json
            else f"{row['split']:>12} {row['server_opt']:>8}  rounds to 99%: "
            f"{row['rounds_to_99']}  final {100 * row['final_accuracy']:.2f}%  "
            f"eps {row['epsilon']}  {row['wall_s']} s",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
