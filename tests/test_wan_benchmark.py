"""`python -m benchmarks.wan`: usage errors exit 2 with a message; as root, a tiny run prints
one JSON row per (RTT, protocol) with every documented field, right labels and no errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import wan

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "args, message",
    [
        (["--comparison", "lut,nope"], "unknown protocol"),
        (["--rtt-ms", "2,fast"], "not a list of numbers"),
        (["--rtt-ms", "-1"], "round-trip times >= 0"),
        (["--requests", "0"], "--requests and --clients must be >= 1"),
    ],
)
def test_usage_errors_exit_2_with_a_message(args, message, capsys):
    with pytest.raises(SystemExit) as info:
        wan.main(args)
    assert info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="the netns rig needs root (ip netns add)")
def test_a_tiny_run_prints_one_row_per_rtt_and_protocol():
    args = "--json --rtt-ms 0.2,5 --comparison lut --requests 3 --clients 4 --seconds 1"
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.wan", *args.split(), "--warmup", "0"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [(r["rtt_ms"], r["comparison"]) for r in rows] == [(0.2, "lut"), (5.0, "lut")]
    for row in rows:
        assert set(wan.FIELDS) <= set(row) and row["wrong_labels"] == 0 and row["errors"] == 0
        assert row["delay"] in ("relay", "netem") and row["rounds"] > 0
    assert rows[1]["latency_ms_p50"] > rows[0]["latency_ms_p50"]  # 5 ms further apart
