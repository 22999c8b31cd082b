"""Flower app (flwr 1.42: ``NumPyClient``, legacy workflows) running :mod:`training.fedavg`.

This module converts types and composes Flower's own parts; the training math is the core's.

* ClientApp (``client_app``): a ``NumPyClient`` whose ``fit`` loads its partition
  (``partition-id`` of ``num-partitions`` from the SuperNode's ``--node-config``, split by
  ``training.partition`` as the in-process loop splits it), runs
  :func:`training.fedavg.client_update` from the received global state with the seed
  ``client_seed(seed, server-round, partition-id)`` and returns the new local state (weights and
  batch-norm running statistics, :func:`param_names` order) with ``num_examples``. Two Flower
  mods wrap it, each active only when the server asks for it: ``secaggplus_mod`` (SecAgg+) and,
  inside it, ``fixedclipping_mod`` (client-side DP clipping).
* ServerApp (``server_app``): Flower's ``DefaultWorkflow``, with ``SecAggPlusWorkflow`` as the
  fit workflow when ``secure-agg`` is on, over a strategy stack of Flower's ``FedAvg``
  (``fraction`` of the connected SuperNodes per round, example-weighted mean, central
  evaluation), optionally inside Flower's DP wrapper, then :class:`AesGaussianNoise`, then
  :class:`CoreServerStep` (the core's server optimizer). After the last round the model is
  exported with :func:`training.export.export_model` to ``out-dir``, with the in-process path's
  ``provenance`` in the manifest (DP epsilon from :func:`training.privacy.epsilon`).

What each party learns. Without SecAgg+ the server sees every sampled client's new state. With
it (Bonawitz et al. 2017, Bell et al. 2020: four message rounds per training round: setup,
share keys, collect masked vectors, unmask) the server learns only the example-weighted sum
of the sampled clients' states, their example counts and train losses; each client learns
only its neighbours' public keys and key shares. Values are clipped to
``[-secagg-clipping-range, secagg-clipping-range]`` and quantised to
``secagg-quantization-range`` levels first; a client refuses to send a state outside that range
(it would be clipped silently).

Differential privacy (``dp-noise`` > 0 or ``dp-clip`` > 0): DP-FedAvg with fixed clipping, via
Flower's wrappers. ``dp-clipping = "server"``: ``DifferentialPrivacyServerSideFixedClipping``
clips each update ``new - global`` to L2 norm ``dp-clip`` on the server; it needs the
individual updates, so with SecAgg+ (which hides them) ``"client"`` is used:
``DifferentialPrivacyClientSideFixedClipping`` with ``fixedclipping_mod``, the client clipping
its own update before masking (``"auto"``, the default, picks by ``secure-agg``). Noise of std
``dp-noise * dp-clip / clients-per-round`` is added to the mean by :class:`AesGaussianNoise`
from :class:`training.privacy.NoiseSource` (AES-256-CTR keyed by ``os.urandom``): Flower's
wrappers draw theirs from numpy's global Mersenne Twister, which is not a cryptographic
generator, so they are given a noise multiplier of 0 and do the clipping only. Epsilon: the
RDP accountant with sample rate ``clients-per-round / num-partitions``.

With full participation, no DP and the same seed/partition this gives the weights of
``training.fedavg.train`` with ``clients = num-partitions`` and ``fraction = 1`` (up to float
rounding and, under SecAgg+, quantisation).

Run config keys (``[tool.flwr.app.config]`` in ``training/flower/pyproject.toml``, override
with ``flwr run ... --run-config 'key=value ...'``): see :data:`DEFAULTS`.
"""

from __future__ import annotations

import json
import logging
import math
import shlex
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Context, MessageType
from flwr.client import NumPyClient
from flwr.client.mod import fixedclipping_mod, secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import (
    NDArrays,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    Strategy,
)
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid, ServerApp

