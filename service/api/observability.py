"""Prometheus metrics (one registry per app, no process-wide state) and JSON logs.

Logs carry request ids, sizes, statuses and timings; never shares, seeds, images or weights.
"""

from __future__ import annotations

import json
import logging
import sys
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class ReplicaMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "privdigit_requests",
            "predict requests by output and status",
            ["output", "status"],
            registry=r,
        )
        self.errors = Counter("privdigit_errors", "errors by code", ["code"], registry=r)
        self.latency = Histogram(
            "privdigit_predict_seconds",
            "predict latency (this replica)",
            registry=r,
            buckets=(0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12),
        )
        self.images = Counter("privdigit_images", "images classified", registry=r)
        self.rounds = Counter(
            "privdigit_protocol_rounds", "protocol rounds with the peer", registry=r
        )
        self.prefetch = Counter(
            "privdigit_prefetch",
            "runs whose dealer material was prefetched",
            ["result"],
            registry=r,
        )
        self.prefetch_entries = Gauge(
            "privdigit_prefetch_entries",
            "prefetched dealer entries held, unclaimed and claimed",
            registry=r,
        )
        self.batches_refused = Counter(
            "privdigit_batches_refused",
            "BATCH announcements party 1 refused, by reason (see batching/follower.py)",
            ["reason"],
            registry=r,
        )
        self.runs = Counter(
            "privdigit_runs",
            "protocol runs by the channel their rounds used (lane or peer stream)",
            ["channel"],
            registry=r,
        )
        self.peer_bytes = Counter("privdigit_peer_bytes_sent", "bytes sent to the peer", registry=r)
        self.auth_failures = Counter(
            "privdigit_auth_failures", "unauthenticated attempts refused", ["what"], registry=r
        )
        self.inflight = Gauge("privdigit_inflight", "inferences in flight", registry=r)
        self.pending = Gauge(
            "privdigit_peer_pending", "requests with frames held for the peer stream", registry=r
        )
        self.ready = Gauge("privdigit_ready", "1 when ready to serve", registry=r)
        self.reloads = Counter(
            "privdigit_reloads", "model reloads by result", ["result"], registry=r
        )


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            **getattr(record, "fields", {}),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("privdigit")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
