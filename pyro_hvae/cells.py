"""Convolutional cells: the deterministic blocks of a conv hierarchy.

Every cell maps ``[..., C, H, W]`` to ``[..., C', H', W']``: leading dimensions (data
points, and importance-sampling or ELBO particles in front of them) are flattened into
one batch for the convolutions and restored afterwards (:class:`ImageBlock`).

=============================  ==========================================================
cell                           from
=============================  ==========================================================
:class:`EncoderCell`           NVAE: ``x + s * SE(Conv3x3(Swish(BN(Conv3x3(Swish(BN(x)))))))``
:class:`DecoderCell`           NVAE: ``x + s * SE(BN(Conv1x1(Swish(BN(DWConv5x5(Swish(BN(Conv1x1_{E}(BN(x))))))))))``
:class:`BottleneckBlock`       Very Deep VAE: ``GELU -> 1x1 -> GELU -> 3x3 -> GELU -> 3x3 -> GELU -> 1x1``
:class:`SqueezeExcitation`     ``x * sigmoid(W_2 ReLU(W_1 mean_{H,W}(x)))``
:class:`PointwiseConv`         a 1x1 conv with depth-scaled initial weights
:class:`Downsample`            average pooling by an integer factor, then a 1x1 conv
:class:`Upsample`              nearest-neighbour upsampling by an integer factor, then a 1x1 conv
=============================  ==========================================================

**Scaling residual branches with depth.** A deep top-down path adds one residual
branch per latent group; if each branch had unit variance, the state's variance would
grow linearly with the number of groups. The residual cells therefore multiply their
branch by ``residual_scale`` (:class:`EncoderCell`, :class:`DecoderCell`; a hierarchy
passes ``1 / sqrt(number of cells on the path)``), and :class:`BottleneckBlock` scales
the initial weights of its output layer by ``output_scale`` (Very Deep VAE's
``sqrt(1 / depth)``), so a 30+ group model starts with a state of order one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: Channel reduction of :class:`SqueezeExcitation`'s bottleneck (its hidden width is
#: ``max(channels // SE_REDUCTION, SE_MIN_HIDDEN)``).
SE_REDUCTION = 16
SE_MIN_HIDDEN = 4
#: Channel expansion of :class:`DecoderCell`'s inverted bottleneck (MobileNetV2 / NVAE).
DECODER_EXPANSION = 6
#: Width ratio of :class:`BottleneckBlock`: its middle layers have ``in_channels // 4`` channels.
BOTTLENECK_RATIO = 4


def conv(in_channels: int, out_channels: int, kernel_size: int, *, groups: int = 1, bias: bool = True) -> nn.Conv2d:
    """A stride-1 convolution that keeps the spatial size (``padding = kernel_size // 2``)."""
    return nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, groups=groups, bias=bias)


class ImageBlock(nn.Module):
    """Base class: ``forward`` on ``[..., C, H, W]`` runs :meth:`block` on ``[B, C, H, W]``
    with ``B`` the product of the leading dimensions, and restores them."""

    def block(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        leading = x.shape[:-3]
        y = self.block(x.reshape(-1, *x.shape[-3:]))
        return y.reshape(*leading, *y.shape[-3:])


class SqueezeExcitation(nn.Module):
    """Channel gating from global context: ``x * sigmoid(W_2 ReLU(W_1 mean_{H,W}(x)))``
    on ``[B, C, H, W]`` (1x1 convolutions, so spectral norms see them as conv layers)."""

    def __init__(self, channels: int):
        super().__init__()
        hidden = max(channels // SE_REDUCTION, SE_MIN_HIDDEN)
        self.gate = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), conv(channels, hidden, 1), nn.ReLU(), conv(hidden, channels, 1), nn.Sigmoid()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)


