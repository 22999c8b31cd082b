"""The cost of distance: latency and throughput with the replicas a round-trip time apart.

    python -m benchmarks.wan [--json] [--rtt-ms 0.2,2,10,40] [--comparison lut,a2b,fss,hybrid]
                             [--client-rtt-ms 1] [--requests 30] [--pause-ms 0] [--clients 32]
                             [--seconds 10]
                             [--warmup 3] [--delay auto|relay|netem] [--plot FILE.png]

Runs the deployment on the netns rig (`service.netrig`, root only): dealer, replica 0,
replica 1 and the client each in its own network namespace, TLS everywhere. For each protocol
it starts the three processes once, measures `--requests` sequential one-image requests from
one client at each RTT (between the replicas, and between each replica and the dealer), back
to back or `--pause-ms` apart, the RTTs alternated request by request so that the shared
machine's load falls on all alike, then, at each RTT, `--clients` concurrent clients for
`--seconds` after `--warmup` seconds of the same load (`benchmarks.load`'s lean client; every
label checked against the plaintext model).
The client is `--client-rtt-ms` from each replica.

One row per (RTT, protocol): rtt_ms, comparison, rounds (protocol rounds per request),
latency_ms_p50, latency_ms_p95 (batch 1, one client), images_per_s (concurrent clients),
peer_bytes_per_image (sent by replica 0), prefetched_pct (one-image runs whose dealer material
was ready: the others wait for the dealer on the request's path), and budget_ms /
within_budget: the issue's target,
p50 at this RTT <= p50 at the smallest RTT + (rounds + 1) x the RTT difference (no round trip
on a request's path beyond the protocol's rounds and the request's own). `delay` says whether
the relay (user space) or netem made the delay. Without --json, a table; with it, one JSON
object per row. Exit status: 0, or 1 when a label was wrong or a request failed, 2 when the rig
cannot be built here.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from benchmarks import metric
from benchmarks.load import DATA, LeanClient, Load, plaintext_labels
from clients.privdigit import PrivDigitError
from service.mpc import protocols
from service.netrig import NetRig, RigError, unavailable

WARMUP = 5  # one-image requests before the latency figures (connections, prefetch, caches)
FIELDS = ("rtt_ms", "comparison", "rounds", "latency_ms_p50", "latency_ms_p95", "images_per_s",
          "peer_bytes_per_image", "prefetched_pct", "budget_ms", "within_budget")  # fmt: skip


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError("give one or more round-trip times >= 0, in ms")
    return values


def _protocols(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [n for n in names if n not in protocols.REGISTRY]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown protocol(s) {unknown}; choose from {', '.join(protocols.NAMES)}"
        )
    return names


def _latency(
    rig: NetRig,
    cluster: Any,
    rtts: list[float],
    images: np.ndarray,
    expected: np.ndarray,
    n: int,
    pause_s: float = 0.0,
) -> dict[float, dict[str, Any]]:
    """`n` sequential one-image requests at each RTT, the RTTs alternated request by request
    (so the machine's load changes all of them alike), in the client's namespace: latencies,
    and from replica 0's metrics the rounds, peer bytes and prefetch hits per request."""
    verify = cluster.verify
    metrics = f"{cluster.replica_urls[0]}/metrics"
    names = {
        "rounds": "privdigit_protocol_rounds_total",
        "bytes": "privdigit_peer_bytes_sent_total",
        "hits": 'privdigit_prefetch_total{result="hit"}',
    }
    got: dict[float, dict[str, Any]] = {
        r: {"ms": [], "wrong": 0, "errors": [], **dict.fromkeys(names, 0.0)} for r in rtts
    }
    with LeanClient(cluster.replica_urls, context=verify) as client:
        for i in range(WARMUP):
            with contextlib.suppress(PrivDigitError):
                client.label(images[i])
        for i in range(n * len(rtts)):
            rtt, j = rtts[i % len(rtts)], (WARMUP + i) % len(images)
            rig.set_rtt(rtt)
            time.sleep(pause_s)  # a user's think time: the replicas prefetch in such pauses
            m0 = httpx.get(metrics, verify=verify).text
            started = time.perf_counter()
            try:
                label = client.label(images[j])
            except PrivDigitError as exc:
                got[rtt]["errors"].append(str(exc)[:300])
                continue
            got[rtt]["ms"].append((time.perf_counter() - started) * 1000)
            m1 = httpx.get(metrics, verify=verify).text
            got[rtt]["wrong"] += label != int(expected[j])
            for key, name in names.items():
                got[rtt][key] += metric(m1, name) - metric(m0, name)
    rows = {}
    for rtt, g in got.items():
        if not g["ms"]:
            raise RigError(f"every request at {rtt:g} ms failed, e.g. {g['errors'][0]}")
        ok = len(g["ms"])
        rows[rtt] = {
            "rounds": round(g["rounds"] / ok, 1),
            "latency_ms_p50": round(float(np.percentile(g["ms"], 50)), 2),
            "latency_ms_p95": round(float(np.percentile(g["ms"], 95)), 2),
            "peer_bytes_per_image": int(g["bytes"] / ok),
            "prefetched_pct": round(100 * g["hits"] / ok),
            "wrong_labels": int(g["wrong"]),
            "latency_errors": len(g["errors"]),
            "latency_error_examples": g["errors"][:3],
        }
    return rows


def _throughput(
    cluster: Any, images, expected, clients: int, seconds: float, warmup: float
) -> dict[str, Any]:
    load = Load(cluster.replica_urls, images, expected, verify=cluster.verify)
    if warmup > 0:  # batch sizes the single requests did not use, connections, caches
        load.run(clients, warmup, desc="warm-up", progress=False)
        load.reset()
    wall = load.run(clients, seconds, desc="load", progress=False)
    errors = sum(load.errors.values())
    return {
        "images_per_s": round((load.requests - errors) / wall, 1),
        "errors": errors,
        "wrong_labels": int(load.wrong),
        "error_examples": load.error_examples,
    }


def run(a: argparse.Namespace, progress=lambda msg: None) -> list[dict[str, Any]]:
    data = np.load(DATA)
    images = data["images"][:200].astype(np.float64) / 255.0
    expected = plaintext_labels(images, None)
    rows: list[dict[str, Any]] = []
    rtts = sorted(a.rtt_ms)
    with NetRig(rtt_ms=rtts[0], client_rtt_ms=a.client_rtt_ms, delay=a.delay) as rig:
        for protocol in a.comparison:
            cluster = rig.cluster(
                log_dir=Path(tempfile.mkdtemp(prefix="privdigit-wan-")),
                replica_args=("--comparison", protocol),
            )
            rig.run("client", cluster.start)
            try:
                progress(f"{protocol}: latency at {', '.join(f'{r:g}' for r in rtts)} ms")
                latency = rig.run(
                    "client", _latency, rig, cluster, rtts, images, expected, a.requests,
                    a.pause_ms / 1000,
                )  # fmt: skip
                base = latency[rtts[0]]
                for rtt in rtts:
                    rig.set_rtt(rtt)
                    progress(f"{protocol} at {rtt:g} ms: {a.clients} clients")
                    thr = rig.run(
                        "client", _throughput, cluster, images, expected, a.clients, a.seconds,
                        a.warmup,
                    )  # fmt: skip
                    lat = latency[rtt]
                    row = {"rtt_ms": rtt, "comparison": protocol, **lat, **thr}
                    budget = base["latency_ms_p50"] + (lat["rounds"] + 1) * (rtt - rtts[0])
                    row["budget_ms"] = round(budget, 2)
                    row["within_budget"] = row["latency_ms_p50"] <= budget
                    row["wrong_labels"] = lat["wrong_labels"] + thr["wrong_labels"]
                    row["client_rtt_ms"], row["delay"] = a.client_rtt_ms, rig.used
                    rows.append(row)
            finally:
                cluster.stop()
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    head = ("rtt_ms", "comparison", "rounds", "p50_ms", "p95_ms", "images/s", "peer_B/img",
            "prefetch%", "budget_ms", "ok")  # fmt: skip
    lines = [" ".join(f"{h:>10}" for h in head)]
    for r in rows:
        cells = [r[f] for f in FIELDS]
        lines.append(" ".join(f"{c!s:>10}" for c in cells))
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for protocol in dict.fromkeys(r["comparison"] for r in rows):
        mine = [r for r in rows if r["comparison"] == protocol]
        ax.plot(
            [r["rtt_ms"] for r in mine],
            [r["latency_ms_p50"] for r in mine],
            marker="o",
            label=f"{protocol} ({mine[0]['rounds']:g} rounds)",
        )
    ax.set_xlabel("round-trip time between the replicas and to the dealer (ms)")
    ax.set_ylabel("latency p50, one image (ms)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.wan",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--json", action="store_true", help="one JSON object per row")
    p.add_argument("--rtt-ms", type=_floats, default=[0.2, 2, 10, 40], help="e.g. 0.2,2,10,40")
    p.add_argument(
        "--comparison",
        type=_protocols,
        default=list(protocols.NAMES),
        help=f"protocols, comma-separated (default: {','.join(protocols.NAMES)})",
    )
    p.add_argument("--client-rtt-ms", type=float, default=1.0, help="client to each replica")
    p.add_argument("--requests", type=int, default=30, help="sequential requests per row")
    p.add_argument(
        "--pause-ms",
        type=float,
        default=0.0,
        help="idle time before each sequential request (default 0: back to back)",
    )
    p.add_argument("--clients", type=int, default=32, help="concurrent clients for images/s")
    p.add_argument("--seconds", type=float, default=10.0, help="throughput phase per row")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds of load before each row")
    p.add_argument(
        "--delay",
        choices=("auto", "relay", "netem"),
        default="auto",
        help="what makes the delay: netem where the kernel has it (auto), or the relay",
    )
    p.add_argument("--plot", type=Path, help="also draw p50 latency against RTT into this PNG")
    a = p.parse_args(argv)
    if a.requests < 1 or a.clients < 1 or a.seconds <= 0 or min(a.client_rtt_ms, a.pause_ms) < 0:
        p.error(
            "--requests and --clients must be >= 1, --seconds > 0, --client-rtt-ms and "
            "--pause-ms >= 0"
        )
    if (reason := unavailable()) is not None:
        print(f"error: the netns rig cannot run here: {reason}", file=sys.stderr)
        return 2
    say = (lambda msg: None) if a.json else (lambda msg: print(msg, file=sys.stderr, flush=True))
    try:
        rows = run(a, say)
    except RigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if a.json:
        for row in rows:
            print(json.dumps(row))
    else:
        print(table(rows))
        print(f"delay by {rows[0]['delay']}; client {a.client_rtt_ms:g} ms from each replica")
    if a.plot:
        plot(rows, a.plot, f"privdigit on the netns rig (delay: {rows[0]['delay']})")
    bad = sum(r["errors"] + r["latency_errors"] + r["wrong_labels"] for r in rows)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
