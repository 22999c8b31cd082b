"""The private model runner: a network from a manifest's layer list, run on shares.

Layers (JSON dicts, as `training.model.layer_list` writes them):
  conv2d{name, in_channels, out_channels, kernel_size, stride, padding} | linear{name,
  in_features, out_features} | avgpool2d{kernel_size} | maxpool2d{kernel_size} | relu | flatten.
Weights are shares of `{name}.weight` and `{name}.bias` at f fractional bits.

Scale bookkeeping: a linear layer's product carries 2f fractional bits; average pooling is a
local sum whose 1/k^2 joins the pending rescale (k^2 must be a power of two). A convolution
directly followed by average pooling runs as one bilinear op (`conv2d_pool`), so its Beaver
product c, the dealer material, is already pooled: k^2 times smaller. The rescale is
done once, in the next ReLU, which compares on the unscaled value and truncates in the same
round (see `comparison.relu`). For a label, argmax runs on the unscaled logits (it is
scale-invariant), so the last layer needs no truncation at all.

Comparisons (ReLU, max pooling, argmax) use one registered protocol (`protocols`), chosen
per deployment; a composite one picks per layer by its number of comparisons per image
(`protocols.BySize`). Rounds and bytes per protocol: `python -m service protocols`.
A selecting ReLU (a2b, lut) followed by a small linear layer (at most FUSE_MAX_WEIGHTS weights,
fixed weight masks) applies that layer in its select's round (`beaver.select_linear`): one round
less.
What each party sees: only openings masked by fresh dealer randomness (see each protocol).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Literal

import torch

from service.mpc import beaver, protocols, truncation
from service.mpc.channel import NullChannel
from service.mpc.dealer import PlanRecorder, Request
from service.mpc.party import Party
from service.mpc.ring import DEFAULT_FP, FixedPoint
from service.mpc.sharing import open_label

Output = Literal["label", "logits"]
FUSE_MAX_WEIGHTS = 4096  # linear layers up to this size run in a ReLU's select round
LAYER_TYPES = {"conv2d", "linear", "avgpool2d", "maxpool2d", "relu", "flatten"}


class ModelSpecError(ValueError):
    """The layer list or the weights do not describe a network this engine can run."""


@dataclass(frozen=True)
class PrivateNetwork:
    """A network the two parties run on shares; holds only public structure."""

    layers: tuple[dict, ...]
    input_shape: tuple[int, ...]  # one example, e.g. (1, 28, 28)
    fp: FixedPoint = DEFAULT_FP
    comparison: str = protocols.DEFAULT
    _plans: dict = field(default_factory=dict, init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.comparison not in protocols.REGISTRY:
            raise ModelSpecError(
                f"comparison must be one of {protocols.NAMES}, got {self.comparison!r}"
            )
        for i, layer in enumerate(self.layers):
            kind = layer.get("type")
            if kind not in LAYER_TYPES:
                raise ModelSpecError(f"layer {i}: unknown type {kind!r}; known: {LAYER_TYPES}")
            if kind in ("avgpool2d", "maxpool2d") and int(layer["kernel_size"]) < 1:
                raise ModelSpecError(f"layer {i}: kernel_size must be positive")
            if kind == "avgpool2d":
                area = int(layer["kernel_size"]) ** 2
                if area & (area - 1):
                    raise ModelSpecError(f"layer {i}: avgpool area {area} is not a power of two")

    def _cmp(self, per_image: int) -> protocols.Comparison:
        """The protocol that runs a layer of `per_image` comparisons per image."""
        return protocols.get(self.comparison).for_layer(per_image)

    def label_sharing(self, classes: int) -> str:
        """How the label comes out for `classes` classes: "zero" (a zero test in Z_p) or "xor"
        (XOR shares of a one-hot vector)."""
        return protocols.label_sharing(protocols.get(self.comparison), classes)

    def open_label(self, out0: torch.Tensor, out1: torch.Tensor) -> torch.Tensor:
        """The labels from both parties' label outputs (in-process runs: tests, benchmarks)."""
        return open_label(out0, out1, self.label_sharing(out0.shape[-1]))

    def weight_names(self) -> list[str]:
        return [
            f"{ly['name']}.{p}"
            for ly in self.layers
            if ly["type"] in ("conv2d", "linear")
            for p in ("weight", "bias")
        ]

    def forward(
        self,
        party: Party,
        x: torch.Tensor,
        weights: dict[str, torch.Tensor],
        output: Output,
        masks: beaver.WeightMasks | None = None,
    ) -> torch.Tensor:
        """This party's share of the label (`label_sharing`) or logits (additive, scale f).

        `masks`: the model's fixed weight masks (`beaver.linear`); None masks weights per query.
        """
        if tuple(x.shape[1:]) != self.input_shape:
            raise ModelSpecError(f"input shape {tuple(x.shape[1:])} != {self.input_shape}")
        f = self.fp.frac_bits
        pending = 0  # fractional bits above f that the next rescale must remove
        done = -1  # layers up to this index already ran, fused into an earlier one
        for i, layer in enumerate(self.layers):
            kind = layer["type"]
            if i <= done:
                continue
            if kind in ("conv2d", "linear"):
                if pending:
                    x, pending = truncation.truncate(party, x, pending), 0
                name = f"{layer['name']}.weight"
                w, b = weights[name], weights[f"{layer['name']}.bias"]
                if kind == "conv2d":
                    params = (int(layer.get("stride", 1)), int(layer.get("padding", 0)))
                    k = self._pool_after(i, x, w, params)
                    if k:  # sum-pool(conv(x, W) + b) = conv2d_pool(x, W) + k^2 b
                        x = beaver.linear(party, x, w, name, masks, "conv2d_pool", (*params, k))
                        x = x + ((b << f) * (k * k)).view(1, -1, 1, 1)
                        pending, done = f + int(math.log2(k * k)), i + 1
                        continue
                    x = beaver.linear(party, x, w, name, masks, "conv2d", params)
                    x = x + (b << f).view(1, -1, 1, 1)
                else:
                    x = beaver.linear(party, x, w.t(), name, masks) + (b << f)
                pending = f
            elif kind == "avgpool2d":
                k = int(layer["kernel_size"])
                n, c, h, wd = x.shape
                if h % k or wd % k:
                    raise ModelSpecError(f"avgpool {k} needs sides divisible by it, got {h}x{wd}")
                x = x.reshape(n, c, h // k, k, wd // k, k).sum(dim=(3, 5))
                pending += int(math.log2(k * k))
            elif kind == "maxpool2d":
                x = self._cmp(x[0].numel()).max_pool2d(party, x, int(layer["kernel_size"]))
            elif kind == "relu":
                cmp, nxt = self._cmp(x[0].numel()), self._linear_after(i, masks)
                if cmp.selects and nxt is not None:  # the ReLU and the layer at once
                    name = self.layers[nxt]["name"]
                    w, b = weights[f"{name}.weight"], weights[f"{name}.bias"]
                    fuse = partial(
                        beaver.select_linear, w=w.t(), name=f"{name}.weight", masks=masks
                    )
                    x = cmp.relu(party, x, pending, select=fuse) + (b << f)
                    pending, done = f, nxt
                    continue
                x, pending = cmp.relu(party, x, pending), 0
            elif kind == "flatten":
                x = x.reshape(x.shape[0], -1)
        if output == "label":
            n = x.shape[-1]
            return self._cmp(n * (n - 1) // 2).argmax(party, x)
        if output == "logits":
            return truncation.truncate(party, x, pending) if pending else x
        raise ValueError(f"output must be 'label' or 'logits', got {output!r}")

    def _linear_after(self, i: int, masks: beaver.WeightMasks | None) -> int | None:
        """The index of a linear layer right after layer i (flattens between are free) that a
        selecting ReLU at i can apply in its select round, else None."""
        if masks is None:
            return None
        j = i + 1
        while j < len(self.layers) and self.layers[j]["type"] == "flatten":
            j += 1
        if j == len(self.layers) or self.layers[j]["type"] != "linear":
            return None
        layer = self.layers[j]
        size = int(layer["in_features"]) * int(layer["out_features"])
        return j if size <= FUSE_MAX_WEIGHTS else None

    def _pool_after(self, i: int, x: torch.Tensor, w: torch.Tensor, params: tuple[int, int]) -> int:
        """The kernel of an average pooling right after conv layer i that can fuse with it
        (the conv output's sides divide by it), else 0."""
        if i + 1 >= len(self.layers) or self.layers[i + 1]["type"] != "avgpool2d":
            return 0
        k = int(self.layers[i + 1]["kernel_size"])
        stride, padding = params
        sides = [(x.shape[d] + 2 * padding - w.shape[d]) // stride + 1 for d in (-2, -1)]
        return k if all(s % k == 0 for s in sides) else 0

    def plan(
        self,
        batch: int,
        output: Output,
        weight_shapes: dict[str, Sequence[int]],
        mask_id: str | None = None,
    ) -> tuple[Request, ...]:
        """The dealer randomness one forward pass asks for, in order (a dry run on zeros).

        Public: it depends only on the architecture, the batch size, the output kind and the
        model's weight-mask id (None: weights masked per query).
        """
        shapes = tuple(sorted((k, tuple(s)) for k, s in weight_shapes.items()))
        key = (batch, output, shapes, mask_id)
        if key in self._plans:
            return self._plans[key]
        recorder = PlanRecorder()
        party = Party(0, NullChannel(), recorder, self.fp)  # type: ignore[arg-type]
        x = torch.zeros((batch, *self.input_shape), dtype=torch.int64)
        w = {k: torch.zeros(tuple(s), dtype=torch.int64) for k, s in weight_shapes.items()}
        masks = beaver.WeightMasks(mask_id) if mask_id is not None else None
        self.forward(party, x, w, output, masks)
        self._plans[key] = tuple(recorder.plan)
        return self._plans[key]
