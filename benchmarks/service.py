"""Service benchmark: the local cluster end to end, through the real client over loopback HTTP.

    python -m benchmarks.service [--json] [--requests 200] [--clients 8] [--seconds 10]
                                 [--comparison lut|a2b|fss|hybrid] [--pause-ms 0]

Starts dealer and both replicas (free ports, bundled model unless --model), then measures
  latency_ms_p50 / p95   one client, one image per request, client call to label; requests
                         back to back, or --pause-ms apart (idle time in which the replicas
                         refill their prefetched dealer material, as between real users)
  images_per_s           --clients concurrent clients, one image per request, for --seconds
  peer_bytes_per_image, rounds   what the replicas report for one image
and checks every label against the labels of a first pass (wrong_labels must be 0).
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import numpy as np

from benchmarks import metric, print_result
from clients.privdigit import PrivDigitClient
from service.cluster import DEFAULT_MODEL, Cluster, free_ports
from service.mpc import protocols

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "mnist_test_1000.npz"


def _images(n: int) -> tuple[np.ndarray, np.ndarray]:
    data = np.load(FIXTURE)
    return data["images"][:n].astype(np.float64) / 255.0, data["labels"][:n]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.service",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--requests", type=int, default=200, help="sequential single-image requests")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients for throughput")
    p.add_argument("--seconds", type=float, default=10.0, help="throughput phase duration")
    p.add_argument("--model", help="model directory (default: bundled)")
    p.add_argument(
        "--comparison",
        choices=protocols.NAMES,
        default=protocols.DEFAULT,
        help=f"protocol (default: {protocols.DEFAULT})",
    )
    p.add_argument("--pause-ms", type=float, default=0.0, help="idle time between latency requests")
    a = p.parse_args(argv)
    import httpx
    from tqdm import tqdm

    x, truth = _images(1000)
    cluster = Cluster(
        model=Path(a.model) if a.model else DEFAULT_MODEL,
        ports=free_ports(3),
        replica_args=("--comparison", a.comparison),
    )
    with cluster:
        urls = cluster.replica_urls
        with PrivDigitClient(urls) as client:
            reference = [p.label for p in client.predict_encoded(x[:64])]  # warm-up + oracle
            m0 = httpx.get(f"{urls[0]}/metrics").text
            latencies, wrong = [], 0
            for i in tqdm(range(a.requests), desc="latency", disable=a.json, leave=False):
                started = time.perf_counter()
                pred = client.predict_encoded(x[i % 64 : i % 64 + 1])[0]
                latencies.append((time.perf_counter() - started) * 1000)
                wrong += pred.label != reference[i % 64]
                time.sleep(a.pause_ms / 1000)
            m1 = httpx.get(f"{urls[0]}/metrics").text
        rounds = (
            metric(m1, "privdigit_protocol_rounds_total")
            - metric(m0, "privdigit_protocol_rounds_total")
        ) / a.requests
        peer_bytes = (
            metric(m1, "privdigit_peer_bytes_sent_total")
            - metric(m0, "privdigit_peer_bytes_sent_total")
        ) / a.requests

        done, errors, bad = [0] * a.clients, [0] * a.clients, [0] * a.clients
        stop = threading.Event()

        def worker(k: int) -> None:
            with PrivDigitClient(urls) as c:
                i = k
                while not stop.is_set():
                    try:
                        label = c.predict_encoded(x[i % 64 : i % 64 + 1])[0].label
                        bad[k] += label != reference[i % 64]
                        done[k] += 1
                    except Exception:
                        errors[k] += 1
                    i += a.clients

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(a.clients)]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for _ in tqdm(range(int(a.seconds)), desc="throughput", disable=a.json, leave=False):
            time.sleep(1)
        stop.set()
        for t in threads:
            t.join()
        wall = time.perf_counter() - started

    result = {
        "latency_ms_p50": round(float(np.percentile(latencies, 50)), 2),
        "latency_ms_p95": round(float(np.percentile(latencies, 95)), 2),
        "images_per_s": round(sum(done) / wall, 1),
        "concurrent_clients": a.clients,
        "pause_ms": a.pause_ms,
        "comparison": a.comparison,
        "peer_bytes_per_image": int(peer_bytes),
        "rounds": rounds,
        "errors": sum(errors),
        "wrong_labels": int(wrong + sum(bad)),
        "accuracy_first_64": float(np.mean(np.array(reference) == truth[:64])),
    }
    print_result(result, a.json)
    return 0 if result["errors"] == 0 and result["wrong_labels"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
