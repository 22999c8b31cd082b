"""`python -m training evaluate`: plaintext, in-process private and deployment labels agree."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from service.cluster import DEFAULT_MODEL, Cluster, free_ports
from training import evaluate as ev
from training.__main__ import main
from training.model import DigitCNN, layer_list

FIXTURES = Path(__file__).parent / "fixtures"


def test_the_manifests_layer_list_is_the_plaintext_model(mnist):
    """The evaluator runs a manifest's layers over its weights: the same logits as the torch
    module they were exported from (the engine tests' centrally trained CNN)."""
    images, _ = mnist
    state = load_file(str(FIXTURES / "cnn.safetensors"))
    model = DigitCNN()
    model.load_state_dict(state)
    layers = layer_list(model)
    x = torch.from_numpy(images[:200]).float()[:, None] / 255.0
    with torch.no_grad():
        torch.testing.assert_close(ev.plaintext_logits(layers, state, x), model.eval()(x))


def test_private_labels_equal_plaintext_in_process(mnist):
    images, labels = mnist
    result, got = ev.evaluate(DEFAULT_MODEL, images[:96], labels[:96], private=True, batch=48)
    assert result.mode == "in-process" and result.comparison == "lut"
    assert result.agreement == 1.0 and result.disagreements == []
    assert result.private_accuracy == result.plaintext_accuracy >= 0.95
    assert got.shape == (96,) and result.images_per_s > 0


def test_every_disagreement_is_listed_by_index(mnist, monkeypatch):
    images, labels = mnist
    plain = ev.plaintext_labels(DEFAULT_MODEL, images[:20])
    wrong = plain.copy()
    wrong[[3, 17]] = (plain[[3, 17]] + 1) % 10
    wrong[5] = -1  # a run whose row names no single class
    monkeypatch.setattr(ev, "private_labels_in_process", lambda *a, **k: wrong)
    result, _ = ev.evaluate(DEFAULT_MODEL, images[:20], labels[:20], private=True)
    assert [d["index"] for d in result.disagreements] == [3, 5, 17]
    assert result.agreement == pytest.approx(17 / 20)
    assert result.disagreements[1] == {
        "index": 5, "true": int(labels[5]), "plaintext": int(plain[5]), "private": -1
    }  # fmt: skip


def test_cli_json_confusion_png_and_errors(small_mnist, tmp_path, capsys):
    png = tmp_path / "confusion.png"
    args = ["evaluate", str(DEFAULT_MODEL), "--private", "--limit", "40", "--json"]
    assert main([*args, "--confusion", str(png)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["images"] == 40 and out["agreement"] == 1.0 and out["mode"] == "in-process"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["evaluate", str(tmp_path / "nothing")]) == 2
    assert "manifest.json not found" in capsys.readouterr().err
    assert main(["evaluate", str(DEFAULT_MODEL), "--replicas", "http://a"]) == 2
    assert "two URLs" in capsys.readouterr().err
    assert main(["evaluate", str(DEFAULT_MODEL), "--limit", "0"]) == 2


def test_through_a_running_deployment(small_mnist, tmp_path, capsys):
    with Cluster(ports=free_ports(3), log_dir=tmp_path / "logs") as c:
        urls = ",".join(c.replica_urls)
        assert main(["evaluate", str(DEFAULT_MODEL), "--replicas", urls, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mode"] == "replicas" and out["images"] == 200
    assert out["agreement"] == 1.0 and out["private_accuracy"] == out["plaintext_accuracy"]


def test_a_deployment_serving_another_model_is_refused(mnist, monkeypatch):
    images, labels = mnist
    monkeypatch.setattr(
        ev, "private_labels_from_replicas", lambda *a, **k: (np.zeros(4, np.int64), "other")
    )
    with pytest.raises(ev.EvaluateError, match="serves model version other"):
        ev.evaluate(DEFAULT_MODEL, images[:4], labels[:4], replicas=("http://a", "http://b"))
