"""The protocol registry: one list that the engine, settings, command lines and docs read."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from service.mpc import costs, protocols
from service.mpc.dealer import Dealer
from service.mpc.inprocess import private_forward
from service.mpc.network import PrivateNetwork
from service.mpc.ring import DEFAULT_FP
from service.mpc.sharing import share_tensors
from training.model import DigitCNN

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"


def _choices(parser: argparse.ArgumentParser, flag: str, *path: str) -> tuple | None:
    """The choices of `flag` in the (sub)parser reached by `path`."""
    for name in path:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    action = next(a for a in parser._actions if flag in a.option_strings)
    return tuple(action.choices) if action.choices else None


def test_every_command_line_offers_the_registered_protocols_default_first(capsys):
    from benchmarks import engine, load, service
    from service.__main__ import parser as service_parser
    from training.evaluate import parser as evaluate_parser

    assert protocols.NAMES[0] == protocols.DEFAULT
    assert set(protocols.NAMES) == set(protocols.REGISTRY)
    for sub in ("up", "demo", "replica"):
        assert _choices(service_parser(), "--comparison", sub) == protocols.NAMES, sub
    assert _choices(evaluate_parser(), "--comparison") == protocols.NAMES
    for module in (load, service):  # their parsers live in main(): read --help
        with pytest.raises(SystemExit):
            module.main(["--help"])
        assert "{" + ",".join(protocols.NAMES) + "}" in capsys.readouterr().out, module.__name__
    with pytest.raises(SystemExit):
        engine.main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"protocols: {', '.join(protocols.NAMES)} (default: all)" in help_text
    # and every default that names one is the registry's
    assert PrivateNetwork((), (1,)).comparison == protocols.DEFAULT


def test_by_size_picks_by_comparisons_per_image_and_unknown_names_are_refused():
    lut = protocols.get("lut")
    assert isinstance(lut, protocols.BySize)
    assert lut.for_layer(lut.limit) is protocols.GATES["lut"]
    assert lut.for_layer(lut.limit + 1) is protocols.GATES["a2b"]
    assert protocols.get("hybrid").for_layer(45) is protocols.GATES["fss"]
    assert protocols.label_sharing(protocols.get("hybrid"), 10) == "xor"
    assert protocols.label_sharing(lut, 10) == "zero"
    with pytest.raises(ValueError, match="known: lut, a2b, fss, hybrid"):
        protocols.get("garbled")
    with pytest.raises(ValueError, match="registered twice"):
        protocols.register(protocols.GATES["a2b"])
    with pytest.raises(ValueError, match="cannot apply a linear layer"):
        protocols.GATES["fss"].relu(None, None, 0, select=lambda *a: None)


def test_a_new_protocol_is_one_registration(monkeypatch):
    """A composite nobody wrote a branch for (fss for the small layers, lut's tables for the
    mid-sized, a2b for the large) runs the CNN and labels as plaintext does."""
    monkeypatch.setattr(protocols, "REGISTRY", dict(protocols.REGISTRY))
    mid = protocols.BySize(
        "lut-mid", "tables up to 2,304", protocols.GATES["lut"], protocols.A2B, 2304
    )
    protocols.register(
        protocols.BySize("three-way", "fss, lut, a2b by size", protocols.FSS, mid, 100)
    )
    model = DigitCNN()
    model.load_state_dict(load_file(FIXTURES / "cnn.safetensors"))
    model.eval()
    net = PrivateNetwork(tuple(model.layers()), (1, 28, 28), DEFAULT_FP, "three-way")
    data = np.load(FIXTURES / "mnist_test_1000.npz")
    x = torch.from_numpy(data["images"][:4]).float().unsqueeze(1) / 255.0
    weights = share_tensors({k: v.double() for k, v in model.state_dict().items()}, DEFAULT_FP)
    s0, s1 = share_tensors({"x": x.double()}, DEFAULT_FP)
    res = private_forward(net, weights, (s0["x"], s1["x"]), Dealer(), "three-way")
    with torch.no_grad():
        assert torch.equal(net.open_label(res.out0, res.out1), model(x).argmax(-1))
    assert net.label_sharing(10) == "xor"  # the argmax's 45 comparisons went to fss


def test_the_docs_table_is_what_the_protocols_measure():
    from service.cluster import DEFAULT_MODEL
    from service.store import load_share

    model = load_share(DEFAULT_MODEL, 0)
    net = model.network
    found = [
        costs.measure(net.layers, net.input_shape, model.weight_shapes, n, net.fp)
        for n in protocols.NAMES
    ]
    doc = (REPO / "docs" / "protocols.md").read_text()
    assert costs.with_table(doc, found) == doc, (
        "docs/protocols.md's table is stale: run `python -m service protocols --write-docs`"
    )
    by_name = {c.comparison: c for c in found}
    # the figures the rest of the docs and tests rely on
    assert [by_name[n].rounds for n in ("lut", "a2b", "fss", "hybrid")] == [15, 18, 12, 14]
    assert by_name["fss"].dealer_bytes[1] > by_name["a2b"].dealer_bytes[1]
    assert all(dataclasses.asdict(c)["summary"] for c in found)


def test_with_table_refuses_a_page_without_markers():
    with pytest.raises(ValueError, match="markers"):
        costs.with_table("# no table here\n", [])
