"""Load test: N concurrent clients for T seconds on the cluster; labels checked, memory watched.

    python -m benchmarks.load [--clients 16] [--seconds 60] [--json] [--model DIR]
                              [--client http|library] [--replicas URL0,URL1] [--warmup 10]
                              [--max-memory-growth PCT] [--pairs N]

Starts dealer and both replicas on free ports (bundled model unless --model), or N such pairs
(--pairs N: each its own dealer; the clients take turns over them, images_by_pair), or uses the
running replicas given by --replicas (repeat it for several pairs). Each client is a thread
with its own connections (with --client http, the default, a lean keep-alive client,
`LeanClient`; with --client library, `PrivDigitClient`) sending one image per request, cycling
through tests/fixtures/mnist_test_1000.npz; every label is compared with the plaintext model's (the
model directory's model.safetensors through its manifest's layers; the bundled one by default).
A warm-up of --warmup seconds at full concurrency comes first (connections, allocator arenas,
caches), then the replicas' RSS is read, the measured run goes, and RSS is read again.

Prints requests, errors (by type and service error code), wrong_labels, latency_ms_p50/p99
(client call to label, successful requests), images_per_s, cpu_ms_per_image (CPU time of the
dealer, each replica and this load generator over the measured run, per successful image: on a
machine whose cores they share, where the work goes; from /proc/PID/stat, null where
unreadable; cpu_ms_per_image_total sums them), and each replica's RSS before and
after with memory_growth_pct, plus a dozen samples in between (memory_rss_mb_series) and
memory_trend_pct (median of the last third of once-a-second samples against the first third:
a plateau or a leak, less noisy than two single readings). Memory is VmRSS from
/proc/PID/status: for a cluster this command started, of its processes; with --replicas, of the
process listening on each replica's port when it runs here as this user (else null).
Exit status: 0 when there were no errors and no wrong labels (and, with --max-memory-growth,
no replica grew more than PCT percent), 1 otherwise, 2 on a usage or startup error.
Target (issue 5): --clients 16 --seconds 60: 0 errors, 0 wrong labels, memory growth <= 10%.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import resource
import ssl
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from benchmarks import print_result
from clients.privdigit import (
    PrivDigitClient,
    PrivDigitError,
    ReplicaUnreachable,
    ServiceError,
    parse_pairs,
)
from clients.privdigit.pairs import Pair
from clients.privdigit.session import Call, Outcome, Prediction, Reply, Session
from service.cluster import DEFAULT_MODEL, ClusterError, Pairs, free_ports
from service.mpc import protocols

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"
DATA = FIXTURES / "mnist_test_1000.npz"


# -- reference labels ----------------------------------------------------------------------------


def plaintext_labels(images01: np.ndarray, model_dir: Path | None) -> np.ndarray:
    """The plaintext model's label for every image (N, 28, 28) in [0, 1]: the model directory's
    own `model.safetensors` run by its manifest's layer list (the bundled one by default)."""
    import torch

    from training.evaluate import EvaluateError, ManifestModel

    try:
        model = ManifestModel(model_dir or DEFAULT_MODEL)
    except EvaluateError as exc:
        raise SystemExit(f"error: {exc}: no plaintext to check labels against") from None
    with torch.no_grad():
        x = torch.from_numpy(images01.astype(np.float32)).reshape(-1, 1, 28, 28)
        return model(x).argmax(-1).numpy()


# -- memory --------------------------------------------------------------------------------------


def rss_bytes(pid: int | None) -> int | None:
    """Resident set size of process `pid` (VmRSS in /proc/PID/status), None if unreadable."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def listening_pid(port: int) -> int | None:
    """The pid of this user's process listening on TCP `port` on this machine, if any."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    cols = line.split()
                    local, state, inode = cols[1], cols[3], cols[9]
                    if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                        inodes.add(f"socket:[{inode}]")
        except OSError:
            continue
    if not inodes:
        return None
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                    return int(pid)
            except OSError:
                continue
    return None


