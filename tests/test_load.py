"""The load command (`python -m benchmarks.load`) on a real cluster, briefly."""

from __future__ import annotations

import json
import os

from benchmarks import load
from service.cluster import Cluster, free_ports


def test_rss_of_this_process():
    assert load.rss_bytes(os.getpid()) > 10 * 2**20
    assert load.rss_bytes(2**30) is None  # no such process


def test_short_load_run_against_running_replicas(tmp_path, capsys):
    with Cluster(ports=free_ports(3), log_dir=tmp_path) as c:
        argv = ["--clients", "2", "--seconds", "3", "--warmup", "1", "--json"]
        rc = load.main([*argv, "--replicas", ",".join(c.replica_urls)])
        pids = {r: c.procs[r].pid for r in ("replica0", "replica1")}
        found = {f"replica{k}": load.listening_pid(c.ports[k]) for k in (0, 1)}
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["passed"], out
    assert out["requests"] > 0 and out["errors"] == 0 and out["wrong_labels"] == 0
    assert 0 < out["latency_ms_p50"] <= out["latency_ms_p99"]
    assert found == pids  # memory is read from the replicas' own processes
    for role in pids:
        assert out["memory_rss_mb_before"][role] > 50
        assert out["memory_growth_pct"][role] is not None
        assert out["cpu_ms_per_image"][role] > 0  # the replicas did the work
    assert out["cpu_ms_per_image"]["load_generator"] > 0
