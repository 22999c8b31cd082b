"""Plaintext reference models that the private (secret-shared) engine evaluates.

Both models use only layers the engine supports: conv2d, avgpool2d, relu, flatten and linear.
:func:`layer_list` gives the JSON-able layer description the engine consumes; parameter names
in ``state_dict()`` match the ``name`` fields of the weighted layers.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class DigitCNN(nn.Module):
    """conv(1->c1,5) -> avgpool2 -> relu -> conv(c1->c2,5) -> avgpool2 -> relu -> fc 16*c2-h-10.

    The default (c1 = c2 = 16, h = 100: 33k parameters) is the product's model; ``"cnn-wide"`` in
    :data:`MODELS` (32, 64, 100: 156k parameters) is the same shape with more channels, which the
    engine evaluates unchanged but at a higher cost (more ReLUs and multiplications).

    Pooling comes before ReLU so the (non-linear, expensive under MPC) ReLU runs on a quarter of
    the activations; average pooling is linear and therefore free on additive shares.
    """

    def __init__(self, conv1_channels: int = 16, conv2_channels: int = 16, hidden: int = 100):
        super().__init__()
        self.conv1 = nn.Conv2d(1, conv1_channels, kernel_size=5, stride=1, padding=0)
        self.conv2 = nn.Conv2d(conv1_channels, conv2_channels, kernel_size=5, stride=1, padding=0)
        self.fc1 = nn.Linear(16 * conv2_channels, hidden)
        self.fc2 = nn.Linear(hidden, 10)
        self.pool = nn.AvgPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.pool(self.conv1(x)))  # (N,c1,12,12)
        x = torch.relu(self.pool(self.conv2(x)))  # (N,c2,4,4)
        x = torch.flatten(x, 1)  # (N,16*c2)
        x = torch.relu(self.fc1(x))
        return self.fc2(x)

    def layers(self) -> list[dict[str, Any]]:
        return [
            _conv("conv1", self.conv1),
            {"type": "avgpool2d", "kernel_size": 2},
            {"type": "relu"},
            _conv("conv2", self.conv2),
            {"type": "avgpool2d", "kernel_size": 2},
            {"type": "relu"},
            {"type": "flatten"},
            _linear("fc1", self.fc1),
            {"type": "relu"},
            _linear("fc2", self.fc2),
        ]


class FCNet(nn.Module):
    """Fully connected 784-128-128-10 with ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(784, 128)
        self.fc2 = nn.Linear(128, 128)
        self.fc3 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        return self.fc3(x)

    def layers(self) -> list[dict[str, Any]]:
        return [
            {"type": "flatten"},
            _linear("fc1", self.fc1),
            {"type": "relu"},
            _linear("fc2", self.fc2),
            {"type": "relu"},
            _linear("fc3", self.fc3),
        ]


# MNIST's pixel mean and standard deviation (60,000 training images, pixels in [0, 1])
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