from training import privacy
from training.fedavg import (
    FedConfig,
    _load,
    _work_model,
    client_seed,
    client_update,
    evaluate,
    init_model,
    make_server_optimizer,
    model_tensors,
    state_names,
    valid_statistics,
)
from training.model import Model, build_model, export_state
from training.partition import parse_partition

log = logging.getLogger(__name__)

DEFAULTS: dict[str, Any] = {
    "num-server-rounds": 3,
    "num-partitions": 2,  # SuperNodes the server waits for (each holds one partition)
    "fraction": 1.0,  # of the connected SuperNodes sampled per round
    "local-epochs": 1,
    "batch-size": 10,
    "lr": 0.05,
    "lr-decay": 1.0,
    "client-momentum": 0.0,
    "augment-shift": 0,
    "bn-freeze-round": 0,
    "partition": "iid",
    "seed": 0,
    "model": "cnn-bn",
    "server-opt": "fedavg",
    "server-lr": 1.0,
    "server-momentum": 0.9,
    "secure-agg": False,
    "secagg-num-shares": 1.0,  # float: share of the cohort; int > 2: a count
    "secagg-threshold": 0.7,  # float: share of num-shares; int: a count
    "secagg-clipping-range": 4096.0,  # bounds every value sent: BN running variances grow
    "secagg-quantization-range": 2**28,  # x clients per round must stay <= 2**32
    "secagg-max-weight": 1000.0,  # largest num_examples a client may report
    "dp-clip": 0.0,  # 0: no DP
    "dp-noise": 0.0,
    "dp-delta": 1e-5,
    "dp-clipping": "auto",  # auto | server | client
    "central-eval": True,
    "eval-limit": 0,  # 0 = all 10,000
    "private-eval": False,
    "out-dir": "flower-model",
    "force": False,
}
DP_CLIPPING = ("auto", "server", "client")


# --------------------------------------------------------------------------- settings