def cpu_seconds(pid: int | None) -> float | None:
    """User plus system CPU time of process `pid` so far (/proc/PID/stat), None if unreadable."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    me = resource.getrusage(resource.RUSAGE_SELF)
    return me.ru_utime + me.ru_stime


def memory(pids: dict[str, int | None]) -> dict[str, int | None]:
    return {role: rss_bytes(pid) for role, pid in pids.items()}


def _mb(n: int | None) -> float | None:
    return None if n is None else round(n / 2**20, 1)


def _series(samples: list[int | None], points: int = 12) -> list[float | None]:
    """About `points` evenly spaced samples (MB) of a once-a-second RSS series: the trend."""
    if not samples:
        return []
    idx = sorted({round(i * (len(samples) - 1) / max(1, points - 1)) for i in range(points)})
    return [_mb(samples[i]) for i in idx]


def _trend(samples: list[int | None]) -> float | None:
    """Growth from the median RSS of the run's first third to that of its last third: less
    sensitive than two single readings to the swings of a busy allocator."""
    vals = [v for v in samples if v is not None]
    if len(vals) < 3:
        return None
    third = len(vals) // 3
    return _growth(int(np.median(vals[:third])), int(np.median(vals[-third:])))


def _growth(before: int | None, after: int | None) -> float | None:
    if not before or after is None:
        return None
    return round(100.0 * (after - before) / before, 2)


# -- the load ------------------------------------------------------------------------------------


class LeanClient:
    """A load client without the library's HTTP stack (`--client http`).

    It drives the client's own sans-IO `Session` (`clients/privdigit/session.py`: fresh shares,
    bodies, checks, the label's reconstruction, failover between pairs) over one keep-alive
    `http.client` connection per replica; both posts are sent before either answer is read, so
    no thread runs per post. It puts the same requests on the replicas as `PrivDigitClient`,
    for a fraction of the client's CPU (httpx costs about 0.45 ms of CPU per request here,
    http.client 0.12 ms): on one shared 2-core machine the load generator's CPU is otherwise
    taken from the service it measures.
    """

    def __init__(
        self,
        urls: Sequence[Pair] | Pair,
        timeout: float = 30.0,
        context: ssl.SSLContext | None = None,  # how to verify https replicas
    ) -> None:
        self._session = Session(parse_pairs(urls))
        self._timeout, self._context = timeout, context
        self._conns: dict[str, http.client.HTTPConnection] = {}

    def _conn(self, url: str) -> http.client.HTTPConnection:
        conn = self._conns.get(url)
        if conn is None:
            u = urlsplit(url)
            host, port = u.hostname or "127.0.0.1", u.port
            if u.scheme == "https":
                conn = http.client.HTTPSConnection(
                    host, port, timeout=self._timeout, context=self._context
                )
            else:
                conn = http.client.HTTPConnection(host, port, timeout=self._timeout)
            self._conns[url] = conn
        return conn

    def _exchange(self, calls: tuple[Call, Call]) -> tuple[Outcome, Outcome]:
        """Send both calls, then read both answers; a failure closes the pair's connections."""
        outcomes: list[Outcome | None] = [None, None]
        sent: list[http.client.HTTPConnection | None] = [None, None]
        for p, call in enumerate(calls):
            path = urlsplit(call.url).path.rstrip("/") + call.path
            headers = dict(call.headers or {})
            body = None
            if call.body is not None:
                body = json.dumps(call.body).encode()
                headers["Content-Type"] = "application/json"
            try:
                conn = self._conn(call.url)
                conn.request("GET" if body is None else "POST", path, body=body, headers=headers)
                sent[p] = conn
            except (OSError, http.client.HTTPException) as exc:
                outcomes[p] = ReplicaUnreachable(call.url, f"{type(exc).__name__}: {exc}")
        for p, conn in enumerate(sent):
            if conn is None:
                continue
            try:
                response = conn.getresponse()
                outcomes[p] = Reply(response.status, response.read())
            except (OSError, http.client.HTTPException) as exc:
                outcomes[p] = ReplicaUnreachable(calls[p].url, f"{type(exc).__name__}: {exc}")
        if any(isinstance(o, BaseException) for o in outcomes):
            for call in calls:  # a half-read connection is never reused
                if (conn := self._conns.pop(call.url, None)) is not None:
                    conn.close()
        return outcomes[0], outcomes[1]  # type: ignore[return-value]

    def predict(self, image01: np.ndarray) -> Prediction:
        """The prediction for one (28, 28) image in [0, 1]."""
        steps = self._session.predict(image01.reshape(1, 1, 28, 28).astype(np.float64))
        try:
            calls = next(steps)
            while True:
                calls = steps.send(self._exchange(calls))
        except StopIteration as done:
            return done.value[0]

    def label(self, image01: np.ndarray) -> int:
        """The label of one (28, 28) image in [0, 1]."""
        return self.predict(image01).label

    def forget_model(self) -> None:
        """Ask the replicas for the serving model version again before the next request."""
        self._session.forget_models()

    def close(self) -> None:
        for conn in self._conns.values():
            conn.close()
        self._conns = {}

    def __enter__(self) -> LeanClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Load:
    """N client threads predicting one image at a time; results counted under a lock."""

    def __init__(
        self,
        urls: Any,  # one pair (URL0, URL1) or a tuple of pairs
        images: np.ndarray,
        expected: np.ndarray,
        client: str = "http",
        verify: ssl.SSLContext | None = None,
    ) -> None:
        self.urls, self.images, self.expected, self.kind = urls, images, expected, client
        self.verify = verify
        self.pairs = parse_pairs(urls)
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.requests = 0
            self.wrong = 0
            self.errors: Counter[str] = Counter()
            self.error_examples: dict[str, str] = {}
            self.latencies: list[float] = []
            self.by_pair: Counter[int] = Counter()

    def _record(
        self, latency_ms: float | None, wrong: bool, error: str | None, detail: str, pair: int = 0
    ) -> None:
        with self._lock:
            self.requests += 1
            self.by_pair[pair] += error is None
            if error is not None:
                self.errors[error] += 1
                self.error_examples.setdefault(error, detail[:300])
            else:
                self.latencies.append(latency_ms or 0.0)
                self.wrong += wrong

    def client(self, k: int, n_clients: int, stop: threading.Event) -> None:
        i = k
        if self.kind == "http":
            client: Any = LeanClient(self.urls, context=self.verify)
            predict = client.predict
        else:
            client = PrivDigitClient(self.urls, timeout=30.0, verify=self.verify or True)
            predict = lambda image: client.predict_encoded(image[None])[0]  # noqa: E731
        with client:
            while not stop.is_set():
                j = i % len(self.images)
                i += n_clients
                started = time.perf_counter()
                try:
                    pred = predict(self.images[j])
                except ServiceError as exc:
                    self._record(None, False, f"ServiceError:{exc.status}:{exc.code}", str(exc))
                    continue
                except PrivDigitError as exc:
                    self._record(None, False, type(exc).__name__, str(exc))
                    continue
                except Exception as exc:  # a client bug is an error too, never a dead thread
                    self._record(None, False, f"unexpected:{type(exc).__name__}", repr(exc))
                    continue
                ms = (time.perf_counter() - started) * 1000.0
                self._record(ms, pred.label != int(self.expected[j]), None, "", pred.pair)

    def run(
        self,
        n_clients: int,
        seconds: float,
        *,
        desc: str,
        progress: bool,
        on_tick: Callable[[], None] = lambda: None,
    ) -> float:
        """Run the clients for `seconds` (calling `on_tick` about once a second); the wall time
        from start to the last thread's end."""
        from tqdm import tqdm

        stop = threading.Event()
        threads = [
            threading.Thread(target=self.client, args=(k, n_clients, stop), daemon=True)
            for k in range(n_clients)
        ]
        started = time.perf_counter()
        for t in threads:
            t.start()
        deadline = started + seconds
        with tqdm(
            total=round(seconds),
            desc=desc,
            disable=not progress,
            file=sys.stderr,
            bar_format="{desc}: {bar} {n}/{total} s {postfix}",
        ) as bar:
            while (now := time.perf_counter()) < deadline:
                time.sleep(min(1.0, deadline - now))
                bar.n = min(round(time.perf_counter() - started), round(seconds))
                with self._lock:
                    bar.set_postfix(requests=self.requests, errors=sum(self.errors.values()))
                on_tick()
        stop.set()
        for t in threads:
            t.join(60)
        return time.perf_counter() - started


