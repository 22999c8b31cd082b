"""benchmarks.race: the real code paths with few repeats (CrypTen itself only in the slow test)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from benchmarks import race


def _run(capsys, *args: str) -> dict:
    assert race.main(["--json", "--repeats", "2", "--batch-sizes", "1,4", *args]) == 0
    return json.loads(capsys.readouterr().out)


def _check_common(out: dict) -> None:
    assert out["batch_sizes"] == [1, 4] and out["throughput_batch"] == 4
    assert out["plaintext_ms"] > 0
    assert out["engine"], "no engine protocol ran"
    assert out["engine_best"] in out["engine"]
    for row in out["engine"].values():
        for key in ("latency_ms_p50", "latency_ms_p50_logits", "images_per_s"):
            assert row[key] > 0, key
        assert row["rounds"] > 0 and row["bytes_per_image"] > 0
    assert out["service_latency_ms_p50"] > 0 and out["service_latency_ms_p95"] > 0
    assert out["service_images_per_s"] > 0
    svc = out["service"]["batches"]["1"]
    assert svc["rounds"] > 0 and svc["bytes_per_image"] > 0
    labels = out["labels"]
    assert labels["images"] == 4 and labels["plaintext_accuracy"] == 1.0
    assert set(labels["checked"]) >= {"service", *(f"engine_{k}" for k in out["engine"])}
    assert all(n == 4 for n in labels["checked"].values()), labels["checked"]
    assert labels["agree"], labels["mismatched"]
    assert "errors" not in out


def test_race_without_crypten(capsys):
    out = _run(capsys, "--no-crypten")
    _check_common(out)
    assert out["crypten"] is None and out["crypten_skipped"] == "--no-crypten"
    assert out["speedup_vs_crypten"] is None
    # what the engine reports per protocol matches the service's wire count for the same run
    engine = out["engine"][out["service"]["protocol"]]
    assert out["service"]["batches"]["1"]["rounds"] == engine["rounds"]


def test_crypten_failure_is_a_one_line_skip(monkeypatch, tmp_path):
    """A python without CrypTen stands in for the venv: the worker fails, the race skips it."""
    monkeypatch.setattr(race, "ensure_crypten_venv", lambda: 0.0)
    monkeypatch.setattr(race, "_venv_python", lambda: Path(sys.executable))
    model, state = race._load()
    with pytest.raises(race.Skip) as info:
        race.run_crypten(model.layers(), state, race._images(1), [1], 1, timeout=60)
    message = str(info.value)
    assert "\n" not in message and "crypten" in message.lower()


def test_crypten_install_failure_is_a_skip(monkeypatch, tmp_path):
    monkeypatch.setattr(race, "CACHE", tmp_path)
    monkeypatch.setattr(race, "VENV", tmp_path / "venv")
    monkeypatch.setattr(race, "REPO", tmp_path)
    monkeypatch.setattr(race.sys, "executable", "/nonexistent/python")
    with pytest.raises(race.Skip) as info:
        race.ensure_crypten_venv()
    assert "\n" not in str(info.value)


def test_batch_sizes_are_checked():
    with pytest.raises(SystemExit):
        race.main(["--batch-sizes", "0,4"])


@pytest.mark.slow
def test_race_with_crypten(capsys):
    """Creates .cache/race/crypten-venv when missing (a few minutes), then races all four."""
    out = _run(capsys)
    _check_common(out)
    cr = out["crypten"]
    assert cr is not None, out.get("crypten_skipped")
    for key in ("latency_ms_p50_logits", "latency_ms_p50_label"):
        assert cr[key] > 0
    assert cr["rounds_label"] > cr["rounds_logits"] > 0
    assert cr["bytes_label"] > 0 and cr["bytes_logits"] > 0
    assert out["labels"]["checked"]["crypten"] == 4
    assert out["speedup_vs_crypten"] > 0