class EngineCNN(nn.Module):
    """Two conv blocks and two fc layers, in the engine's layer set, with training-side options.

    conv(1->c1,5,pad) -> block -> conv(c1->c2,5,pad) -> block -> flatten -> [dropout] ->
    fc(.->h) -> relu -> [dropout] -> fc(h->10), where ``block`` is one of

    * ``pool="avg", relu_first=False``: avgpool2 -> relu (:class:`DigitCNN`'s order);
    * ``pool="avg", relu_first=True``: relu -> avgpool2 (4x the ReLUs, more capacity);
    * ``pool="max"``: maxpool2 -> relu, which equals relu -> maxpool2 (ReLU is monotone), so
      the engine gets the cheaper order: a 2x2 max costs 3 comparisons per window.

    ``normalize`` trains on ``(x - MNIST_MEAN) / MNIST_STD``; :meth:`export_state` folds that
    affine map into conv1's weight and bias, so the exported model takes pixels in [0, 1] (exact
    because conv1 is unpadded: a padded border would see 0 instead of the mean).
    ``init="kaiming"`` draws the ReLU layers' weights from He's normal (fan-in) and zeroes
    biases; ``"torch"`` keeps PyTorch's default. Dropout is active in training only and is not
    part of the inference graph (:meth:`layers`).

    ``batchnorm`` adds batch normalisation after each average pooling, right before its ReLU
    (``bn1``, ``bn2``), and ``batchnorm_fc`` after fc1 (``bn3``). They exist in training only:
    :meth:`export_state` folds their inference form (running statistics) into conv1, conv2 and
    fc1, so :meth:`layers` and the exported weights are a plain network of the engine's layers.
    Federated averaging carries the running statistics with the weights
    (:func:`training.fedavg.state_names`).
    """

    def __init__(
        self,
        conv1_channels: int = 32,
        conv2_channels: int = 64,
        hidden: int = 512,
        *,
        pool: str = "max",
        relu_first: bool = False,
        padding: int = 0,
        normalize: bool = False,
        init: str = "kaiming",
        dropout: float = 0.0,
        batchnorm: bool = False,
        batchnorm_fc: bool = False,
    ):
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        if normalize and padding:
            raise ValueError("normalize needs an unpadded conv1 (the fold is exact only then)")
        if init not in ("kaiming", "torch"):
            raise ValueError(f"init must be 'kaiming' or 'torch', got {init!r}")
        if batchnorm and (pool != "avg" or relu_first):
            raise ValueError("batchnorm needs pool='avg' before the ReLU (the fold is exact then)")
        self.pool_kind, self.relu_first = pool, relu_first and pool == "avg"
        self.normalize, self.dropout = normalize, float(dropout)
        side = (28 + 2 * padding - 4) // 2
        side = (side + 2 * padding - 4) // 2
        self.conv1 = nn.Conv2d(1, conv1_channels, kernel_size=5, padding=padding)
        self.conv2 = nn.Conv2d(conv1_channels, conv2_channels, kernel_size=5, padding=padding)
        self.fc1 = nn.Linear(side * side * conv2_channels, hidden)
        self.fc2 = nn.Linear(hidden, 10)
        self.pool = nn.MaxPool2d(2) if pool == "max" else nn.AvgPool2d(2)
        self.bn1 = nn.BatchNorm2d(conv1_channels) if batchnorm else None
        self.bn2 = nn.BatchNorm2d(conv2_channels) if batchnorm else None
        self.bn3 = nn.BatchNorm1d(hidden) if batchnorm_fc else None
        if init == "kaiming":
            for layer in (self.conv1, self.conv2, self.fc1):
                nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
                nn.init.zeros_(layer.bias)

    def _block(self, x: torch.Tensor, bn: nn.Module | None) -> torch.Tensor:
        if self.relu_first:
            return self.pool(torch.relu(x))
        x = self.pool(x)
        return torch.relu(bn(x) if bn is not None else x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalize:
            x = (x - MNIST_MEAN) / MNIST_STD
        x = self._block(self.conv1(x), self.bn1)
        x = self._block(self.conv2(x), self.bn2)
        x = torch.flatten(x, 1)
        if self.dropout:
            x = F.dropout(x, self.dropout, self.training)
        x = self.fc1(x)
        x = torch.relu(self.bn3(x) if self.bn3 is not None else x)
        if self.dropout:
            x = F.dropout(x, self.dropout, self.training)
        return self.fc2(x)

    def layers(self) -> list[dict[str, Any]]:
        pool = {"type": f"{self.pool_kind}pool2d", "kernel_size": 2}
        block = [{"type": "relu"}, pool] if self.relu_first else [pool, {"type": "relu"}]
        return [
            _conv("conv1", self.conv1),
            *block,
            _conv("conv2", self.conv2),
            *[dict(b) for b in block],
            {"type": "flatten"},
            _linear("fc1", self.fc1),
            {"type": "relu"},
            _linear("fc2", self.fc2),
        ]

    def export_state(self) -> dict[str, torch.Tensor]:
        """The weights of the inference graph :meth:`layers` (input pixels in [0, 1]).

        Folds, in float64 and then rounded once to float32: the input normalisation into conv1
        (``w / std``, ``b - mean / std * sum(w)``) and each batch normalisation, in its inference
        form ``y = a x + c`` per channel with ``a = gamma / sqrt(var + eps)``,
        ``c = beta - a * mean``, into the layer before it (``a w``, ``a b + c``; exact through the
        average pooling between them, which is linear and per channel with weights summing to 1).
        """
        names = ("conv1", "conv2", "fc1", "fc2")
        state = {
            f"{n}.{p}": getattr(self, n).state_dict()[p].detach().double().clone()
            for n in names
            for p in ("weight", "bias")
        }
        if self.normalize:
            w, b = state["conv1.weight"], state["conv1.bias"]
            state["conv1.weight"] = w / MNIST_STD
            state["conv1.bias"] = b - (MNIST_MEAN / MNIST_STD) * w.sum(dim=(1, 2, 3))
        for layer, bn in (("conv1", self.bn1), ("conv2", self.bn2), ("fc1", self.bn3)):
            if bn is None:
                continue
            var, mean = bn.running_var.double(), bn.running_mean.double()
            a = bn.weight.detach().double() / torch.sqrt(var + bn.eps)
            c = bn.bias.detach().double() - a * mean
            w, b = state[f"{layer}.weight"], state[f"{layer}.bias"]
            state[f"{layer}.weight"] = w * a.view(-1, *([1] * (w.dim() - 1)))
            state[f"{layer}.bias"] = a * b + c
        return {k: v.to(torch.float32) for k, v in state.items()}


Model = DigitCNN | EngineCNN

# name -> constructor arguments; "engine": True builds an EngineCNN, otherwise a DigitCNN
MODELS: dict[str, dict[str, Any]] = {
    "cnn": {"conv1_channels": 16, "conv2_channels": 16, "hidden": 100},
    "cnn-wide": {"conv1_channels": 32, "conv2_channels": 64, "hidden": 100},
    # the training default: cnn's layer types and cost, batch norm folded away at export
    "cnn-bn": {
        "engine": True,
        "conv1_channels": 12,
        "conv2_channels": 32,
        "hidden": 128,
        "pool": "avg",
        "batchnorm": True,
        "batchnorm_fc": True,
    },
    "cnn-max": {
        "engine": True,
        "conv1_channels": 32,
        "conv2_channels": 64,
        "hidden": 512,
        "pool": "max",
        "dropout": 0.25,
    },
    "cnn-max-small": {
        "engine": True,
        "conv1_channels": 16,
        "conv2_channels": 32,
        "hidden": 256,
        "pool": "max",
        "dropout": 0.25,
    },
}
MODEL_HELP: dict[str, str] = {
    "cnn": "conv 16/16, avgpool before ReLU, fc 100, 33k parameters, 2,660 ReLUs per image "
    "(the product default)",
    "cnn-wide": "conv 32/64, avgpool before ReLU, fc 100, 156k parameters, 5,732 ReLUs",
    "cnn-max": "conv 32/64, maxpool, fc 512, He init, dropout 0.25 in training only, 582k "
    "parameters, 6,144 ReLUs + 16,896 max comparisons per image (about 8.7x cnn)",
    "cnn-bn": "conv 12/32, avgpool before ReLU, fc 128, batch normalisation before each ReLU "
    "in training (folded into conv/fc at export: the engine sees cnn's layer types), He init, "
    "2,368 ReLUs per image, 0.89x cnn (the training default)",
    "cnn-max-small": "cnn-max at half width (conv 16/32, fc 256), 147k parameters, 3,072 ReLUs + "
    "8,448 max comparisons (about 4.3x cnn)",
}


def build_model(name: str = "cnn") -> Model:
    """The federated-training model called ``name`` in :data:`MODELS` (uses the global RNG)."""
    if name not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)}, got {name!r}")
    spec = dict(MODELS[name])
    if spec.pop("engine", False):
        return EngineCNN(**spec)
    return DigitCNN(**spec)


