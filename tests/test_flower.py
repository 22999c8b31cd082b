"""The Flower app (training/flower_app.py) against the in-process core, and on the real engine.

* ``test_flower_path_matches_in_process_train``: drives the real ``ServerApp`` strategy and
  ``ClientApp`` objects (Flower's legacy workflows and mods) in-process through a fake Grid
  (no servers) and checks the final weights and batch-norm statistics equal
  ``training.fedavg.train`` at full participation, with and without SecAgg+.
* ``test_secagg_dp_and_partial_participation_in_process``: the same with SecAgg+
  (``SecAggPlusWorkflow`` + ``secaggplus_mod``), DP (Flower's client-side fixed clipping,
  AES noise) and 3 of 4 nodes per round; checks the exported shares and the provenance.
* ``test_deployment_engine_with_secagg_dp_and_sampling`` (slow): the same run on a real
  SuperLink + 4 SuperNodes on 127.0.0.1 with free ports and a private FLWR_HOME,
  ``flwr run ... --run-config``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from training import flower_app, privacy
from training.data import load_mnist
from training.fedavg import FedConfig, model_tensors, train
from training.privacy import epsilon

ROOT = Path(__file__).resolve().parent.parent
APP_DIR = ROOT / "training" / "flower"
BIN = Path(sys.executable).parent


# --------------------------------------------------------------------------- in-process


class InProcessGrid:
    """The Grid methods Flower's legacy workflows use; ``send_and_receive`` calls the real
    ClientApp (with its mods) in this process, with each node's ``--node-config`` equivalent
    and a Context whose state persists across messages (SecAgg+ keeps its keys there)."""

    def __init__(self, n_nodes: int, run_config: dict) -> None:
        self.nodes = {1000 + k: k for k in range(n_nodes)}
        self.run_config = run_config
        self.run = SimpleNamespace(run_id=1)
        self.contexts = {
            node: Context(
                run_id=1,
                node_id=node,
                node_config={"partition-id": k, "num-partitions": n_nodes},
                state=RecordDict(),
                run_config=run_config,
            )
            for node, k in self.nodes.items()
        }
        self.trained: list[int] = []  # partition ids whose ClientApp trained, in call order
        self.messages = 0

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def send_and_receive(self, messages, timeout=None) -> list[Message]:
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            TaskIdentity.node_id = node
            try:
                # a copy, as the wire gives each node its own (mods edit records in place)
                reply = flower_app.client_app(copy.deepcopy(msg), self.contexts[node])
            finally:
                TaskIdentity.node_id = 1
            assert not reply.has_error(), reply.error
            if any(k.startswith("fitres.") for k in reply.content):
                self.trained.append(self.nodes[node])
            replies.append(reply)
            self.messages += 1
        return replies


@pytest.fixture
def one_thread():
    """One intra-op thread: same numerics on both paths, and no oversubscription on small CPUs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def task_identity(monkeypatch, one_thread):
    """Messages read the run/node/task ids the Flower runtime normally sets per process."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def _reference(model: str, partition: str, server_opt: str, rounds: int):
    cfg = FedConfig(
        rounds=rounds,
        clients=3,
        fraction=1.0,
        local_epochs=1,
        batch_size=10,
        lr=0.05,
        partition=partition,
        seed=7,
        model=model,
        server_opt=server_opt,
        eval_limit=100,
    )
    return train(cfg, load_mnist("train"), load_mnist("test"))


@pytest.mark.parametrize(
    "model, partition, server_opt, secure_agg",
    [
        ("cnn", "iid", "fedavg", False),
        ("cnn-bn", "dirichlet:0.5", "fedavgm", False),
        ("cnn-bn", "iid", "fedavg", True),
    ],
)
def test_flower_path_matches_in_process_train(
    small_mnist, task_identity, tmp_path, model, partition, server_opt, secure_agg
):
    """Full participation: the weights and batch-norm statistics of training.fedavg.train.
    SecAgg+ quantises each value (steps of 8192 / 2**28 on n_k / 1000 times the value): one
    round and a looser tolerance there (over two rounds training amplifies it ~50-fold)."""
    rounds = 1 if secure_agg else 2
    run_config = {
        "num-server-rounds": rounds,
        "num-partitions": 3,
        "local-epochs": 1,
        "batch-size": 10,
        "lr": 0.05,
        "partition": partition,
        "seed": 7,
        "model": model,
        "server-opt": server_opt,
        "secure-agg": secure_agg,
        "eval-limit": 100,
        "out-dir": str(tmp_path / "model"),
    }
    grid = InProcessGrid(3, run_config)
    got, metrics = flower_app.run_server(grid, run_config)
    assert sorted(grid.trained) == sorted([0, 1, 2] * rounds)

    reference = _reference(model, partition, server_opt, rounds)
    names = flower_app.param_names(model)
    atol = 1e-3 if secure_agg else 1e-5
    for name, have, want in zip(
        names, model_tensors(got), model_tensors(reference.model), strict=True
    ):
        torch.testing.assert_close(have, want, rtol=0, atol=atol, msg=name)
    if model == "cnn-bn":
        assert any("running_var" in n for n in names)
    want_acc = reference.history[-1].test_accuracy
    assert metrics["rounds"][-1]["test_accuracy"] == pytest.approx(want_acc, abs=0.006)
    assert metrics["rounds"][-1]["num_examples"] == 800
    files = {p.name for p in (tmp_path / "model").iterdir()}
    assert {"model.safetensors", "manifest.json", "metrics.json"} <= files
    origin = json.loads((tmp_path / "model" / "manifest.json").read_text())["provenance"]
    assert origin["secure_aggregation"] is secure_agg
    assert origin["model"] == model and origin["dp"] is None


def _reconstructed_accuracy(directory: Path) -> float:
    """Plaintext accuracy on the test set of the model the two SHARE files add up to."""
    from safetensors.torch import load_file

    from service.mpc.ring import FixedPoint
    from service.mpc.sharing import reconstruct
    from training.evaluate import plaintext_logits

    manifest = json.loads((directory / "manifest.json").read_text())
    fp = FixedPoint(int(manifest["fixed_point"]["frac_bits"]))
    s0 = load_file(str(directory / "share-0.safetensors"))
    s1 = load_file(str(directory / "share-1.safetensors"))
    state = {k: fp.decode(reconstruct(s0[k], s1[k])).to(torch.float32) for k in s0}
    test = load_mnist("test")
    x = torch.from_numpy(test.images.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    with torch.no_grad():
        labels = plaintext_logits(manifest["architecture"]["layers"], state, x).argmax(1)
    return float((labels.numpy() == test.labels).mean())


def _check_private_export(directory: Path, rounds: int, per_round: int, nodes: int) -> dict:
    """Shares, manifest and provenance of a SecAgg+ and DP run."""
    manifest = json.loads((directory / "manifest.json").read_text())
    origin = manifest["provenance"]
    assert origin["secure_aggregation"] is True
    assert origin["secure_aggregation_protocol"] == "flower-secagg+"
    assert "SecAgg+" in origin["trained_by"] and "Flower" in origin["trained_by"]
    dp = origin["dp"]
    assert dp["clipping"] == "client" and dp["clip"] == 5.0 and dp["noise_multiplier"] == 0.01
    assert dp["sample_rate"] == per_round / nodes
    want_eps = epsilon(0.01, per_round / nodes, rounds, 1e-5)
    assert dp["epsilon"] == pytest.approx(want_eps) and 0 < want_eps < math.inf
    assert origin["fraction"] == per_round / nodes and origin["clients_per_round"] == per_round
    assert origin["command"].startswith("flwr run training/flower --run-config ")
    assert manifest["training"]["epsilon"] == pytest.approx(want_eps)
    # the shares add up to a trained model (chance is 0.1)
    assert _reconstructed_accuracy(directory) > 0.3
    return origin


def test_secagg_dp_and_partial_participation_in_process(small_mnist, task_identity, tmp_path):
    """The deployment test's code path without processes: 4 nodes, 3 sampled per round,
    SecAgg+ with client-side clipping and AES noise; the shares reconstruct a trained model."""
    run_config = {
        "num-server-rounds": 2,
        "num-partitions": 4,
        "fraction": 0.75,
        "local-epochs": 1,
        "lr": 0.1,
        "secure-agg": True,
        "dp-clip": 5.0,
        "dp-noise": 0.01,
        "bn-freeze-round": 1,
        "eval-limit": 200,
        "private-eval": True,
        "out-dir": str(tmp_path / "model"),
    }
    grid = InProcessGrid(4, run_config)
    _, metrics = flower_app.run_server(grid, run_config)
    assert len(grid.trained) == 2 * 3 and len(set(grid.trained)) >= 3
    assert [r["clients"] for r in metrics["rounds"]] == [3, 3]
    origin = _check_private_export(tmp_path / "model", rounds=2, per_round=3, nodes=4)
    # private-eval: the 200 test images through the two-party engine on the new shares
    assert origin["test_images"] == 200 and origin["private_label_agreement"] == 1.0
    assert origin["private_test_accuracy"] == origin["plaintext_test_accuracy"] > 0.3


def test_a_run_without_any_evaluation_exports_without_test_data(
    small_mnist, task_identity, tmp_path
):
    """central-eval and private-eval off: no test set is loaded, and the export still happens
    (its provenance with no private test accuracy)."""
    run_config = {
        "num-server-rounds": 1,
        "num-partitions": 2,
        "local-epochs": 1,
        "central-eval": False,
        "private-eval": False,
        "out-dir": str(tmp_path / "model"),
    }
    flower_app.run_server(InProcessGrid(2, run_config), run_config)
    origin = json.loads((tmp_path / "model" / "manifest.json").read_text())["provenance"]
    assert origin["rounds"] == 1 and origin["private_test_accuracy"] is None


def test_noise_is_the_aes_source_with_flowers_std():
    """AesGaussianNoise adds NoiseSource's normals times noise * clip / clients to the mean."""
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays

    class Fixed(flower_app.Delegate):
        def aggregate_fit(self, server_round, results, failures):
            return ndarrays_to_parameters([np.zeros((2, 3), np.float32)]), {}

    seed = bytes(32)
    wrapped = flower_app.AesGaussianNoise(
        Fixed(None), 2.0, 3.0, 4, source=privacy.NoiseSource(seed)
    )
    got = parameters_to_ndarrays(wrapped.aggregate_fit(1, [], [])[0])[0]
    want = privacy.NoiseSource(seed).normal((2, 3), torch.float64).numpy() * 1.5
    np.testing.assert_allclose(got, want.astype(np.float32), rtol=1e-6)