def run_settings(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """The run config with defaults filled in; unknown keys are an error."""
    unknown = set(run_config) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown run config keys {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    return {key: run_config.get(key, default) for key, default in DEFAULTS.items()}


def fed_config(run_config: Mapping[str, Any], num_partitions: int | None = None) -> FedConfig:
    """The core's :class:`FedConfig` for this run (``clients = num-partitions``)."""
    s = run_settings(run_config)
    eval_limit = int(s["eval-limit"])
    dp_clip = float(s["dp-clip"])
    return FedConfig(
        rounds=int(s["num-server-rounds"]),
        clients=int(num_partitions if num_partitions is not None else s["num-partitions"]),
        fraction=float(s["fraction"]),
        local_epochs=int(s["local-epochs"]),
        batch_size=int(s["batch-size"]),
        lr=float(s["lr"]),
        lr_decay=float(s["lr-decay"]),
        client_momentum=float(s["client-momentum"]),
        augment_shift=int(s["augment-shift"]),
        bn_freeze_round=int(s["bn-freeze-round"]),
        partition=str(s["partition"]),
        seed=int(s["seed"]),
        model=str(s["model"]),
        server_opt=str(s["server-opt"]),  # type: ignore[arg-type]
        server_lr=float(s["server-lr"]),
        server_momentum=float(s["server-momentum"]),
        dp_clip=dp_clip if dp_clip > 0 else None,
        dp_noise=float(s["dp-noise"]),
        dp_delta=float(s["dp-delta"]),
        secure_agg=bool(s["secure-agg"]),
        eval_limit=eval_limit if eval_limit > 0 else None,
    )


def dp_clipping(run_config: Mapping[str, Any]) -> str:
    """Where updates are clipped: ``"server"`` or ``"client"`` (``"auto"`` resolved)."""
    s = run_settings(run_config)
    where = str(s["dp-clipping"])
    if where not in DP_CLIPPING:
        raise ValueError(f"dp-clipping must be one of {DP_CLIPPING}, got {where!r}")
    if where == "auto":
        return "client" if s["secure-agg"] else "server"
    if where == "server" and s["secure-agg"]:
        raise ValueError(
            'dp-clipping="server" clips each client\'s update on the server, which SecAgg+ '
            'hides from it: use dp-clipping="client" (Flower\'s fixedclipping_mod) or "auto"'
        )
    return where


def param_names(model: str = "cnn-bn") -> list[str]:
    """What travels each round, in order: ``model``'s parameters, then its floating buffers
    (batch normalisation's running statistics): :func:`training.fedavg.state_names`."""
    return state_names(_work_model(model))


def model_from(arrays: Sequence[np.ndarray | torch.Tensor], name: str = "cnn-bn") -> Model:
    """The model ``name`` holding ``arrays`` (:func:`param_names` order)."""
    model = build_model(name)
    _load(model, [torch.as_tensor(np.asarray(a)) for a in arrays])
    return model


def initial_arrays(cfg: FedConfig) -> NDArrays:
    """The seeded initial global state (as the in-process loop starts)."""
    model = init_model(cfg.seed, cfg.model)
    return [t.detach().numpy().copy() for t in model_tensors(model)]


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


class CoreClient(NumPyClient):
    """One data holder: :func:`training.fedavg.client_update` on its partition."""

    def __init__(self, partition_id: int, num_partitions: int, run_config: Mapping[str, Any]):
        self.partition_id, self.num_partitions = partition_id, num_partitions
        self.settings = run_settings(run_config)
        self.cfg = fed_config(run_config, num_partitions)

    def fit(self, parameters: NDArrays, config: dict[str, Scalar]) -> tuple[NDArrays, int, dict]:
        server_round = int(config["server-round"])
        start = [torch.from_numpy(np.asarray(p, dtype=np.float32)) for p in parameters]
        images, labels = load_partition(
            self.partition_id, self.num_partitions, self.cfg.partition, self.cfg.seed
        )
        result = client_update(
            start,
            images,
            labels,
            self.cfg,
            client_seed(self.cfg.seed, server_round, self.partition_id),
            round_index=server_round,
        )
        new = [(s + d).numpy() for s, d in zip(start, result.delta, strict=True)]
        if self.cfg.secure_agg:
            bound = float(self.settings["secagg-clipping-range"])
            peak = max(float(np.abs(a).max()) for a in new if a.size)
            if not peak <= bound:
                raise ValueError(
                    f"a value of magnitude {peak:.3g} exceeds secagg-clipping-range {bound}: "
                    "SecAgg+ would clip it silently; raise secagg-clipping-range"
                )
        metrics = {"train-loss": float(result.loss), "partition-id": self.partition_id}
        return new, result.n_examples, metrics


def client_fn(context: Context):
    """The ClientApp's client for this SuperNode (``--node-config``)."""
    node = context.node_config
    return CoreClient(
        int(node["partition-id"]), int(node["num-partitions"]), context.run_config
    ).to_client()


def _secagg_if_asked(msg, ctxt, call_next):
    """``secaggplus_mod`` on messages of the SecAgg+ workflow; plain fit messages pass."""
    if msg.metadata.message_type == MessageType.TRAIN and RECORD_KEY_CONFIGS in (
        msg.content.config_records
    ):
        return secaggplus_mod(msg, ctxt, call_next)
    return call_next(msg, ctxt)


def _clipping_if_asked(msg, ctxt, call_next):
    """``fixedclipping_mod`` when the server's DP wrapper sends a clipping norm."""
    if msg.metadata.message_type == MessageType.TRAIN:
        configs = [r for k, r in msg.content.config_records.items() if k != RECORD_KEY_CONFIGS]
        if any("clipping_norm" in r for r in configs):
            return fixedclipping_mod(msg, ctxt, call_next)
    return call_next(msg, ctxt)


client_app = ClientApp(client_fn=client_fn, mods=[_secagg_if_asked, _clipping_if_asked])


# --------------------------------------------------------------------------- server side


class Delegate(Strategy):
    """A strategy that passes every call to ``inner`` (base of the wrappers below)."""

    def __init__(self, inner: Strategy) -> None:
        super().__init__()
        self.inner = inner

    def initialize_parameters(self, client_manager):
        return self.inner.initialize_parameters(client_manager)

    def configure_fit(self, server_round, parameters, client_manager):
        return self.inner.configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(self, server_round, results, failures):
        return self.inner.aggregate_fit(server_round, results, failures)

    def configure_evaluate(self, server_round, parameters, client_manager):
        return self.inner.configure_evaluate(server_round, parameters, client_manager)

    def aggregate_evaluate(self, server_round, results, failures):
        return self.inner.aggregate_evaluate(server_round, results, failures)

    def evaluate(self, server_round, parameters):
        return self.inner.evaluate(server_round, parameters)


class AesGaussianNoise(Delegate):
    """Adds ``N(0, (noise * clip / clients)^2)`` to each coordinate of the aggregated mean
    (the std Flower's DP wrappers use), drawn from :class:`training.privacy.NoiseSource`."""

    def __init__(
        self,
        inner: Strategy,
        noise_multiplier: float,
        clip: float,
        clients: int,
        source: privacy.NoiseSource | None = None,
    ) -> None:
        super().__init__(inner)
        self.std = noise_multiplier * clip / clients
        self.source = source if source is not None else privacy.NoiseSource()

    def aggregate_fit(self, server_round, results, failures):
        params, metrics = self.inner.aggregate_fit(server_round, results, failures)
        if params is None or self.std == 0:
            return params, metrics
        noised = [
            a + self.source.normal(a.shape, torch.float64).numpy().astype(a.dtype) * self.std
            for a in parameters_to_ndarrays(params)
        ]
        return ndarrays_to_parameters(noised), metrics


class CoreServerStep(Delegate):
    """The core's server optimizer (:func:`training.fedavg.make_server_optimizer`) on the mean
    the inner strategies produce: ``delta = mean - global`` moves the parameters through the
    optimizer; the running statistics take the mean as it is, variances clamped at 0 (as in
    ``training.fedavg``)."""

    def __init__(self, inner: Strategy, cfg: FedConfig) -> None:
        super().__init__(inner)
        self.server = make_server_optimizer(cfg)
        model = _work_model(cfg.model)
        self.n_params = len(list(model.parameters()))
        self.stat_names = state_names(model)[self.n_params :]
        self.current: list[torch.Tensor] | None = None
        self.aggregated: list[int] = []

    def configure_fit(self, server_round, parameters, client_manager):
        self.current = [torch.from_numpy(a) for a in parameters_to_ndarrays(parameters)]
        return self.inner.configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(self, server_round, results, failures):
        params, metrics = self.inner.aggregate_fit(server_round, results, failures)
        if params is None or self.current is None:
            return params, metrics
        mean = [torch.from_numpy(a) for a in parameters_to_ndarrays(params)]
        delta = [m.double() - c.double() for m, c in zip(mean, self.current, strict=True)]
        n = self.n_params
        stepped = self.server.step([c.double() for c in self.current[:n]], delta[:n])
        state = [*stepped, *valid_statistics(self.stat_names, mean[n:])]
        self.current = [t.to(torch.float32) for t in state]
        self.aggregated.append(server_round)
        return ndarrays_to_parameters([t.numpy() for t in self.current]), metrics


def _fit_metrics(rows: list[tuple[int, dict[str, Scalar]]]) -> dict[str, Scalar]:
    total = sum(n for n, _ in rows)
    loss = sum(n * float(m["train-loss"]) for n, m in rows) / total if total else math.nan
    return {"train-loss": loss, "num-examples": total, "clients": len(rows)}


@dataclass
class ServerPlan:
    """What :func:`build_server` made: the strategy stack and the workflow to run it in."""

    cfg: FedConfig
    strategy: CoreServerStep
    workflow: DefaultWorkflow
    clients_per_round: int
    clipping: str | None


def build_server(
    run_config: Mapping[str, Any],
    evaluate_fn: Callable | None = None,
    noise_source: privacy.NoiseSource | None = None,
) -> ServerPlan:
    """Flower's FedAvg [in Flower's DP wrapper] in :class:`AesGaussianNoise` in
    :class:`CoreServerStep`, and a ``DefaultWorkflow`` [with ``SecAggPlusWorkflow``]."""
    s = run_settings(run_config)
    cfg = fed_config(run_config)
    nodes = cfg.clients
    per_round = cfg.clients_per_round
    clipping = dp_clipping(run_config) if cfg.dp_clip is not None else None
    if cfg.secure_agg and per_round < 2:
        raise ValueError(
            f"SecAgg+ needs at least 2 clients per round, got {per_round} "
            f"(fraction {cfg.fraction} of {nodes} SuperNodes)"
        )
    if cfg.secure_agg and per_round * int(s["secagg-quantization-range"]) > 2**32:
        raise ValueError(
            f"secagg-quantization-range {s['secagg-quantization-range']} x {per_round} clients "
            "per round exceeds SecAgg+'s modulus 2**32: lower it"
        )
    strategy: Strategy = FedAvg(
        fraction_fit=cfg.fraction,
        fraction_evaluate=0.0,
        min_fit_clients=per_round,
        min_evaluate_clients=0,
        min_available_clients=nodes,
        evaluate_fn=evaluate_fn,
        on_fit_config_fn=lambda r: {"server-round": r},
        initial_parameters=ndarrays_to_parameters(initial_arrays(cfg)),
        fit_metrics_aggregation_fn=_fit_metrics,
    )
    if clipping is not None:
        wrapper = (
            DifferentialPrivacyServerSideFixedClipping
            if clipping == "server"
            else DifferentialPrivacyClientSideFixedClipping
        )
        # noise 0: Flower's wrappers draw noise from numpy's global generator; ours is AES
        strategy = wrapper(strategy, 0.0, cfg.dp_clip, per_round)
        strategy = AesGaussianNoise(strategy, cfg.dp_noise, cfg.dp_clip, per_round, noise_source)
    top = CoreServerStep(strategy, cfg)
    fit_workflow = None
    if cfg.secure_agg:
        fit_workflow = SecAggPlusWorkflow(
            num_shares=s["secagg-num-shares"],
            reconstruction_threshold=s["secagg-threshold"],
            max_weight=float(s["secagg-max-weight"]),
            clipping_range=float(s["secagg-clipping-range"]),
            quantization_range=int(s["secagg-quantization-range"]),
        )
    return ServerPlan(cfg, top, DefaultWorkflow(fit_workflow=fit_workflow), per_round, clipping)


def _flwr_command(run_config: Mapping[str, Any]) -> str:
    pairs = " ".join(f"{k}={json.dumps(v)}" for k, v in sorted(run_config.items()))
    return "flwr run training/flower --run-config " + shlex.quote(pairs)


def provenance(
    run_config: Mapping[str, Any], plan: ServerPlan, history: list[dict[str, Any]]
) -> dict[str, Any]:
    """The manifest's ``provenance``: the in-process path's object, for a Flower run."""
    from training.__main__ import provenance as core_provenance

    origin = core_provenance([], plan.cfg, history)
    origin["command"] = _flwr_command(run_config)
    parts = ["Flower 1.42 deployment engine (training.flower_app)"]
    if plan.cfg.secure_agg:
        parts.append("SecAgg+ (SecAggPlusWorkflow + secaggplus_mod)")
        origin["secure_aggregation_protocol"] = "flower-secagg+"
    if origin["dp"] is not None:
        wrapper = (
            "DifferentialPrivacyServerSideFixedClipping"
            if plan.clipping == "server"
            else "DifferentialPrivacyClientSideFixedClipping + fixedclipping_mod"
        )
        parts.append(f"DP: Flower's {wrapper}, AES-CTR Gaussian noise")
        origin["dp"]["clipping"] = plan.clipping
        origin["dp"]["sample_rate"] = plan.clients_per_round / plan.cfg.clients
    origin["trained_by"] = "; ".join(parts)
    origin["clients_per_round"] = plan.clients_per_round
    return origin


def run_server(
    grid: Grid,
    run_config: Mapping[str, Any],
    *,
    noise_source: privacy.NoiseSource | None = None,
) -> tuple[Model, dict[str, Any]]:
    """The ServerApp body: the rounds through ``grid``, then export; returns the model and the
    metrics written next to it."""
    from flwr.app import Context as AppContext
    from flwr.app import RecordDict

    from training.export import export_model

    s = run_settings(run_config)
    cfg = fed_config(run_config)
    images = x_test = y_test = None
    if s["central-eval"] or s["private-eval"]:
        from training.data import load_mnist, to_tensor

        test = load_mnist("test")
        limit = len(test) if cfg.eval_limit is None else min(cfg.eval_limit, len(test))
        images = test.images[:limit]
        x_test = to_tensor(images)
        y_test = torch.as_tensor(test.labels[:limit], dtype=torch.int64)

    def evaluate_fn(_: int, arrays: NDArrays, __: dict) -> tuple[float, dict[str, Scalar]]:
        acc, loss = evaluate(model_from(arrays, cfg.model), x_test, y_test)
        return loss, {"test-accuracy": acc}

    plan = build_server(run_config, evaluate_fn if s["central-eval"] else None, noise_source)
    context = LegacyContext(
        context=AppContext(
            run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config=dict(run_config)
        ),
        config=ServerConfig(num_rounds=cfg.rounds),
        strategy=plan.strategy,
    )
    plan.workflow(grid, context)
    missing = sorted(set(range(1, cfg.rounds + 1)) - set(plan.strategy.aggregated))
    if missing or plan.strategy.current is None:
        raise RuntimeError(
            f"rounds {missing} produced no aggregate (too few SuperNodes replied, or SecAgg+ "
            "halted): see the ServerApp log"
        )
    model = model_from([t.numpy() for t in plan.strategy.current], cfg.model)
    history = _history(context, cfg, plan)
    metrics = {"config": dict(s), "engine": "flower", "rounds": history}
    origin = provenance(run_config, plan, history)

    from training.evaluate import with_private_accuracy

    labels = y_test.numpy() if y_test is not None else None  # loaded only for an evaluation
    amend = with_private_accuracy(origin, images, labels, bool(s["private-eval"]))

    export_model(
        export_state(model),
        model.layers(),
        Path(str(s["out-dir"])),
        force=bool(s["force"]),
        extra_files={"metrics.json": (json.dumps(metrics, indent=2) + "\n").encode()},
        extra_manifest={
            "training": {
                "engine": "flower",
                "final_test_accuracy": history[-1]["test_accuracy"],
                "rounds": cfg.rounds,
                "epsilon": history[-1]["epsilon"],
            }
        },
        amend=amend,
    )
    return model, metrics


def _history(context: LegacyContext, cfg: FedConfig, plan: ServerPlan) -> list[dict[str, Any]]:
    """Per-round rows: test accuracy and loss, train loss, examples, clients, epsilon."""
    hist = context.history
    acc = dict(hist.metrics_centralized.get("test-accuracy", []))
    loss = dict(hist.losses_centralized)
    fit = {k: dict(v) for k, v in hist.metrics_distributed_fit.items()}
    rows = []
    for r in range(1, cfg.rounds + 1):
        eps = None
        if cfg.dp_clip is not None:
            eps = privacy.epsilon(
                cfg.dp_noise, plan.clients_per_round / cfg.clients, r, cfg.dp_delta
            )
        rows.append(
            {
                "round": r,
                "test_accuracy": acc.get(r),
                "test_loss": loss.get(r),
                "train_loss": fit.get("train-loss", {}).get(r),
                "num_examples": fit.get("num-examples", {}).get(r),
                "clients": fit.get("clients", {}).get(r),
                "epsilon": eps,
            }
        )
    return rows


server_app = ServerApp()


@server_app.main()
def _server_main(grid: Grid, context: Context) -> None:
    run_server(grid, context.run_config)
