"""Flower app (Message API, flwr 1.42) running the framework-free core in :mod:`training.fedavg`.

This module only converts types; the training math is the core's:

* ClientApp (``client_app``): loads its partition (``partition-id`` of ``num-partitions`` from
  the SuperNode's ``--node-config``, split by ``training.partition`` exactly as the in-process
  loop splits it), runs :func:`training.fedavg.client_update` from the received global weights
  with the seed ``client_seed(seed, server-round, partition-id)`` and replies with the DELTA
  (an ``ArrayRecord``) and ``num-examples`` / ``train-loss`` / ``partition-id`` (a
  ``MetricRecord``).
* ServerApp (``server_app``): :class:`CoreFedAvg`, a ``flwr.serverapp.strategy.FedAvg`` whose
  ``aggregate_train`` turns the replies back into :class:`training.fedavg.ClientResult` (in
  partition order), calls :func:`training.fedavg.combine` (= :func:`training.fedavg.aggregate`,
  the example-weighted mean, for plain FedAvg) and the core's server optimizer. After the last
  round the model is exported with :func:`training.export.export_model` to ``out-dir``.

With full participation and the same seed/partition this gives the same weights as
``training.fedavg.train`` with ``clients = num-partitions`` and ``fraction = 1``. Central DP
and secure aggregation are not wired into the Flower path (use ``python -m training``).

Run config keys (``[tool.flwr.app.config]`` in ``training/flower/pyproject.toml``, override
with ``flwr run ... --run-config 'key=value ...'``): ``num-server-rounds``, ``num-partitions``
(nodes the server waits for and samples each round), ``local-epochs``, ``batch-size``, ``lr``,
``lr-decay``, ``client-momentum``, ``partition``, ``seed``, ``model``, ``server-opt``,
``server-lr``, ``server-momentum``, ``central-eval``, ``eval-limit`` (0 = all), ``out-dir`` and
``force``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from training.fedavg import (
    ClientResult,
    FedConfig,
    client_seed,
    client_update,
    combine,
    evaluate,
    init_model,
    make_server_optimizer,
)
from training.model import DigitCNN, Model, build_model, export_state
from training.partition import parse_partition

log = logging.getLogger(__name__)

ARRAYS_KEY = "arrays"
METRICS_KEY = "metrics"
CONFIG_KEY = "config"

DEFAULTS: dict[str, Any] = {
    "num-server-rounds": 3,
    "num-partitions": 2,
    "local-epochs": 1,
    "batch-size": 10,
    "lr": 0.05,
    "lr-decay": 1.0,
    "client-momentum": 0.0,
    "partition": "iid",
    "seed": 0,
    "model": "cnn",
    "server-opt": "fedavg",
    "server-lr": 1.0,
    "server-momentum": 0.9,
    "central-eval": True,
    "eval-limit": 0,
    "out-dir": "flower-model",
    "force": False,
}


# --------------------------------------------------------------------------- conversions


def param_names() -> list[str]:
    """Parameter names of :class:`DigitCNN` in ``model.parameters()`` order (the core's order)."""
    with torch.device("meta"):
        return [name for name, _ in DigitCNN().named_parameters()]


def to_record(params: Iterable[torch.Tensor]) -> ArrayRecord:
    """A list of tensors in parameter order -> an ``ArrayRecord`` keyed by parameter name."""
    state = dict(zip(param_names(), params, strict=True))
    return ArrayRecord.from_torch_state_dict(state)


def from_record(record: ArrayRecord) -> list[torch.Tensor]:
    """An ``ArrayRecord`` keyed by parameter name -> a list of tensors in parameter order."""
    state = record.to_torch_state_dict()
    return [state[name] for name in param_names()]


def run_settings(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """The run config with defaults filled in."""
    unknown = set(run_config) - set(DEFAULTS)
    if unknown:
        log.warning("ignoring unknown run config keys: %s", sorted(unknown))
    return {key: run_config.get(key, default) for key, default in DEFAULTS.items()}


def fed_config(run_config: Mapping[str, Any], num_partitions: int | None = None) -> FedConfig:
    """The core's :class:`FedConfig` for this run: ``clients = num-partitions``, full
    participation (Flower samples the nodes; the strategy takes all of them)."""
    s = run_settings(run_config)
    eval_limit = int(s["eval-limit"])
    return FedConfig(
        rounds=int(s["num-server-rounds"]),
        clients=int(num_partitions if num_partitions is not None else s["num-partitions"]),
        fraction=1.0,
        local_epochs=int(s["local-epochs"]),
        batch_size=int(s["batch-size"]),
        lr=float(s["lr"]),
        lr_decay=float(s["lr-decay"]),
        client_momentum=float(s["client-momentum"]),
        partition=str(s["partition"]),
        seed=int(s["seed"]),
        model=str(s["model"]),
        server_opt=str(s["server-opt"]),  # type: ignore[arg-type]
        server_lr=float(s["server-lr"]),
        server_momentum=float(s["server-momentum"]),
        eval_limit=eval_limit if eval_limit > 0 else None,
    )


# --------------------------------------------------------------------------- client side


@dataclass(frozen=True)
class _PartitionKey:
    data_dir: str
    partition: str
    seed: int
    n: int
    k: int


_PARTITIONS: dict[_PartitionKey, tuple[np.ndarray, np.ndarray]] = {}


def load_partition(
    partition_id: int, num_partitions: int, partition: str, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images, labels) of client ``partition_id``: the split ``training.fedavg.train``
    makes with ``clients = num_partitions`` (cached per process)."""
    from training.data import data_dir, load_mnist

    key = _PartitionKey(str(data_dir()), partition, seed, num_partitions, partition_id)
    if key not in _PARTITIONS:
        if not 0 <= partition_id < num_partitions:
            raise ValueError(f"partition-id {partition_id} not in [0, {num_partitions})")
        split = load_mnist("train")
        parts = parse_partition(partition)(np.asarray(split.labels), num_partitions, seed)
        idx = parts[partition_id]
        _PARTITIONS[key] = (split.images[idx], split.labels[idx])
    return _PARTITIONS[key]


def train_reply(
    content: RecordDict, run_config: Mapping[str, Any], node_config: Mapping[str, Any]
) -> RecordDict:
    """The ClientApp's train step on plain records: global weights in, delta and counts out."""
    partition_id = int(node_config["partition-id"])
    num_partitions = int(node_config["num-partitions"])
    cfg = fed_config(run_config, num_partitions)
    server_round = int(content[CONFIG_KEY]["server-round"])
    images, labels = load_partition(partition_id, num_partitions, cfg.partition, cfg.seed)
    result = client_update(
        from_record(content[ARRAYS_KEY]),
        images,
        labels,
        cfg,
        client_seed(cfg.seed, server_round, partition_id),
        round_index=server_round,
    )
    metrics = MetricRecord(
        {
            "num-examples": result.n_examples,
            "train-loss": float(result.loss),
            "partition-id": partition_id,
        }
    )
    return RecordDict({ARRAYS_KEY: to_record(result.delta), METRICS_KEY: metrics})


client_app = ClientApp()


@client_app.train()
def _client_train(msg: Message, context: Context) -> Message:
    reply = train_reply(msg.content, context.run_config, context.node_config)
    return Message(content=reply, reply_to=msg)


# --------------------------------------------------------------------------- server side


def _train_metrics(replies: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """Example-weighted mean train loss and the total example count of one round."""
    rows = [next(iter(r.metric_records.values())) for r in replies]
    total = sum(int(m[weighted_by_key]) for m in rows)
    loss = (
        sum(float(m["train-loss"]) * int(m[weighted_by_key]) for m in rows if m[weighted_by_key])
        / total
        if total
        else math.nan
    )
    return MetricRecord({"train-loss": loss, weighted_by_key: total, "clients": len(rows)})


class CoreFedAvg(FedAvg):
    """Flower's FedAvg sampling and messaging; aggregation and the server update are the core's
    :func:`training.fedavg.combine` and :func:`training.fedavg.make_server_optimizer`."""

    def __init__(self, cfg: FedConfig, min_nodes: int) -> None:
        super().__init__(
            fraction_train=1.0,
            fraction_evaluate=0.0,
            min_train_nodes=min_nodes,
            min_available_nodes=min_nodes,
            weighted_by_key="num-examples",
            arrayrecord_key=ARRAYS_KEY,
            configrecord_key=CONFIG_KEY,
            train_metrics_aggr_fn=_train_metrics,
        )
        self.cfg = cfg
        self.server = make_server_optimizer(cfg)
        self.current: list[torch.Tensor] | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.current = from_record(arrays)
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies(list(replies), is_train=True)
        if not valid or self.current is None:
            return None, None
        contents = sorted(
            (m.content for m in valid), key=lambda c: int(c[METRICS_KEY]["partition-id"])
        )
        results = [
            ClientResult(
                delta=from_record(c[ARRAYS_KEY]),
                n_examples=int(c[METRICS_KEY]["num-examples"]),
                loss=float(c[METRICS_KEY]["train-loss"]),
            )
            for c in contents
        ]
        direction = combine(results, self.cfg)
        params = [p.to(torch.float32) for p in self.server.step(self.current, direction)]
        self.current = params
        return to_record(params), self.train_metrics_aggr_fn(contents, self.weighted_by_key)


def model_from(params: list[torch.Tensor], name: str = "cnn") -> Model:
    """The model ``name`` (:data:`training.model.MODELS`) holding ``params`` (parameter order)."""
    model = build_model(name)
    model.load_state_dict(dict(zip(param_names(), params, strict=True)))
    return model


def run_server(grid: Grid, run_config: Mapping[str, Any]) -> tuple[Model, dict[str, Any]]:
    """The ServerApp body: FedAvg rounds through ``grid``, then export; returns the model and
    the metrics written next to it."""
    from training.export import export_model

    s = run_settings(run_config)
    cfg = fed_config(run_config)
    strategy = CoreFedAvg(cfg, min_nodes=cfg.clients)
    initial = [p.detach().clone() for p in init_model(cfg.seed, cfg.model).parameters()]

    evaluate_fn = None
    if s["central-eval"]:
        from training.data import load_mnist, to_tensor

        test = load_mnist("test")
        limit = len(test) if cfg.eval_limit is None else min(cfg.eval_limit, len(test))
        x_test = to_tensor(test.images[:limit])
        y_test = torch.as_tensor(test.labels[:limit], dtype=torch.int64)

        def evaluate_fn(_: int, arrays: ArrayRecord) -> MetricRecord:
            acc, loss = evaluate(model_from(from_record(arrays), cfg.model), x_test, y_test)
            return MetricRecord({"test-accuracy": acc, "test-loss": loss})

    result = strategy.start(
        grid=grid,
        initial_arrays=to_record(initial),
        num_rounds=cfg.rounds,
        train_config=ConfigRecord(),
        evaluate_fn=evaluate_fn,
    )
    model = model_from(from_record(result.arrays), cfg.model)
    rounds = []
    for r in range(1, cfg.rounds + 1):
        row: dict[str, Any] = {"round": r}
        row.update(dict(result.train_metrics_clientapp.get(r, {})))
        row.update(dict(result.evaluate_metrics_serverapp.get(r, {})))
        rounds.append(row)
    final_acc = rounds[-1].get("test-accuracy") if rounds else None
    metrics = {"config": {k: s[k] for k in DEFAULTS}, "engine": "flower", "rounds": rounds}
    export_model(
        export_state(model),
        model.layers(),
        Path(str(s["out-dir"])),
        force=bool(s["force"]),
        extra_files={"metrics.json": (json.dumps(metrics, indent=2) + "\n").encode()},
        extra_manifest={
            "training": {"engine": "flower", "final_test_accuracy": final_acc, "rounds": cfg.rounds}
        },
    )
    return model, metrics


server_app = ServerApp()


@server_app.main()
def _server_main(grid: Grid, context: Context) -> None:
    run_server(grid, context.run_config)