def _parse_replicas(text: str) -> tuple[str, str]:
    urls = [u.strip().rstrip("/") for u in text.split(",") if u.strip()]
    if len(urls) != 2:
        raise argparse.ArgumentTypeError("give two URLs: party 0's, then party 1's")
    return urls[0], urls[1]


def _role(pair: int, role: str, pairs: int) -> str:
    """A process's name in the report: `replica0`, or `pair1.replica0` with several pairs."""
    return role if pairs == 1 else f"pair{pair}.{role}"


def _urls(pairs: Sequence[tuple[str, str]]) -> Any:
    """What the clients take: one pair as it is, several as a tuple of pairs."""
    return pairs[0] if len(pairs) == 1 else tuple(pairs)


def _port(url: str) -> int | None:
    import httpx

    u = httpx.URL(url)
    if u.host not in ("127.0.0.1", "localhost", "::1"):
        return None
    return u.port or (443 if u.scheme == "https" else 80)


def _ms(values: list[float], q: float | None) -> float | None:
    if not values:
        return None
    return round(float(np.percentile(values, q) if q is not None else max(values)), 2)


def measure(
    a: argparse.Namespace,
    urls: Any,
    pids: dict[str, int | None],
    images: np.ndarray,
    expected: np.ndarray,
    cpu_pids: dict[str, int | None] | None = None,
) -> dict:
    """`pids`: whose memory to watch; `cpu_pids` (default `pids`): whose CPU time to count."""
    load = Load(urls, images, expected, a.client)
    cpu_pids = pids if cpu_pids is None else cpu_pids
    progress = not a.json
    if a.warmup > 0:
        load.run(a.clients, a.warmup, desc="warm-up", progress=progress)
    warm_errors = dict(load.errors)
    before = memory(pids)
    series: dict[str, list[int | None]] = {role: [] for role in pids}

    def sample() -> None:
        for role, rss in memory(pids).items():
            series[role].append(rss)

    load.reset()
    cpu_before = {role: cpu_seconds(pid) for role, pid in cpu_pids.items()}
    own_before = _own_cpu_seconds()
    wall = load.run(a.clients, a.seconds, desc="load", progress=progress, on_tick=sample)
    cpu = {
        role: None if (b := cpu_before[role]) is None or (e := cpu_seconds(pid)) is None else e - b
        for role, pid in cpu_pids.items()
    }
    cpu["load_generator"] = _own_cpu_seconds() - own_before
    after = memory(pids)
    errors = sum(load.errors.values())
    ok = load.requests - errors
    growth = {role: _growth(before[role], after[role]) for role in pids}
    return {
        "clients": a.clients,
        "client": a.client,
        "seconds": a.seconds,
        "requests": load.requests,
        "ok": ok,
        "errors": errors,
        "errors_by_type": dict(sorted(load.errors.items())),
        "error_examples": load.error_examples,
        "warmup_errors": warm_errors,
        "wrong_labels": int(load.wrong),
        "latency_ms_p50": _ms(load.latencies, 50),
        "latency_ms_p99": _ms(load.latencies, 99),
        "latency_ms_max": _ms(load.latencies, None),
        "pairs": len(load.pairs),
        "images_by_pair": [load.by_pair[k] for k in range(len(load.pairs))],
        "images_per_s": round(ok / wall, 1),
        "cpu_ms_per_image": {
            role: None if s is None or not ok else round(1000 * s / ok, 2)
            for role, s in cpu.items()
        },
        "cpu_ms_per_image_total": (
            None
            if not ok or any(s is None for s in cpu.values())
            else round(1000 * sum(s for s in cpu.values() if s is not None) / ok, 2)
        ),
        "memory_rss_mb_before": {role: _mb(v) for role, v in before.items()},
        "memory_rss_mb_after": {role: _mb(v) for role, v in after.items()},
        "memory_growth_pct": growth,
        "memory_rss_mb_series": {role: _series(v) for role, v in series.items()},
        "memory_trend_pct": {role: _trend(v) for role, v in series.items()},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.load",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--clients", type=int, default=16, help="concurrent clients (threads)")
    p.add_argument("--seconds", type=float, default=60.0, help="measured duration")
    p.add_argument("--json", action="store_true", help="print one JSON object, no progress bar")
    p.add_argument(
        "--client",
        choices=("http", "library"),
        default="http",
        help="http: a lean keep-alive load client (default; the same requests for less of the "
        "shared CPU); library: PrivDigitClient (httpx)",
    )
    p.add_argument("--model", help="model directory (default: the bundled models/default)")
    p.add_argument(
        "--comparison",
        choices=protocols.NAMES,
        default=protocols.DEFAULT,
        help=f"protocol of the cluster (default: {protocols.DEFAULT})",
    )
    p.add_argument(
        "--replicas",
        type=_parse_replicas,
        action="append",
        metavar="URL0,URL1",
        help="use these running replicas instead of starting a cluster (repeat for more pairs)",
    )
    p.add_argument(
        "--pairs",
        type=int,
        default=1,
        metavar="N",
        help="start N replica pairs (each its own dealer); the clients spread over them",
    )
    p.add_argument(
        "--warmup", type=float, default=10.0, help="seconds of load before memory is read"
    )
    p.add_argument(
        "--max-memory-growth",
        type=float,
        metavar="PCT",
        help="also exit 1 if a replica's RSS grew more than PCT percent",
    )
    a = p.parse_args(argv)
    if a.clients < 1 or a.seconds <= 0 or a.warmup < 0 or not 1 <= a.pairs <= 16:
        p.error("--clients must be >= 1, --seconds > 0, --warmup >= 0 and --pairs 1..16")

    images = np.load(DATA)["images"].astype(np.float64) / 255.0
    expected = plaintext_labels(images, Path(a.model) if a.model else None)
    if a.replicas:
        pairs = tuple(a.replicas)
        pids = {
            _role(j, f"replica{k}", len(pairs)): listening_pid(port) if (port := _port(u)) else None
            for j, pair in enumerate(pairs)
            for k, u in enumerate(pair)
        }
        result = measure(a, _urls(pairs), pids, images, expected)
    else:
        ports = free_ports(3 * a.pairs)
        triples = [(ports[i], ports[i + 1], ports[i + 2]) for i in range(0, len(ports), 3)]
        group = Pairs(
            a.pairs,
            model=Path(a.model) if a.model else DEFAULT_MODEL,
            pair_ports=tuple(triples),
            replica_args=("--comparison", a.comparison),
        )
        try:
            with group:
                pids = {
                    _role(j, r, a.pairs): c.procs[r].pid
                    for j, c in enumerate(group.clusters)
                    for r in ("replica0", "replica1")
                }
                dealers = {
                    _role(j, "dealer", a.pairs): c.procs["dealer"].pid
                    for j, c in enumerate(group.clusters)
                }
                urls = _urls(group.replica_pairs)
                result = measure(a, urls, pids, images, expected, {**pids, **dealers})
        except ClusterError as exc:
            print(f"error: the cluster did not start: {exc}", file=sys.stderr)
            return 2

    grown = [g for g in result["memory_growth_pct"].values() if g is not None]
    memory_ok = a.max_memory_growth is None or all(g <= a.max_memory_growth for g in grown)
    result["passed"] = result["errors"] == 0 and result["wrong_labels"] == 0 and memory_ok
    print_result(result, a.json)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
