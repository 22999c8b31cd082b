"""Plaintext reference models that the private (secret-shared) engine evaluates.

Both models use only layers the engine supports: conv2d, avgpool2d, relu, flatten and linear.
:func:`layer_list` gives the JSON-able layer description the engine consumes; parameter names
in ``state_dict()`` match the ``name`` fields of the weighted layers.
"""

from __future__ import annotations

from typing import Any

import torch
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


MODELS: dict[str, dict[str, int]] = {
    "cnn": {"conv1_channels": 16, "conv2_channels": 16, "hidden": 100},
    "cnn-wide": {"conv1_channels": 32, "conv2_channels": 64, "hidden": 100},
}


def build_model(name: str = "cnn") -> DigitCNN:
    """The federated-training model called ``name`` in :data:`MODELS` (uses the global RNG)."""
    if name not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)}, got {name!r}")
    return DigitCNN(**MODELS[name])


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


def layer_list(model: DigitCNN | FCNet) -> list[dict[str, Any]]:
    """JSON-able, ordered description of ``model``'s layers for the private engine."""
    if not isinstance(model, DigitCNN | FCNet):
        raise TypeError(f"unsupported model type {type(model).__name__}")
    return model.layers()
