"""Deterministic building blocks: the networks inside a hierarchy.

Every block accepts inputs with any number of leading batch dimensions, so the
same network serves a plain batch ``[B, D]`` and a batch of vectorized
particles ``[P, B, D]`` (``num_particles`` with ``vectorize_particles=True``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "elu": nn.ELU,
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "silu": nn.SiLU,
}


def check_positive_sizes(name: str, sizes: Sequence[int], allow_empty: bool = False) -> list[int]:
    """Return ``sizes`` as a list of ints, or raise ``ValueError`` naming ``name``."""
    sizes = list(sizes)
    if not sizes and not allow_empty:
        raise ValueError(f"{name} must be a non-empty list of positive integers, got []")
    for size in sizes:
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise ValueError(f"{name} must contain positive integers only, got {sizes}")
    return sizes


class BatchNorm(nn.BatchNorm1d):
    """Batch norm over the feature (last) dimension, for inputs ``[..., D]``.

    All leading dimensions (particles and data points) are pooled into one batch.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.reshape(-1, x.shape[-1])).reshape(x.shape)


class SyncBatchNorm(nn.SyncBatchNorm):
    """:class:`BatchNorm` whose statistics are those of the batch of every process
    (:class:`torch.nn.SyncBatchNorm`), for inputs ``[..., D]`` as there."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.reshape(-1, x.shape[-1])).reshape(x.shape)


class FeatureNet(nn.Sequential):
    """Hidden layers only: ``Linear -> [BatchNorm] -> activation`` for each width.

    Its output (width ``widths[-1]``) is a feature vector, e.g. a bottom-up ``r_l``.
    """

    def __init__(
        self,
        in_features: int,
        widths: Sequence[int],
        *,
        activation: str | type[nn.Module] = "elu",
        batch_norm: bool = False,
    ):
        widths = check_positive_sizes("hidden_dims", widths, allow_empty=True)
        check_positive_sizes("in_features", [in_features])
        act = ACTIVATIONS[activation] if isinstance(activation, str) else activation
        layers: list[nn.Module] = []
        width = in_features
        for hidden in widths:
            layers.append(nn.Linear(width, hidden))
            if batch_norm:
                layers.append(BatchNorm(hidden))
            layers.append(act())
            width = hidden
        super().__init__(*layers)
        self.in_features = in_features
        self.out_features = width


class MLP(nn.Sequential):
    """A multilayer perceptron: a :class:`FeatureNet` over ``hidden_dims``, then a linear output.

    ``zero_init_output=True`` starts the output at exactly zero, which makes a
    residual posterior start equal to its prior (``dmu = 0``, ``dsigma = 1``).
    """

    def __init__(
        self,
        in_features: int,
        hidden_dims: Sequence[int],
        out_features: int,
        *,
        activation: str | type[nn.Module] = "elu",
        batch_norm: bool = False,
        zero_init_output: bool = False,
    ):
        check_positive_sizes("out_features", [out_features])
        features = FeatureNet(in_features, hidden_dims, activation=activation, batch_norm=batch_norm)
        output = nn.Linear(features.out_features, out_features)
        if zero_init_output:
            nn.init.zeros_(output.weight)
            nn.init.zeros_(output.bias)
        super().__init__(features, output)
        self.in_features = in_features
        self.out_features = out_features


def cat_features(*tensors: torch.Tensor) -> torch.Tensor:
    """Concatenate along the last dimension after broadcasting the leading ones.

    A bottom-up feature ``[B, H]`` and a latent sample ``[P, B, D]`` give ``[P, B, H + D]``.
    """
    if len(tensors) == 1:
        return tensors[0]
    batch = torch.broadcast_shapes(*(t.shape[:-1] for t in tensors))
    return torch.cat([t.expand(batch + t.shape[-1:]) for t in tensors], dim=-1)


def bounded(raw: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Map an unconstrained tensor smoothly into ``(low, high)`` with ``bounded(0) = 0``.

    .. math:: b(r) = low + (high - low)\\,\\sigma\\big(r + \\operatorname{logit}(-low / (high - low))\\big)

    Used for log-scales: unlike a hard clamp, gradients never vanish at the bounds.
    Requires ``low < 0 < high``.
    """
    span = high - low
    offset = math.log(-low / high)
    return low + span * torch.sigmoid(raw + offset)
