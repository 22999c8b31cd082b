"""`python -m benchmarks.engine` runs both comparison protocols and reports what it promises."""

import json

from benchmarks import engine


def test_engine_benchmark_reports_both_protocols(capsys):
    argv = ["--json", "--repeats", "1", "--images", "4", "--models", "fcnet"]
    assert engine.main([*argv, "--comparison", "a2b,fss"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["comparison"] for r in rows] == ["a2b", "fss"]
    for row in rows:
        assert row["label_agreement"] == 1.0 and row["max_abs_logit_error"] < 0.01
        assert row["latency_ms_p50"] > 0 and row["wire_ms"] > 0 and row["images_per_s"] > 0
    a2b, fss = rows
    assert fss["rounds"] < a2b["rounds"] and fss["bytes_per_party"] < a2b["bytes_per_party"]
    # fixed weight masks: after the first query only activations travel (fc 784-128-128-10),
    # and each ReLU's exact truncation gate sends 4 bit planes of 64-element words (2 x 128)
    assert fss["bytes_per_party"] == 8 * (784 + 128 + 128 + 128 + 128 + 45 + 10) + 2 * 4 * 2 * 8


def test_engine_benchmark_refuses_unknown_protocols(capsys):
    import pytest

    with pytest.raises(SystemExit):
        engine.main(["--comparison", "a2b,nope"])
    assert "nope" in capsys.readouterr().err
