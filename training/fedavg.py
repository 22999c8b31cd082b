"""Framework-free federated training core: seeded, in-process FedAvg in plain PyTorch.

One round: sample ``max(1, round(fraction * clients))`` clients with a seeded numpy generator;
each runs ``local_epochs`` of minibatch SGD from the global weights on its own partition and
returns ``delta = local - global`` and its example count; the server combines the deltas and
applies a server optimizer (FedAvg, FedAvgM or FedAdam, Reddi et al. 2021).

How the deltas are combined:

* plain: example-weighted mean ``sum_k n_k delta_k / sum_k n_k`` (:func:`aggregate`), as in
  McMahan et al. 2017 and Flower's FedAvg;
* secure aggregation (``secure_agg=True``): the same weighted mean, but clients pre-multiply by
  ``n_k`` and the weighted SUM is formed by two non-colluding aggregators on additive shares
  (:mod:`training.secagg`); the server only ever sees the sum and the counts;
* central DP (``dp_clip`` set): DP-FedAvg (McMahan et al. 2018): each delta is clipped to L2 norm
  ``dp_clip``, the clipped deltas are summed (securely if ``secure_agg``), Gaussian noise of
  std ``dp_noise * dp_clip`` is added to the sum, and the sum is divided by the cohort size
  (an UNWEIGHTED mean: weighting by ``n_k`` would let one client's influence exceed the clip).
  Epsilon comes from the RDP accountant with ``sample_rate = fraction``.

Batch normalisation's running mean and variance (models with ``batchnorm``) travel with the
weights: a client's update is ``local - global`` of the parameters and of those statistics
(:func:`state_names`), combined the same way (so under secure aggregation the server sees only
their sum, and under DP they are inside the clipped, noised vector); the server optimizer then
moves only the parameters, and the statistics take the combined mean as it is.

Determinism: the same config gives bit-identical weights (without DP noise, whose generator is
seeded from ``os.urandom`` unless ``train(noise_seed=...)`` is given). Model init uses
``torch.manual_seed(seed)`` inside a forked RNG; every client's minibatch order comes from its
own generator seeded from ``(seed, round, client)``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from training import privacy, secagg
from training.data import MnistSplit, to_tensor
from training.model import MODELS, DigitCNN, build_model
from training.partition import parse_partition

ServerOptName = Literal["fedavg", "fedavgm", "fedadam"]
SERVER_OPTS = ("fedavg", "fedavgm", "fedadam")
EVAL_BATCH = 1000


@dataclass(frozen=True)
class FedConfig:
    """Hyperparameters of one federated run (defaults: the FedAvg paper's MNIST CNN setting)."""

    rounds: int = 20
    clients: int = 100
    fraction: float = 0.1
    local_epochs: int = 5
    batch_size: int = 10
    lr: float = 0.05
    lr_decay: float = 1.0
    client_momentum: float = 0.0
    augment_shift: int = 0
    bn_freeze_round: int = 0
    partition: str = "iid"
    seed: int = 0
    model: str = "cnn"
    server_opt: ServerOptName = "fedavg"
    server_lr: float = 1.0
    server_momentum: float = 0.9
    dp_clip: float | None = None
    dp_noise: float = 0.0
    dp_delta: float = 1e-5
    secure_agg: bool = False
    eval_every: int = 1
    eval_limit: int | None = None

    def __post_init__(self) -> None:
        problems: list[str] = []
        if self.rounds < 1:
            problems.append(f"rounds must be >= 1, got {self.rounds}")
        if self.clients < 1:
            problems.append(f"clients must be >= 1, got {self.clients}")
        if not 0 < self.fraction <= 1:
            problems.append(f"fraction must be in (0, 1], got {self.fraction}")
        if self.local_epochs < 0:
            problems.append(f"local_epochs must be >= 0, got {self.local_epochs}")
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.lr > 0 or not self.server_lr > 0:
            problems.append("lr and server_lr must be > 0")
        if not 0 < self.lr_decay <= 1:
            problems.append(f"lr_decay must be in (0, 1], got {self.lr_decay}")
        if not 0 <= self.client_momentum < 1:
            problems.append(f"client_momentum must be in [0, 1), got {self.client_momentum}")
        if not 0 <= self.augment_shift <= 4:
            problems.append(f"augment_shift must be in 0..4 pixels, got {self.augment_shift}")
        if self.bn_freeze_round < 0:
            problems.append(f"bn_freeze_round must be >= 0, got {self.bn_freeze_round}")
        if not 0 <= self.server_momentum < 1:
            problems.append(f"server_momentum must be in [0, 1), got {self.server_momentum}")
        if self.server_opt not in SERVER_OPTS:
            problems.append(f"server_opt must be one of {SERVER_OPTS}, got {self.server_opt!r}")
        if self.dp_clip is not None and not self.dp_clip > 0:
            problems.append(f"dp_clip must be > 0 or None, got {self.dp_clip}")
        if self.dp_noise < 0:
            problems.append(f"dp_noise must be >= 0, got {self.dp_noise}")
        if self.dp_noise > 0 and self.dp_clip is None:
            problems.append("dp_noise > 0 needs dp_clip (the noise is scaled by the clip)")
        if not 0 < self.dp_delta < 1:
            problems.append(f"dp_delta must be in (0, 1), got {self.dp_delta}")
        if self.model not in MODELS:
            problems.append(f"model must be one of {sorted(MODELS)}, got {self.model!r}")
        if self.eval_every < 1:
            problems.append(f"eval_every must be >= 1, got {self.eval_every}")
        if self.eval_limit is not None and self.eval_limit < 1:
            problems.append(f"eval_limit must be >= 1 or None, got {self.eval_limit}")
        try:
            parse_partition(self.partition)
        except ValueError as exc:
            problems.append(str(exc))
        if problems:
            raise ValueError("invalid FedConfig: " + "; ".join(problems))

    @property
    def clients_per_round(self) -> int:
        """Cohort size: ``max(1, round(fraction * clients))``."""
        return max(1, round(self.fraction * self.clients))

    def client_lr(self, round_index: int) -> float:
        """Client learning rate in round ``round_index`` (1-based): ``lr * lr_decay**(r-1)``."""
        return self.lr * self.lr_decay ** (max(1, round_index) - 1)


@dataclass
class ClientResult:
    """What a client reports: its update, its example count and its mean local training loss."""

    delta: list[torch.Tensor]
    n_examples: int
    loss: float


@dataclass(frozen=True)
class RoundMetrics:
    """Metrics after one round (test metrics are None on rounds that skip evaluation)."""

    round: int
    test_accuracy: float | None
    test_loss: float | None
    train_loss: float
    clients: int
    epsilon: float | None
    seconds: float


@dataclass
class TrainResult:
    """The trained global model and the per-round history."""

    model: DigitCNN
    history: list[RoundMetrics] = field(default_factory=list)


# --------------------------------------------------------------------------- helpers


def _work_model(name: str = "cnn") -> DigitCNN:
    """An uninitialised model (built on the meta device: no RNG draws, no init cost)."""
    with torch.device("meta"):
        model = build_model(name)
    return model.to_empty(device="cpu")


def state_names(model: torch.nn.Module) -> list[str]:
    """The names of what a round averages: ``model.parameters()`` in order, then the floating
    buffers (batch normalisation's running mean and variance, where the model has them)."""
    return [n for n, _ in model.named_parameters()] + _buffer_names(model)


def _buffer_names(model: torch.nn.Module) -> list[str]:
    return [n for n, b in model.named_buffers() if b.is_floating_point()]


def model_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    """The tensors :func:`state_names` names, in that order (the model's own, not copies)."""
    buffers = dict(model.named_buffers())
    return list(model.parameters()) + [buffers[n] for n in _buffer_names(model)]


def valid_statistics(names: Sequence[str], stats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The combined running statistics with every variance clamped at 0: DP noise on the
    averaged variances can push one below 0 (the model would then evaluate to NaN)."""
    return [
        s.clamp(min=0) if n.endswith("running_var") else s
        for n, s in zip(names, stats, strict=True)
    ]


def _as_param_list(
    state: Mapping[str, torch.Tensor] | Sequence[torch.Tensor], model: str = "cnn"
) -> list[torch.Tensor]:
    """Global weights as a list in :func:`state_names` order (accepts a state_dict too)."""
    if isinstance(state, Mapping):
        return [state[n] for n in state_names(_work_model(model))]
    return list(state)


def _load(model: torch.nn.Module, params: Sequence[torch.Tensor]) -> None:
    with torch.no_grad():
        for p, v in zip(model_tensors(model), params, strict=True):
            p.copy_(v)


def client_seed(seed: int, round_index: int, client: int) -> int:
    """Per-client, per-round seed derived from ``(seed, round, client)``."""
    return int(np.random.SeedSequence([seed, round_index, client]).generate_state(1, np.uint64)[0])


def _images(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    if isinstance(images, np.ndarray):
        return to_tensor(images) if images.dtype == np.uint8 else torch.from_numpy(images).float()
    return images


def _labels(labels: torch.Tensor | np.ndarray) -> torch.Tensor:
    return torch.as_tensor(labels, dtype=torch.int64)


def random_shift(x: torch.Tensor, shift: int, gen: torch.Generator) -> torch.Tensor:
    """Each image of ``x`` (N, 1, H, W) moved by its own random (dy, dx) in ``[-shift, shift]``,
    filling with 0 (background); draws ``2 N`` integers from ``gen``."""
    if shift <= 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (shift, shift, shift, shift))
    d = torch.randint(0, 2 * shift + 1, (2, n), generator=gen)
    rows = (d[0][:, None] + torch.arange(h))[:, :, None]  # (N, H, 1)
    cols = (d[1][:, None] + torch.arange(w))[:, None, :]  # (N, 1, W)
    return padded[torch.arange(n)[:, None, None], 0, rows, cols].unsqueeze(1)


# --------------------------------------------------------------------------- client


def client_update(
    global_state: Mapping[str, torch.Tensor] | Sequence[torch.Tensor],
    images: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    cfg: FedConfig,
    seed: int,
    round_index: int = 1,
) -> ClientResult:
    """Local SGD (``cfg.local_epochs`` epochs, batch ``cfg.batch_size``) from the global
    weights; returns ``delta = local - global`` in :func:`state_names` order (the parameters,
    then batch normalisation's running statistics, which local training updates too).

    The step size is ``cfg.client_lr(round_index)`` (``lr * lr_decay**(round - 1)``). With
    ``cfg.client_momentum = mu > 0`` it is heavy-ball SGD, ``v = mu v + g; w -= lr v``, with the
    velocity starting at zero in every round (clients keep no optimizer state between rounds).
    With ``cfg.augment_shift = s > 0`` every minibatch image is moved by a random shift of up to
    ``s`` pixels each way (:func:`random_shift`; local data augmentation, from the same seeded
    generator). The model is put in training mode (dropout, where the model has it); from
    round ``cfg.bn_freeze_round`` on (when > 0) its batch normalisation stays in inference mode:
    it normalises with the global running statistics, which no longer change (their delta is
    zero), so local training sees the affine map the exported model folds, not the client's
    own batch statistics.
    ``images`` are float ``(N, 1, 28, 28)`` in [0, 1] (or uint8 ``(N, 28, 28)``).
    """
    start = _as_param_list(global_state, cfg.model)
    x, y = _images(images), _labels(labels)
    n = int(y.shape[0])
    model = _work_model(cfg.model)
    _load(model, start)
    model.train()
    if cfg.bn_freeze_round and round_index >= cfg.bn_freeze_round:
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()
    params = list(model.parameters())
    tensors = model_tensors(model)
    gen = torch.Generator().manual_seed(seed)
    lr, mu = cfg.client_lr(round_index), cfg.client_momentum
    with torch.random.fork_rng(devices=[]):  # dropout draws from the global RNG: seed it here
        torch.manual_seed(seed)
        loss_sum, steps = _local_sgd(model, params, x, y, cfg, gen, lr, mu)
    with torch.no_grad():
        delta = [p.detach() - s for p, s in zip(tensors, start, strict=True)]
    return ClientResult(delta=delta, n_examples=n, loss=loss_sum / steps if steps else math.nan)


def _local_sgd(
    model: torch.nn.Module,
    params: list[torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: FedConfig,
    gen: torch.Generator,
    lr: float,
    mu: float,
) -> tuple[float, int]:
    n = int(y.shape[0])
    velocity: list[torch.Tensor] | None = None
    loss_sum, steps = 0.0, 0
    for _ in range(cfg.local_epochs if n else 0):
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            xb = random_shift(x[idx], cfg.augment_shift, gen) if cfg.augment_shift else x[idx]
            loss = F.cross_entropy(model(xb), y[idx])
            grads = torch.autograd.grad(loss, params)
            with torch.no_grad():
                if mu > 0:
                    if velocity is None:
                        velocity = [g.clone() for g in grads]
                    else:
                        torch._foreach_mul_(velocity, mu)
                        torch._foreach_add_(velocity, grads)
                    grads = velocity
                torch._foreach_add_(params, grads, alpha=-lr)
            loss_sum += float(loss.detach())
            steps += 1
    return loss_sum, steps


# --------------------------------------------------------------------------- server


def aggregate(results: Sequence[ClientResult]) -> list[torch.Tensor]:
    """Example-weighted mean of the clients' deltas: ``sum_k n_k d_k / sum_k n_k``."""
    if not results:
        raise ValueError("aggregate needs at least one client result")
    total = sum(r.n_examples for r in results)
    if total <= 0:
        raise ValueError("the clients reported no examples")
    out = []
    for i, ref in enumerate(results[0].delta):
        acc = torch.zeros(ref.shape, dtype=torch.float64)
        for r in results:
            acc += r.delta[i].to(torch.float64) * r.n_examples
        out.append((acc / total).to(ref.dtype))
    return out


def combine(
    results: Sequence[ClientResult],
    cfg: FedConfig,
    noise_generator: privacy.NoiseSource | None = None,
) -> list[torch.Tensor]:
    """The server's update direction for one round, following ``cfg`` (plain, secure, DP)."""
    dtype = results[0].delta[0].dtype
    if cfg.dp_clip is not None:
        clipped = [privacy.clip_update(r.delta, cfg.dp_clip)[0] for r in results]
        if cfg.secure_agg:
            total = secagg.secure_sum(clipped)
        else:
            total = [
                torch.stack([c[i].double() for c in clipped]).sum(0) for i in range(len(clipped[0]))
            ]
        noised = privacy.add_noise(total, cfg.dp_noise, cfg.dp_clip, noise_generator)
        return [(t / cfg.clients_per_round).to(dtype) for t in noised]
    if cfg.secure_agg:
        weights = [r.n_examples for r in results]
        if sum(weights) <= 0:
            raise ValueError("the clients reported no examples")
        total = secagg.secure_sum([r.delta for r in results], weights)
        return [(t / sum(weights)).to(dtype) for t in total]
    return aggregate(results)


class FedAvgServer:
    """FedAvg: ``w + server_lr * delta``."""

    def __init__(self, server_lr: float = 1.0) -> None:
        self.lr = server_lr

    def step(
        self, global_params: Sequence[torch.Tensor], avg_delta: Sequence[torch.Tensor]
    ) -> list[torch.Tensor]:
        return [w + self.lr * d for w, d in zip(global_params, avg_delta, strict=True)]


class FedAvgMServer:
    """FedAvgM (Hsu et al. 2019): ``v = momentum * v + delta; w + server_lr * v``."""

    def __init__(self, server_lr: float = 1.0, momentum: float = 0.9) -> None:
        self.lr, self.momentum = server_lr, momentum
        self.velocity: list[torch.Tensor] | None = None

    def step(
        self, global_params: Sequence[torch.Tensor], avg_delta: Sequence[torch.Tensor]
    ) -> list[torch.Tensor]:
        if self.velocity is None:
            self.velocity = [d.clone() for d in avg_delta]
        else:
            self.velocity = [
                self.momentum * v + d for v, d in zip(self.velocity, avg_delta, strict=True)
            ]
        return [w + self.lr * v for w, v in zip(global_params, self.velocity, strict=True)]


class FedAdamServer:
    """FedAdam (Reddi et al. 2021): Adam on the pseudo-gradient ``-delta``, no bias correction.

    ``m = b1 m + (1-b1) d; v = b2 v + (1-b2) d^2; w + server_lr * m / (sqrt(v) + tau)``. Steps
    are about ``server_lr`` per coordinate, so use a small ``server_lr`` (1e-3 .. 1e-2).
    """

    def __init__(
        self, server_lr: float = 1e-2, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3
    ) -> None:
        self.lr, self.beta1, self.beta2, self.tau = server_lr, beta1, beta2, tau
        self.m: list[torch.Tensor] | None = None
        self.v: list[torch.Tensor] | None = None

    def step(
        self, global_params: Sequence[torch.Tensor], avg_delta: Sequence[torch.Tensor]
    ) -> list[torch.Tensor]:
        if self.m is None or self.v is None:
            self.m = [torch.zeros_like(d) for d in avg_delta]
            self.v = [torch.zeros_like(d) for d in avg_delta]
        b1, b2 = self.beta1, self.beta2
        self.m = [b1 * m + (1 - b1) * d for m, d in zip(self.m, avg_delta, strict=True)]
        self.v = [b2 * v + (1 - b2) * d * d for v, d in zip(self.v, avg_delta, strict=True)]
        return [
            w + self.lr * m / (v.sqrt() + self.tau)
            for w, m, v in zip(global_params, self.m, self.v, strict=True)
        ]


ServerOptimizer = FedAvgServer | FedAvgMServer | FedAdamServer


def make_server_optimizer(cfg: FedConfig) -> ServerOptimizer:
    """The server optimizer named by ``cfg.server_opt``."""
    if cfg.server_opt == "fedavgm":
        return FedAvgMServer(cfg.server_lr, cfg.server_momentum)
    if cfg.server_opt == "fedadam":
        return FedAdamServer(cfg.server_lr)
    return FedAvgServer(cfg.server_lr)


# --------------------------------------------------------------------------- loop


def evaluate(
    model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor
) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of ``model`` on pre-built tensors."""
    n = int(labels.shape[0])
    correct, loss_sum = 0, 0.0
    model.eval()
    with torch.no_grad():
        for i in range(0, n, EVAL_BATCH):
            logits = model(images[i : i + EVAL_BATCH])
            target = labels[i : i + EVAL_BATCH]
            loss_sum += float(F.cross_entropy(logits, target, reduction="sum"))
            correct += int((logits.argmax(1) == target).sum())
    return correct / n, loss_sum / n


def init_model(seed: int, model: str = "cnn") -> DigitCNN:
    """A freshly initialised ``model`` from ``torch.manual_seed(seed)`` (global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(model)


def train(
    cfg: FedConfig,
    train_split: MnistSplit,
    test_split: MnistSplit,
    progress: Callable[[int, RoundMetrics], None] | None = None,
    *,
    noise_seed: int | None = None,
    stop: Callable[[RoundMetrics], bool] | None = None,
) -> TrainResult:
    """Run ``cfg.rounds`` rounds of federated training; ``progress(round, metrics)`` per round.

    ``noise_seed`` makes the DP noise reproducible (tests only); by default it is seeded from
    ``os.urandom``. ``stop(metrics)`` returning True ends training after that round (early
    stopping, e.g. once a target accuracy is reached).
    """
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        return _train(cfg, train_split, test_split, progress, noise_seed, stop)
    finally:
        torch.use_deterministic_algorithms(previous)


def _train(
    cfg: FedConfig,
    train_split: MnistSplit,
    test_split: MnistSplit,
    progress: Callable[[int, RoundMetrics], None] | None,
    noise_seed: int | None,
    stop: Callable[[RoundMetrics], bool] | None,
) -> TrainResult:
    model = init_model(cfg.seed, cfg.model)
    params = [p.detach().clone() for p in model_tensors(model)]
    n_params = len(list(model.parameters()))
    x_train, y_train = to_tensor(train_split.images), _labels(train_split.labels)
    limit = len(test_split) if cfg.eval_limit is None else min(cfg.eval_limit, len(test_split))
    x_test, y_test = to_tensor(test_split.images[:limit]), _labels(test_split.labels[:limit])
    parts = parse_partition(cfg.partition)(np.asarray(train_split.labels), cfg.clients, cfg.seed)
    parts_t = [torch.from_numpy(p) for p in parts]
    sampler = np.random.default_rng(np.random.SeedSequence([cfg.seed, 0x5A4D]))
    server = make_server_optimizer(cfg)
    noise_gen = privacy.secure_generator(noise_seed) if cfg.dp_clip is not None else None
    history: list[RoundMetrics] = []
    for r in range(1, cfg.rounds + 1):
        t0 = time.perf_counter()
        chosen = np.sort(sampler.choice(cfg.clients, size=cfg.clients_per_round, replace=False))
        results = []
        for k in chosen:
            idx = parts_t[int(k)]
            results.append(
                client_update(
                    params,
                    x_train[idx],
                    y_train[idx],
                    cfg,
                    client_seed(cfg.seed, r, int(k)),
                    round_index=r,
                )
            )
        direction = combine(results, cfg, noise_gen)
        # the server optimizer moves the parameters; the running statistics take the plain
        # (weighted, or under DP clipped and noised) mean of the clients' statistics
        stepped = server.step(params[:n_params], direction[:n_params])
        stats = [w + d for w, d in zip(params[n_params:], direction[n_params:], strict=True)]
        stats = valid_statistics(state_names(model)[n_params:], stats)
        params = [p.to(torch.float32) for p in (*stepped, *stats)]
        _load(model, params)
        acc = loss = None
        if r % cfg.eval_every == 0 or r == cfg.rounds:
            acc, loss = evaluate(model, x_test, y_test)
        weights = sum(res.n_examples for res in results)
        train_loss = (
            sum(res.loss * res.n_examples for res in results if res.n_examples) / weights
            if weights
            else math.nan
        )
        eps = (
            privacy.epsilon(cfg.dp_noise, cfg.fraction, r, cfg.dp_delta)
            if cfg.dp_clip is not None
            else None
        )
        metrics = RoundMetrics(
            round=r,
            test_accuracy=acc,
            test_loss=loss,
            train_loss=float(train_loss),
            clients=len(results),
            epsilon=eps,
            seconds=time.perf_counter() - t0,
        )
        history.append(metrics)
        if progress is not None:
            progress(r, metrics)
        if stop is not None and stop(metrics):
            break
    return TrainResult(model=model, history=history)