def export_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights to export for ``model`` (folded where training used extra input maps)."""
    fold = getattr(model, "export_state", None)
    if fold is not None:
        return fold()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _conv(name: str, conv: nn.Conv2d) -> dict[str, Any]:
    stride, padding = conv.stride, conv.padding
    return {
        "type": "conv2d",
        "name": name,
        "in_channels": conv.in_channels,
        "out_channels": conv.out_channels,
        "kernel_size": int(conv.kernel_size[0]),
        "stride": int(stride[0]),
        "padding": int(padding[0]) if isinstance(padding, tuple) else 0,
    }


def _linear(name: str, linear: nn.Linear) -> dict[str, Any]:
    return {
        "type": "linear",
        "name": name,
        "in_features": linear.in_features,
        "out_features": linear.out_features,
    }


def layer_list(model: DigitCNN | EngineCNN | FCNet) -> list[dict[str, Any]]:
    """JSON-able, ordered description of ``model``'s layers for the private engine."""
    if not isinstance(model, DigitCNN | EngineCNN | FCNet):
        raise TypeError(f"unsupported model type {type(model).__name__}")
    return model.layers()


def inference_cost(
    layers: list[dict[str, Any]], input_shape: tuple[int, ...] = (1, 28, 28)
) -> dict[str, int]:
    """Per-image cost of a layer list under the private engine.

    ``relus``: elements passed through ReLU; ``max_comparisons``: pairwise maxima inside max
    pooling (``k*k - 1`` per output, each one secure comparison like a ReLU); ``comparisons``:
    their sum, the engine's dominant cost; ``macs``: multiply-adds of the linear layers.
    """
    shape = tuple(input_shape)
    relus = maxes = macs = 0
    for layer in layers:
        kind = layer["type"]
        if kind == "conv2d":
            c, h, w = shape
            k, s, p = layer["kernel_size"], layer.get("stride", 1), layer.get("padding", 0)
            ho, wo = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
            shape = (layer["out_channels"], ho, wo)
            macs += layer["out_channels"] * ho * wo * c * k * k
        elif kind == "linear":
            macs += layer["in_features"] * layer["out_features"]
            shape = (layer["out_features"],)
        elif kind in ("avgpool2d", "maxpool2d"):
            k = layer["kernel_size"]
            c, h, w = shape
            shape = (c, h // k, w // k)
            if kind == "maxpool2d":
                maxes += (k * k - 1) * c * (h // k) * (w // k)
        elif kind == "relu":
            relus += math.prod(shape)
        elif kind == "flatten":
            shape = (math.prod(shape),)
        else:
            raise ValueError(f"unknown layer type {kind!r}")
    return {"relus": relus, "max_comparisons": maxes, "comparisons": relus + maxes, "macs": macs}
