"""`python -m training` end to end on a small MNIST cache built from the test fixture."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent


def _cli(*args: str, data_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PRIVDIGIT_DATA_DIR": str(data_dir)}
    return subprocess.run(
        [sys.executable, "-m", "training", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_help_lists_every_flag(small_mnist):
    out = _cli("--help", data_dir=small_mnist)
    assert out.returncode == 0
    for flag in (
        "--rounds",
        "--clients",
        "--fraction",
        "--local-epochs",
        "--batch-size",
        "--lr",
        "--lr-decay",
        "--client-momentum",
        "--augment-shift",
        "--model",
        "cnn-max",
        "cnn-bn",
        "--threads",
        "--server-momentum",
        "--partition",
        "--seed",
        "--dp-clip",
        "--dp-noise",
        "--secure-agg",
        "--out",
        "--force",
        "--private-eval",
        "resplit",
        "evaluate",
    ):
        assert flag in out.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--rounds", "0"], "positive"),
        (["--fraction", "1.5"], "(0, 1]"),
        (["--partition", "zipf"], "iid"),
        (["--dp-noise", "1.0"], "--dp-clip"),
        (["--lr-decay", "0"], "(0, 1]"),
        (["--client-momentum", "1"], "[0, 1)"),
        (["--augment-shift", "5"], "invalid choice"),
        (["--model", "resnet"], "invalid choice"),
    ],
)
def test_bad_arguments_fail_with_one_clear_line(small_mnist, tmp_path, args, message):
    out = _cli(*args, "--out", str(tmp_path / "m"), data_dir=small_mnist)
    assert out.returncode != 0
    assert message in out.stderr
    assert not (tmp_path / "m").exists()


def test_a_small_run_writes_model_shares_metrics_and_curves(small_mnist, tmp_path):
    out_dir = tmp_path / "m"
    args = [
        "--rounds",
        "3",
        "--clients",
        "4",
        "--fraction",
        "1",
        "--local-epochs",
        "3",
        "--batch-size",
        "10",
        "--json",
    ]
    args += ["--out", str(out_dir)]
    out = _cli(*args, data_dir=small_mnist)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["final_test_accuracy"] > 0.5  # chance is 0.1
    names = {p.name for p in out_dir.iterdir()}
    assert {
        "model.safetensors",
        "share-0.safetensors",
        "share-1.safetensors",
        "manifest.json",
        "metrics.json",
        "curves.png",
    } <= names
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1, 2, 3]
    assert (out_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert manifest["model_version"] == summary["model_version"]
    # the default model trains with batch norm; the export has it folded into conv and fc
    assert [ly["type"] for ly in manifest["architecture"]["layers"]] == [
        *("conv2d", "avgpool2d", "relu") * 2,
        *("flatten", "linear", "relu", "linear"),
    ]
    weights = load_file(out_dir / "model.safetensors")
    layers = ("conv1", "conv2", "fc1", "fc2")
    assert set(weights) == {f"{n}.{p}" for n in layers for p in ("weight", "bias")}
    assert metrics["config"]["model"] == "cnn-bn" and metrics["config"]["augment_shift"] == 1
    # provenance: the exact command, the code, the setting, and the private test accuracy of
    # the very shares it wrote (the test split here: 200 images), equal to the plaintext's
    origin = manifest["provenance"]
    assert origin["command"] == "python -m training " + " ".join(args)
    assert origin["package_version"] == "0.1.0" and origin["git_commit"]
    assert (origin["rounds"], origin["clients"], origin["fraction"]) == (3, 4, 1.0)
    assert (origin["local_epochs"], origin["partition"]) == (3, "iid")
    assert origin["server_optimizer"] == "fedavg" and origin["dp"] is None
    assert origin["secure_aggregation"] is False and origin["test_images"] == 200
    # the float model the manifest describes (batch norm folded) against training's own figure
    assert abs(origin["plaintext_test_accuracy"] - summary["final_test_accuracy"]) <= 1 / 200
    assert origin["private_label_agreement"] == 1.0
    assert origin["private_test_accuracy"] == origin["plaintext_test_accuracy"]
    assert summary["private_test_accuracy"] == origin["private_test_accuracy"]
    # refuses to overwrite, then --force replaces, then resplit renews the version
    again = _cli(*args, data_dir=small_mnist)
    assert again.returncode != 0 and "--force" in again.stderr
    assert _cli(*args, "--force", data_dir=small_mnist).returncode == 0
    before = load_file(out_dir / "share-0.safetensors")
    resplit = _cli("resplit", str(out_dir), data_dir=small_mnist)
    assert resplit.returncode == 0, resplit.stderr
    assert json.loads((out_dir / "manifest.json").read_text())["model_version"] in resplit.stdout
    after = load_file(out_dir / "share-0.safetensors")
    assert not all((before[k] == after[k]).all() for k in before)


def test_the_defaults_are_the_recipe_that_reaches_99_percent():
    """docs/federated-benchmark.md: cnn-bn, lr 0.3 decayed by 0.85 a round, 1-pixel shifts,
    plain FedAvg, in the FedAvg paper's setting (100 clients, C = 0.1, E = 5, B = 10, IID)."""
    from training.__main__ import train_parser
    from training.model import build_model, inference_cost

    args = train_parser().parse_args([])
    assert (args.model, args.lr, args.lr_decay, args.augment_shift) == ("cnn-bn", 0.3, 0.85, 1)
    assert (args.rounds, args.clients, args.fraction, args.local_epochs, args.batch_size) == (
        20,
        100,
        0.1,
        5,
        10,
    )
    assert (args.partition, args.server_opt, args.threads) == ("iid", "fedavg", 1)
    cost = inference_cost(build_model(args.model).layers())
    assert cost["comparisons"] == 12 * 12 * 12 + 32 * 4 * 4 + 128 == 2368 <= 3000


def test_resplit_of_a_missing_model_fails_cleanly(small_mnist, tmp_path):
    out = _cli("resplit", str(tmp_path / "none"), data_dir=small_mnist)
    assert out.returncode == 2 and "error:" in out.stderr


def test_recipe_noniid_sets_the_shards_settings_and_leaves_the_default_alone() -> None:
    from training.__main__ import parse_train_args

    default = parse_train_args([])
    assert (default.partition, default.rounds, default.lr, default.lr_decay) == (
        "iid",
        20,
        0.3,
        0.85,
    )
    assert default.bn_freeze_round == 0 and default.model == "cnn-bn"
    shards = parse_train_args(["--recipe", "noniid", "--lr", "0.2"])
    assert (shards.partition, shards.rounds, shards.lr_decay, shards.bn_freeze_round) == (
        "shards",
        150,
        0.99,
        2,
    )
    assert shards.lr == 0.2 and shards.model == "cnn-bn"  # a flag given wins
    with pytest.raises(SystemExit):
        parse_train_args(["--recipe", "mystery"])
