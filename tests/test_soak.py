"""The soak command (`python -m benchmarks.soak`) on a real cluster, briefly: load while the model
is re-split twice; the figures are there for both replicas and the bounds held."""

from __future__ import annotations

import json

import pytest

from benchmarks import soak


def test_slope_is_the_least_squares_fit_in_mb_per_minute():
    times = [0.0, 30.0, 60.0, 90.0]
    rss = [100 * 2**20 + int(t / 60 * 3 * 2**20) for t in times]  # +3 MB a minute
    assert soak.slope_mb_per_min(times, rss) == 3.0
    assert soak.slope_mb_per_min(times, [rss[0]] * 4) == 0.0
    assert soak.slope_mb_per_min([0.0, 1.0], rss[:2]) is None  # too few points


def test_a_short_soak_with_two_refreshes(capsys):
    argv = ["--seconds", "8", "--refreshes", "2", "--warmup", "2", "--phase", "2"]
    rc = soak.main([*argv, "--clients", "1,4", "--prefetch-max-entries", "3", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["passed"], out
    assert out["ok"] > 0 and out["errors"] == 0 and out["wrong_labels"] == 0
    versions = [r["version"] for r in out["refreshes"]]
    assert len(set(versions)) == 2  # each refresh switched both replicas to a new version
    for role in ("replica0", "replica1"):
        m = out["memory"][role]
        assert m["samples"] >= 3 and m["slope_mb_per_min"] is not None
        assert 50 < m["rss_mb_start"] <= m["rss_mb_peak"] and m["rss_mb_end"] <= m["rss_mb_peak"]
        assert m["prefetch_entries_max"] <= 3  # the bound given to the replicas


@pytest.mark.parametrize("bad", [["--clients", "0"], ["--seconds", "0"], ["--phase", "-1"]])
def test_usage_errors(bad, capsys):
    with pytest.raises(SystemExit) as info:
        soak.main(bad)
    assert info.value.code == 2
