"""The Flower app (training/flower_app.py) against the in-process core, and on the real engine.

* ``test_flower_path_matches_in_process_train``: drives the real ``ServerApp`` strategy and
  ``ClientApp`` objects in-process through a fake Grid (no servers) and checks the final
  weights equal ``training.fedavg.train`` at full participation.
* ``test_deployment_engine_end_to_end`` (slow): SuperLink + 2 SuperNodes on 127.0.0.1 with
  free ports and a private FLWR_HOME, ``flwr run``, then checks the exported model.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from training import flower_app
from training.data import load_mnist
from training.fedavg import FedConfig, evaluate, train

ROOT = Path(__file__).resolve().parent.parent
APP_DIR = ROOT / "training" / "flower"
BIN = Path(sys.executable).parent


# --------------------------------------------------------------------------- in-process


class InProcessGrid:
    """The two Grid methods the strategy uses; ``send_and_receive`` calls the real ClientApp
    in this process with each node's ``--node-config`` equivalent."""

    def __init__(self, n_nodes: int, run_config: dict) -> None:
        self.nodes = {1000 + k: k for k in range(n_nodes)}
        self.run_config = run_config
        self.calls = 0

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def send_and_receive(self, messages, timeout=None) -> list[Message]:
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            node_config = {"partition-id": self.nodes[node], "num-partitions": len(self.nodes)}
            context = Context(
                run_id=1,
                node_id=node,
                node_config=node_config,
                state=RecordDict(),
                run_config=self.run_config,
            )
            TaskIdentity.node_id = node
            replies.append(flower_app.client_app(msg, context))
            TaskIdentity.node_id = 1
            self.calls += 1
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


@pytest.mark.parametrize(
    "partition, server_opt, server_lr",
    [("iid", "fedavg", 1.0), ("dirichlet:0.5", "fedavgm", 1.0)],
)
def test_flower_path_matches_in_process_train(
    small_mnist, task_identity, tmp_path, partition, server_opt, server_lr
):
    run_config = {
        "num-server-rounds": 2,
        "num-partitions": 3,
        "local-epochs": 1,
        "batch-size": 10,
        "lr": 0.05,
        "partition": partition,
        "seed": 7,
        "server-opt": server_opt,
        "server-lr": server_lr,
        "eval-limit": 100,
        "out-dir": str(tmp_path / "model"),
    }
    grid = InProcessGrid(3, run_config)
    model, metrics = flower_app.run_server(grid, run_config)
    assert grid.calls == 2 * 3

    cfg = FedConfig(
        rounds=2,
        clients=3,
        fraction=1.0,
        local_epochs=1,
        batch_size=10,
        lr=0.05,
        partition=partition,
        seed=7,
        server_opt=server_opt,
        server_lr=server_lr,
        eval_limit=100,
    )
    reference = train(cfg, load_mnist("train"), load_mnist("test"))
    for (name, got), want in zip(
        model.named_parameters(), reference.model.parameters(), strict=True
    ):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5, msg=name)
    want_acc = reference.history[-1].test_accuracy
    assert metrics["rounds"][-1]["test-accuracy"] == pytest.approx(want_acc, abs=1e-9)
    assert metrics["rounds"][-1]["num-examples"] == 800
    names = {p.name for p in (tmp_path / "model").iterdir()}
    assert {"model.safetensors", "manifest.json", "metrics.json"} <= names


def test_reply_is_the_core_delta_and_count(small_mnist, task_identity):
    """One ClientApp call: the delta and count are client_update's for that partition."""
    from flwr.app import ConfigRecord, MessageType

    from training.fedavg import client_seed, client_update, init_model

    run_config = {"seed": 3, "local-epochs": 1, "partition": "shards"}
    params = [p.detach() for p in init_model(3).parameters()]
    msg = Message(
        content=RecordDict(
            {
                "arrays": flower_app.to_record(params),
                "config": ConfigRecord({"server-round": 4}),
            }
        ),
        dst_node_id=9,
        message_type=MessageType.TRAIN,
    )
    ctx = Context(1, 9, {"partition-id": 1, "num-partitions": 4}, RecordDict(), run_config)
    reply = flower_app.client_app(msg, ctx)
    images, labels = flower_app.load_partition(1, 4, "shards", 3)
    want = client_update(
        params, images, labels, flower_app.fed_config(run_config, 4), client_seed(3, 4, 1)
    )
    assert int(reply.content["metrics"]["num-examples"]) == want.n_examples == 200
    for got, exp in zip(flower_app.from_record(reply.content["arrays"]), want.delta, strict=True):
        torch.testing.assert_close(got, exp, rtol=0, atol=0)


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


@pytest.mark.slow
def test_deployment_engine_end_to_end(small_mnist, one_thread, tmp_path):
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
        for k in range(2):
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
                f"partition-id={k} num-partitions=2",
            )
            _wait_port(node_port, node, node_log)
        run_config = f'num-server-rounds=2 local-epochs=1 eval-limit=200 out-dir="{out_dir}" seed=0'
        submit = subprocess.run(
            [str(BIN / "flwr"), "run", str(APP_DIR), "local", "--run-config", run_config],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert submit.returncode == 0, submit.stdout + submit.stderr
        deadline = time.monotonic() + 240
        while not (out_dir / "manifest.json").is_file():
            assert time.monotonic() < deadline, link_log.read_text()[-6000:]
            assert link.poll() is None, link_log.read_text()[-6000:]
            time.sleep(1)
    finally:
        _stop(procs)

    from safetensors.torch import load_file

    state = load_file(str(out_dir / "model.safetensors"))
    model = flower_app.model_from([state[n] for n in flower_app.param_names()])
    test = load_mnist("test")
    x = torch.from_numpy(test.images.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    acc, _ = evaluate(model, x, torch.as_tensor(test.labels, dtype=torch.int64))
    assert acc > 0.15  # chance is 0.1 (2 rounds x 1 epoch on 2 x 400 images)
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    assert metrics["rounds"][-1]["num-examples"] == 800
    # the same weights as the in-process loop (other processes: float tolerance, not bits)
    cfg = FedConfig(rounds=2, clients=2, fraction=1.0, local_epochs=1, batch_size=10, seed=0)
    reference = train(cfg, load_mnist("train"), load_mnist("test"))
    for got, want in zip(model.parameters(), reference.model.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
