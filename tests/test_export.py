"""Export: manifest + two share files that reconstruct the model exactly; atomic; re-split."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from service.mpc.ring import FixedPoint
from training.export import ExportError, export_model, resplit, sha256_file
from training.model import DigitCNN


def _export(tmp_path, **kw):
    torch.manual_seed(0)
    model = DigitCNN()
    return model, export_model(model.state_dict(), model.layers(), tmp_path / "m", **kw)


def test_shares_reconstruct_the_model_and_match_their_commitments(tmp_path):
    model, manifest = _export(tmp_path)
    out = tmp_path / "m"
    s0, s1 = load_file(out / "share-0.safetensors"), load_file(out / "share-1.safetensors")
    fp = FixedPoint(manifest["fixed_point"]["frac_bits"])
    for name, value in model.state_dict().items():
        assert torch.equal(s0[name] + s1[name], fp.encode(value.double()))
    for entry in manifest["shares"]:
        assert sha256_file(out / entry["file"]) == entry["sha256"]
        with safe_open(out / entry["file"], "pt") as fh:
            assert fh.metadata()["model_version"] == manifest["model_version"]
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert manifest["architecture"]["layers"] == model.layers()


def test_each_share_alone_looks_uniform(tmp_path):
    _export(tmp_path)
    share = torch.cat(
        [v.reshape(-1) for v in load_file(tmp_path / "m/share-1.safetensors").values()]
    )
    for bit in (0, 20, 40, 63):
        assert abs(((share >> bit) & 1).double().mean().item() - 0.5) < 0.02


def test_refuses_to_overwrite_without_force_and_keeps_the_old_model(tmp_path):
    _, first = _export(tmp_path)
    with pytest.raises(ExportError, match="--force"):
        _export(tmp_path)
    assert json.loads((tmp_path / "m/manifest.json").read_text()) == first
    _, second = _export(tmp_path, force=True)
    assert second["model_version"] != first["model_version"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_failed_export_leaves_nothing_behind(tmp_path):
    with pytest.raises(TypeError):
        export_model({"x": torch.ones(1)}, [], tmp_path / "m", extra_manifest={"a": object()})
    assert list(tmp_path.iterdir()) == []


def test_resplit_gives_fresh_shares_of_the_same_model(tmp_path):
    model, first = _export(tmp_path, extra_manifest={"metrics": {"accuracy": 0.99}})
    old0 = load_file(tmp_path / "m/share-0.safetensors")
    second = resplit(tmp_path / "m")
    assert second["model_version"] != first["model_version"]
    assert second["metrics"] == {"accuracy": 0.99}
    new0 = load_file(tmp_path / "m/share-0.safetensors")
    new1 = load_file(tmp_path / "m/share-1.safetensors")
    assert not torch.equal(old0["fc1.weight"], new0["fc1.weight"])
    fp = FixedPoint(16)
    assert torch.equal(
        new0["fc1.weight"] + new1["fc1.weight"],
        fp.encode(model.state_dict()["fc1.weight"].double()),
    )
    with pytest.raises(ExportError):
        resplit(tmp_path / "nothing")