@pytest.mark.parametrize(
    "run_config, message",
    [
        ({"secure-agg": True, "dp-clip": 1.0, "dp-clipping": "server"}, "which SecAgg. hides"),
        ({"dp-clip": 1.0, "dp-clipping": "nowhere"}, "dp-clipping must be one of"),
        ({"secure-agg": True, "num-partitions": 3, "fraction": 0.3}, "at least 2 clients"),
        ({"secure-agg": True, "num-partitions": 20}, "exceeds SecAgg.'s modulus"),
        ({"num-rounds": 3}, "unknown run config keys"),
    ],
)
def test_bad_run_config_is_refused_by_name(run_config, message):
    with pytest.raises(ValueError, match=message):
        flower_app.build_server(run_config)


def test_app_config_is_the_defaults():
    """``flwr run`` accepts only keys the app's pyproject declares: the same as DEFAULTS."""
    import tomllib

    declared = tomllib.loads((APP_DIR / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert declared["config"] == flower_app.DEFAULTS


def test_fit_is_the_core_update_on_the_partition(small_mnist, one_thread):
    """One NumPyClient.fit: the new state is client_update's for that partition."""
    from training.fedavg import client_seed, client_update, init_model

    run_config = {"seed": 3, "local-epochs": 1, "partition": "shards", "model": "cnn-bn"}
    start = [t.detach().clone() for t in model_tensors(init_model(3, "cnn-bn"))]
    client = flower_app.CoreClient(1, 4, run_config)
    new, n, metrics = client.fit([t.numpy() for t in start], {"server-round": 4})
    images, labels = flower_app.load_partition(1, 4, "shards", 3)
    want = client_update(
        start, images, labels, flower_app.fed_config(run_config, 4), client_seed(3, 4, 1), 4
    )
    assert n == want.n_examples == 200 and metrics["partition-id"] == 1
    for got, s, d in zip(new, start, want.delta, strict=True):
        torch.testing.assert_close(torch.from_numpy(got), s + d, rtol=0, atol=0)


# --------------------------------------------------------------------------- deployment engine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"process exited early:\n{log.read_text()[-4000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"port {port} did not open:\n{log.read_text()[-4000:]}")


def _descendants(pid: int) -> list[int]:
    """Child pids (recursively) from /proc: flower-superexec, flwr-serverapp, flwr-clientapp run
    in their own sessions, so killing the SuperLink's process group would miss them."""
    out: list[int] = []
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            kids = [int(c) for c in children.read_text().split()]
        except OSError:
            continue
        for kid in kids:
            out += [kid, *_descendants(kid)]
    return out


def _stop(procs: list[subprocess.Popen]) -> None:
    """Terminate the processes this test started and everything they spawned; then kill."""
    pids = [pid for p in procs if p.poll() is None for pid in _descendants(p.pid)]
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=10)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


DEPLOYMENT_NODES = 4


@pytest.mark.slow
def test_deployment_engine_with_secagg_dp_and_sampling(small_mnist, one_thread, tmp_path):
    """A real SuperLink and 4 SuperNodes as processes; ``flwr run`` with SecAgg+, DP
    (client-side clipping, AES noise) and 3 of the 4 nodes sampled per round, from
    --run-config; the exported shares reconstruct a trained model and the manifest says how."""
    home = tmp_path / "flwr-home"
    home.mkdir()
    link_port = _free_port()
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "local"\n\n'
        f'[superlink.local]\naddress = "127.0.0.1:{link_port}"\ninsecure = true\n'
    )
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "PRIVDIGIT_DATA_DIR": str(small_mnist),
        "OMP_NUM_THREADS": "1",
        # the ServerApp and ClientApps run in processes of their own: the code under test
        "PYTHONPATH": str(ROOT),
        # the SuperLink/SuperNode spawn flower-superexec / flwr-serverapp / flwr-clientapp by name
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    out_dir = tmp_path / "model"
    procs: list[subprocess.Popen] = []

    def start(name: str, *args: str) -> tuple[subprocess.Popen, Path]:
        log = tmp_path / f"{name}.log"
        with log.open("w") as fh:
            proc = subprocess.Popen(
                [str(BIN / args[0]), *args[1:]],
                cwd=tmp_path,
                env=env,
                stdout=fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        procs.append(proc)
        return proc, log

    try:
        link, link_log = start(
            "superlink",
            "flower-superlink",
            "--insecure",
            "--disable-runtime-dependency-installation",
            "--host",
            "127.0.0.1",
            "--port",
            str(link_port),
            "--database",
            str(tmp_path / "state.db"),
        )
        _wait_port(link_port, link, link_log)
        for k in range(DEPLOYMENT_NODES):
            node_port = _free_port()
            node, node_log = start(
                f"supernode{k}",
                "flower-supernode",
                "--insecure",
                "--superlink",
                f"127.0.0.1:{link_port}",
                "--host",
                "127.0.0.1",
                "--port",
                str(node_port),
                "--node-config",
                f"partition-id={k} num-partitions={DEPLOYMENT_NODES}",
            )
            _wait_port(node_port, node, node_log)
        run_config = (
            f"num-server-rounds=1 num-partitions={DEPLOYMENT_NODES} fraction=0.75 lr=0.1 "
            "secure-agg=true dp-clip=5.0 dp-noise=0.01 bn-freeze-round=1 eval-limit=200 "
            f'out-dir="{out_dir}" seed=0'
        )
        # --stream: returns when the run ends, with the ServerApp's log (and any traceback);
        # one SecAgg+ round is four message rounds of the SuperNodes' polling (~90 s here)
        submit = subprocess.run(
            [
                str(BIN / "flwr"),
                "run",
                str(APP_DIR),
                "local",
                "--run-config",
                run_config,
                "--stream",
            ],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert submit.returncode == 0, submit.stdout + submit.stderr
        assert (out_dir / "manifest.json").is_file(), submit.stdout[-6000:] + submit.stderr
    finally:
        _stop(procs)

    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert [(r["round"], r["clients"]) for r in metrics["rounds"]] == [(1, 3)]
    _check_private_export(out_dir, rounds=1, per_round=3, nodes=DEPLOYMENT_NODES)
