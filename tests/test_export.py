"""Export: manifest + two share files that reconstruct the model exactly; atomic; re-split."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from service.mpc.dealer import Dealer
from service.mpc.inprocess import private_forward
from service.mpc.network import LAYER_TYPES, PrivateNetwork
from service.mpc.ring import FixedPoint
from service.mpc.sharing import share_tensors
from training.export import ExportError, export_model, resplit, sha256_file
from training.model import MODELS, DigitCNN, EngineCNN, build_model, export_state, inference_cost


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


def _mnist(n: int) -> torch.Tensor:
    data = np.load(Path(__file__).parent / "fixtures" / "mnist_test_1000.npz")
    return torch.from_numpy(data["images"][:n]).float().unsqueeze(1) / 255.0


@pytest.mark.parametrize(
    "options",
    [
        {"pool": "max", "normalize": True},
        {"pool": "avg", "relu_first": True, "normalize": True},
        {"pool": "avg", "padding": 2},
        {"pool": "avg", "batchnorm": True, "batchnorm_fc": True, "normalize": True},
    ],
)
def test_engine_cnn_exports_a_folded_model_the_private_engine_runs(tmp_path, options):
    torch.manual_seed(0)
    model = EngineCNN(4, 8, 16, dropout=0.5, **options)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # non-zero biases: the fold must move them
        _random_running_stats(model)
    x = _mnist(6)
    model.eval()
    with torch.no_grad():
        plain = model(x)
    # the exported weights, on the same layers without the input map, give the same logits
    state = export_state(model)
    plain_layers = {"normalize": False, "batchnorm": False, "batchnorm_fc": False}
    unfolded = EngineCNN(4, 8, 16, **{**options, **plain_layers})
    unfolded.load_state_dict(state)
    with torch.no_grad():
        assert torch.allclose(unfolded.eval()(x), plain, atol=1e-4)
    manifest = export_model(state, model.layers(), tmp_path / "m")
    layers = manifest["architecture"]["layers"]
    assert {ly["type"] for ly in layers} <= LAYER_TYPES and "dropout" not in str(layers)
    net = PrivateNetwork(tuple(layers), (1, 28, 28), FixedPoint(16))
    shares = tuple(load_file(tmp_path / f"m/share-{i}.safetensors") for i in (0, 1))
    images = share_tensors({"x": x.double()}, FixedPoint(16))
    res = private_forward(
        net, shares, (images[0]["x"], images[1]["x"]), Dealer(), "export", "logits"
    )
    logits = FixedPoint(16).decode(res.out0 + res.out1)
    assert (logits - plain.double()).abs().max() < 2e-2
    assert torch.equal(logits.argmax(-1), plain.argmax(-1))


def _random_running_stats(model: torch.nn.Module) -> None:
    """Batch-norm statistics far from their (0, 1) start, so folding them changes the weights."""
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)):
        bn.running_mean.copy_(torch.randn_like(bn.running_mean))
        bn.running_var.copy_(torch.rand_like(bn.running_var) * 4 + 0.05)
        bn.weight.copy_(torch.randn_like(bn.weight))  # negative scales too


@pytest.mark.parametrize("seed", range(4))
def test_batchnorm_folds_exactly_into_the_layer_before_it(seed):
    """Inference-mode BN after conv + avgpool (and after fc1) folded into conv/fc: the folded
    plain network gives the BN network's logits (float64 end to end: equal to rounding)."""
    torch.manual_seed(seed)
    model = EngineCNN(6, 8, 12, pool="avg", batchnorm=True, batchnorm_fc=True).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
        _random_running_stats(model)
    model.eval()
    x = _mnist(20).double()
    with torch.no_grad():
        expect = model(x)
    state = export_state(model)
    assert set(state) == {
        f"{n}.{p}" for n in ("conv1", "conv2", "fc1", "fc2") for p in ("weight", "bias")
    }
    assert not torch.allclose(state["conv1.weight"], model.conv1.weight.float())  # it moved
    folded = EngineCNN(6, 8, 12, pool="avg").double().eval()
    folded.load_state_dict({k: v.double() for k, v in state.items()})
    with torch.no_grad():
        got = folded(x)
    # export rounds the folded weights to float32 once: a relative error of about 1e-7
    assert torch.allclose(got, expect, rtol=1e-5, atol=1e-5 * float(expect.abs().max()))
    assert torch.equal(got.argmax(1), expect.argmax(1))
    with pytest.raises(ValueError, match="batchnorm"):
        EngineCNN(pool="max", batchnorm=True)


def test_every_registered_model_is_accepted_by_the_private_engine():
    for name in MODELS:
        model = build_model(name)
        net = PrivateNetwork(tuple(model.layers()), (1, 28, 28))
        assert set(export_state(model)) == set(net.weight_names())
    assert inference_cost(build_model("cnn").layers()) == {
        "relus": 2660,
        "max_comparisons": 0,
        "comparisons": 2660,
        "macs": 666_600,
    }
    cost = inference_cost(build_model("cnn-max").layers())
    assert cost["relus"] == 32 * 12 * 12 + 64 * 4 * 4 + 512
    assert cost["max_comparisons"] == 3 * (32 * 12 * 12 + 64 * 4 * 4)
    assert inference_cost(build_model("cnn-max-small").layers())["comparisons"] == 11_520


def test_the_training_default_runs_privately_in_cnns_rounds_with_lut(tmp_path):
    """cnn-bn, exported with its batch norm folded, under the deployments' default protocol:
    the same 15 rounds as cnn (the same layer types and comparison layers), labels = plaintext."""
    from service.mpc.beaver import WeightMasks

    torch.manual_seed(1)
    model = build_model("cnn-bn")
    with torch.no_grad():
        _random_running_stats(model)
    model.eval()
    x = _mnist(32)
    with torch.no_grad():
        plain = model(x).double()
    manifest = export_model(export_state(model), model.layers(), tmp_path / "m")
    net = PrivateNetwork(
        tuple(manifest["architecture"]["layers"]), (1, 28, 28), FixedPoint(16), "lut"
    )
    shares = tuple(load_file(tmp_path / f"m/share-{i}.safetensors") for i in (0, 1))
    images = share_tensors({"x": x.double()}, FixedPoint(16))
    pair = (images[0]["x"], images[1]["x"])
    dealer, masks = Dealer(), (WeightMasks("bn"), WeightMasks("bn"))
    private_forward(net, shares, pair, dealer, "bn-warm", "label", masks)  # opens W - mask
    labels = private_forward(net, shares, pair, dealer, "bn-1", "label", masks)
    logits = private_forward(net, shares, pair, dealer, "bn-2", "logits")
    assert labels.stats0.rounds == 15
    # labels where the top two plaintext logits are apart by far more than fixed-point error
    # (an untrained network has near-ties: 31 of these 32 images are clear)
    top2 = plain.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 0.01
    assert int(clear.sum()) >= 24
    got = net.open_label(labels.out0, labels.out1)
    assert torch.equal(got[clear], plain.argmax(-1)[clear])
    assert (FixedPoint(16).decode(logits.out0 + logits.out1) - plain).abs().max() < 2e-3