class EncoderCell(ImageBlock):
    """NVAE's bottom-up residual cell: ``x + s * SE(Conv3x3(Swish(BN(Conv3x3(Swish(BN(x)))))))``."""

    def __init__(self, channels: int, *, residual_scale: float = 1.0):
        super().__init__()
        self.branch = nn.Sequential(
            nn.BatchNorm2d(channels),
            nn.SiLU(),
            conv(channels, channels, 3),
            nn.BatchNorm2d(channels),
            nn.SiLU(),
            conv(channels, channels, 3),
            SqueezeExcitation(channels),
        )
        self.residual_scale = residual_scale

    def block(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.residual_scale * self.branch(x)


class DecoderCell(ImageBlock):
    """NVAE's top-down residual cell, an inverted bottleneck with a large receptive field:
    1x1 expansion by ``DECODER_EXPANSION``, depthwise 5x5, 1x1 back, batch norms, Swish, SE.

    .. math:: x + s \\cdot \\mathrm{SE}(\\mathrm{BN}(W_{1\\times1}\\,
              \\mathrm{Swish}(\\mathrm{BN}(W_{5\\times5}^{dw}\\,
              \\mathrm{Swish}(\\mathrm{BN}(W_{1\\times1}^{E}\\,\\mathrm{BN}(x)))))))
    """

    def __init__(self, channels: int, *, residual_scale: float = 1.0):
        super().__init__()
        expanded = DECODER_EXPANSION * channels
        self.branch = nn.Sequential(
            nn.BatchNorm2d(channels),
            conv(channels, expanded, 1, bias=False),
            nn.BatchNorm2d(expanded),
            nn.SiLU(),
            conv(expanded, expanded, 5, groups=expanded, bias=False),
            nn.BatchNorm2d(expanded),
            nn.SiLU(),
            conv(expanded, channels, 1, bias=False),
            nn.BatchNorm2d(channels),
            SqueezeExcitation(channels),
        )
        self.residual_scale = residual_scale

    def block(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.residual_scale * self.branch(x)


class BottleneckBlock(ImageBlock):
    """Very Deep VAE's bottleneck block ``GELU -> 1x1 -> GELU -> 3x3 -> GELU -> 3x3 -> GELU -> 1x1``
    with ``in_channels // BOTTLENECK_RATIO`` middle channels; ``x + f(x)`` when ``residual``.

    ``output_scale`` multiplies the output layer's initial weights (``sqrt(1 / depth)`` in
    a residual stack of ``depth`` blocks); ``zero_output=True`` starts the output at exactly
    zero instead (a prior that starts at its default, a posterior that starts at its prior).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        residual: bool = False,
        output_scale: float = 1.0,
        zero_output: bool = False,
    ):
        super().__init__()
        if in_channels % BOTTLENECK_RATIO:
            raise ValueError(
                f"BottleneckBlock: in_channels={in_channels} is not divisible by {BOTTLENECK_RATIO}, "
                "the bottleneck ratio; use a multiple of 4"
            )
        if residual and in_channels != out_channels:
            raise ValueError(f"a residual BottleneckBlock needs in_channels == out_channels, got {in_channels} and {out_channels}")
        middle = in_channels // BOTTLENECK_RATIO
        output = conv(middle, out_channels, 1)
        with torch.no_grad():
            if zero_output:
                output.weight.zero_()
                output.bias.zero_()
            else:
                output.weight.mul_(output_scale)
        self.net = nn.Sequential(
            nn.GELU(),
            conv(in_channels, middle, 1),
            nn.GELU(),
            conv(middle, middle, 3),
            nn.GELU(),
            conv(middle, middle, 3),
            nn.GELU(),
            output,
        )
        self.residual = residual

    def block(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        return x + out if self.residual else out


class PointwiseConv(ImageBlock):
    """A 1x1 convolution ``[C, H, W] -> [C', H, W]`` whose initial weights are multiplied by
    ``output_scale`` (``sqrt(1 / depth)`` where its output is added to a residual state)."""

    def __init__(self, in_channels: int, out_channels: int, *, output_scale: float = 1.0):
        super().__init__()
        self.conv = conv(in_channels, out_channels, 1)
        with torch.no_grad():
            self.conv.weight.mul_(output_scale)

    def block(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Downsample(ImageBlock):
    """``[C, H, W] -> [C', H / f, W / f]``: average pooling by ``factor``, then a 1x1 conv."""

    def __init__(self, in_channels: int, out_channels: int, factor: int):
        super().__init__()
        self.pool = nn.AvgPool2d(factor) if factor > 1 else nn.Identity()
        self.project = conv(in_channels, out_channels, 1)

    def block(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(self.pool(x))


class Upsample(ImageBlock):
    """``[C, H, W] -> [C', f H, f W]``: nearest-neighbour upsampling by ``factor``, then a 1x1 conv."""

    def __init__(self, in_channels: int, out_channels: int, factor: int):
        super().__init__()
        self.factor = factor
        self.project = conv(in_channels, out_channels, 1)

    def block(self, x: torch.Tensor) -> torch.Tensor:
        if self.factor > 1:
            x = F.interpolate(x, scale_factor=self.factor, mode="nearest")
        return self.project(x)


def cat_channels(*tensors: torch.Tensor) -> torch.Tensor:
    """Concatenate ``[..., C_i, H, W]`` tensors along channels after broadcasting the
    leading dims: a state ``[P, B, C, H, W]`` and features ``[B, C', H, W]`` give
    ``[P, B, C + C', H, W]``."""
    leading = torch.broadcast_shapes(*(t.shape[:-3] for t in tensors))
    return torch.cat([t.expand(*leading, *t.shape[-3:]) for t in tensors], dim=-3)
