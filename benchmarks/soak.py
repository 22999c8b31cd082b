"""Soak: load with changing concurrency while the model is refreshed; both replicas' memory.

    python -m benchmarks.soak [--seconds 120] [--refreshes 6] [--clients 1,4,16] [--phase 5]
                              [--warmup 15] [--sample 0.5] [--max-slope MB_PER_MIN] [--json]
                              [--model DIR] [--prefetch-max-age S] [--prefetch-max-entries N]

Copies the model (the bundled one unless --model) into a temporary directory and starts a local
deployment on it (`service.cluster.Cluster`, replicas watching the directory every 0.2 s).
Client threads (the lean client of `benchmarks.load`) send one image per request, labels checked
against the plaintext model; the number of active clients cycles through --clients every
--phase seconds, so party 0 prefetches material ahead for several batch sizes in turn. During
the measured --seconds (after --warmup seconds of the same load), the model is re-split
--refreshes times (`training.export.resplit`, what `python -m training resplit DIR` does: same
weights, a new version); each refresh waits until both replicas serve the new version. Clients
fetch the serving version again after each refresh (and after a `model_version_mismatch`,
counted apart as `stale_version_retries`).

Every --sample seconds it reads both replicas' RSS (VmRSS, /proc/PID/status) and the prefetched
entries they hold (`privdigit_prefetch_entries`). Prints, per replica: RSS at the start of the
measured run, its peak and its end (MB), the least-squares slope over the measured run (MB per
minute; also over its second half alone), and the most prefetched entries held; plus requests,
errors, wrong labels, images/s and each refresh's switch time. Memory is flat when the slope
stays near zero while the refreshes go on (before bounded prefetching, party 1 kept every entry
party 0 dropped).
Exit status: 0 with no errors and no wrong labels (and, with --max-slope, no replica's slope
above it), 1 otherwise, 2 on a usage or startup error.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from benchmarks import metric, print_result
from benchmarks.load import DATA, LeanClient, _mb, plaintext_labels, rss_bytes
from clients.privdigit import PrivDigitError, ServiceError
from service.cluster import DEFAULT_MODEL, Cluster, ClusterError, free_ports

ROLES = ("replica0", "replica1")


def _gauge(url: str, name: str) -> float | None:
    try:
        text = httpx.get(f"{url}/metrics", timeout=5).text
    except httpx.HTTPError:
        return None
    return metric(text, name)


def slope_mb_per_min(times: list[float], rss: list[int]) -> float | None:
    """Least-squares slope of RSS (MB) against time (minutes)."""
    if len(times) < 3 or max(times) - min(times) <= 0:
        return None
    t = np.asarray(times) / 60.0
    y = np.asarray(rss, dtype=np.float64) / 2**20
    return round(float(np.polyfit(t, y, 1)[0]), 3)


class Soak:
    """Client threads whose active count follows `active`; results counted under a lock."""

    def __init__(self, urls: tuple[str, str], images: np.ndarray, expected: np.ndarray) -> None:
        self.urls, self.images, self.expected = urls, images, expected
        self.active = 0
        self.generation = 0  # bumped by each refresh: clients fetch the version again
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.ok = self.wrong = self.stale = 0
            self.errors: Counter[str] = Counter()
            self.examples: dict[str, str] = {}

    def client(self, k: int, n_clients: int) -> None:
        i, seen = k, self.generation
        with LeanClient(self.urls) as client:
            while not self.stop.is_set():
                if k >= self.active:
                    client.close()  # the server would close it idle: open anew when active
                    self.stop.wait(0.05)
                    continue
                if seen != self.generation:
                    seen = self.generation
                    client.forget_model()
                j = i % len(self.images)
                i += n_clients
                try:
                    label = client.label(self.images[j])
                except ServiceError as exc:
                    if exc.code == "model_version_mismatch":  # as a client should: ask again
                        client.forget_model()
                        with self._lock:
                            self.stale += 1
                        continue
                    self._error(f"ServiceError:{exc.status}:{exc.code}", str(exc))
                    continue
                except PrivDigitError as exc:
                    self._error(type(exc).__name__, str(exc))
                    continue
                with self._lock:
                    self.ok += 1
                    self.wrong += label != int(self.expected[j])

    def _error(self, kind: str, detail: str) -> None:
        with self._lock:
            self.errors[kind] += 1
            self.examples.setdefault(kind, detail[:300])


def _serving(urls: tuple[str, str]) -> list[str | None]:
    out = []
    for u in urls:
        try:
            out.append(httpx.get(f"{u}/v1/ready", timeout=5).json().get("serving_version"))
        except (httpx.HTTPError, ValueError):
            out.append(None)
    return out


def run(a: argparse.Namespace, cluster: Cluster, model_dir: Path) -> dict[str, Any]:
    from training.export import resplit

    images = np.load(DATA)["images"].astype(np.float64) / 255.0
    expected = plaintext_labels(images, Path(a.model) if a.model else None)
    urls = cluster.replica_urls
    pids = {r: cluster.procs[r].pid for r in ROLES}
    cycle = a.clients
    soak = Soak(urls, images, expected)
    threads = [
        threading.Thread(target=soak.client, args=(k, max(cycle)), daemon=True)
        for k in range(max(cycle))
    ]
    samples: list[tuple[float, dict[str, int | None], dict[str, float | None]]] = []
    refreshes: list[dict[str, Any]] = []
    start = time.monotonic()
    measured_from = start + a.warmup
    end = measured_from + a.seconds
    due = [measured_from + (i + 0.5) * a.seconds / a.refreshes for i in range(a.refreshes)]

    def sampler() -> None:
        while not soak.stop.wait(a.sample):
            now = time.monotonic()
            rss = {r: rss_bytes(pid) for r, pid in pids.items()}
            held = {
                r: _gauge(u, "privdigit_prefetch_entries") for r, u in zip(ROLES, urls, strict=True)
            }
            samples.append((now, rss, held))

    for t in threads:
        t.start()
    watcher = threading.Thread(target=sampler, daemon=True)
    watcher.start()
    counting = False
    try:
        while (now := time.monotonic()) < end:
            phase = int((now - start) // a.phase)
            soak.active = cycle[phase % len(cycle)]
            if now >= measured_from and not counting:
                soak.reset()  # the warm-up's counts are not the run's
                counting = True
            if due and now >= due[0]:
                due.pop(0)
                began = time.monotonic()
                new = resplit(model_dir)["model_version"]
                deadline = began + 60
                while _serving(urls) != [new, new]:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"the replicas did not switch to {new} within 60 s")
                    time.sleep(0.1)
                soak.generation += 1
                refreshes.append({"version": new, "switch_s": round(time.monotonic() - began, 2)})
            time.sleep(0.1)
    finally:
        soak.stop.set()
        for t in [*threads, watcher]:
            t.join(60)
    wall = time.monotonic() - measured_from

    measured = [(t - measured_from, rss, held) for t, rss, held in samples if t >= measured_from]
    memory: dict[str, dict[str, Any]] = {}
    for role in ROLES:
        points = [(t, rss[role]) for t, rss, _ in measured if rss[role] is not None]
        values = [v for _, v in points]
        held = [h[role] for _, _, h in measured if h[role] is not None]
        memory[role] = {
            "rss_mb_start": _mb(values[0]) if values else None,
            "rss_mb_peak": _mb(max(values)) if values else None,
            "rss_mb_end": _mb(values[-1]) if values else None,
            "slope_mb_per_min": slope_mb_per_min([t for t, _ in points], values),
            "slope_mb_per_min_second_half": slope_mb_per_min(
                [t for t, _ in points[len(points) // 2 :]], values[len(values) // 2 :]
            ),
            "prefetch_entries_max": int(max(held)) if held else None,
            "samples": len(values),
        }
    errors = sum(soak.errors.values())
    return {
        "seconds": a.seconds,
        "warmup": a.warmup,
        "clients_cycle": cycle,
        "phase_s": a.phase,
        "refreshes": refreshes,
        "ok": soak.ok,
        "errors": errors,
        "errors_by_type": dict(sorted(soak.errors.items())),
        "error_examples": soak.examples,
        "stale_version_retries": soak.stale,
        "wrong_labels": int(soak.wrong),
        "images_per_s": round(soak.ok / wall, 1),
        "memory": memory,
    }


def _clients(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError("a comma-separated list of client counts") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("client counts must be >= 1")
    return values


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.soak",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--seconds", type=float, default=120.0, help="measured duration")
    p.add_argument("--refreshes", type=int, default=6, help="model refreshes during it")
    p.add_argument(
        "--clients", type=_clients, default=[1, 4, 16], help="active clients, cycled (1,4,16)"
    )
    p.add_argument("--phase", type=float, default=5.0, help="seconds per concurrency phase")
    p.add_argument("--warmup", type=float, default=15.0, help="seconds of load before measuring")
    p.add_argument("--sample", type=float, default=0.5, help="seconds between memory samples")
    p.add_argument(
        "--max-slope", type=float, metavar="MB_PER_MIN", help="exit 1 above this RSS slope"
    )
    p.add_argument("--model", help="model directory to copy (default: the bundled model)")
    p.add_argument("--prefetch-max-age", type=float, help="the replicas' setting (seconds)")
    p.add_argument("--prefetch-max-entries", type=int, help="the replicas' setting")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    a = p.parse_args(argv)
    if a.seconds <= 0 or a.refreshes < 0 or a.phase <= 0 or a.warmup < 0 or a.sample <= 0:
        p.error("--seconds, --phase and --sample must be > 0; --refreshes, --warmup >= 0")

    replica_args = ["--reload-poll", "0.2"]
    if a.prefetch_max_age is not None:
        replica_args += ["--prefetch-max-age", str(a.prefetch_max_age)]
    if a.prefetch_max_entries is not None:
        replica_args += ["--prefetch-max-entries", str(a.prefetch_max_entries)]
    with tempfile.TemporaryDirectory(prefix="privdigit-soak-") as tmp:
        model_dir = Path(tmp) / "model"
        shutil.copytree(Path(a.model) if a.model else DEFAULT_MODEL, model_dir)
        cluster = Cluster(
            model=model_dir,
            ports=free_ports(3),
            log_dir=Path(tmp) / "logs",
            replica_args=tuple(replica_args),
        )
        try:
            with cluster:
                result = run(a, cluster, model_dir)
        except ClusterError as exc:
            print(f"error: the cluster did not start: {exc}", file=sys.stderr)
            return 2

    slopes = [m["slope_mb_per_min"] for m in result["memory"].values()]
    flat = a.max_slope is None or all(s is not None and s <= a.max_slope for s in slopes)
    result["passed"] = result["errors"] == 0 and result["wrong_labels"] == 0 and flat
    print_result(result, a.json)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
