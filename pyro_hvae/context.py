"""Context encoders: what a conditional hierarchy's prior is conditioned on.

A conditional hierarchy models ``p(x, z | c)`` for a context ``c``: the observed border of
an image, or a class label. A :class:`ContextEncoder` turns the context into
:class:`ContextFeatures`:

* ``vector``: a feature vector ``h_c`` ``[N, feature_dim]`` that feeds the top prior
  ``p(z_L | c)``, every conditional prior ``p(z_l | z_{l+1}, c)`` and every posterior head;
* ``maps``: feature maps of the context, finest first, at the image's resolution and at
  each halving of it (:class:`BorderEncoder`); a decoder concatenates each map to its state
  at equal resolution (:class:`~pyro_hvae.models.conditional.SkipDecoder`), so that the
  pixels it fills see the border pixels beside them. A context without spatial layout (a
  label) has none.

=========================  =========================================  =======================
encoder                    context                                    features
=========================  =========================================  =======================
:class:`BorderEncoder`     images ``[N, *data_shape]``; only the      vector and maps
                           pixels of its ``mask`` are read
:class:`LabelEncoder`      class indices ``[N]`` (integers)           vector
=========================  =========================================  =======================
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from pyro_hvae.nn import ACTIVATIONS, check_positive_sizes

__all__ = ["BorderEncoder", "ContextEncoder", "ContextFeatures", "LabelEncoder"]


@dataclass(frozen=True)
class ContextFeatures:
    """What a :class:`ContextEncoder` gives: ``vector`` ``[N, D]`` and ``maps``, finest first,
    each ``[N, C_s, H / 2^s, W / 2^s]`` (none for a context without spatial layout)."""

    vector: torch.Tensor
    maps: tuple[torch.Tensor, ...] = ()


class ContextEncoder(nn.Module):
    """Base class: ``encoder(context) -> ContextFeatures`` for a batch of contexts.

    Subclasses set ``feature_dim`` (the size of ``vector``) and ``map_channels`` (the
    channels of each map, finest first; empty for none) and implement :meth:`encode`.
    ``from_data = True`` says that the context is read from the data itself (a border is
    part of the image), so that a model given ``x`` and no context conditions on ``x``.
    """

    feature_dim: int
    map_channels: tuple[int, ...] = ()
    from_data: bool = False

    @property
    def known(self) -> torch.Tensor | None:
        """A boolean mask of one data point's shape, True at the values the context fixes
        (the observed border), which a model then takes from the context rather than
        explaining them; None when the context fixes no value of the data."""
        return None

    def encode(self, context: torch.Tensor) -> ContextFeatures:
        raise NotImplementedError

    def check_context(self, context: torch.Tensor) -> None:
        """Raise ``ValueError`` saying what was expected when ``context`` is not a batch of contexts."""

    def forward(self, context: torch.Tensor) -> ContextFeatures:
        self.check_context(context)
        return self.encode(context)


class BorderEncoder(ContextEncoder):
    """The observed border of images, as features at every resolution.

    The context is an image batch ``[N, C, H, W]`` of which only the pixels where ``mask``
    is True (the observed border) are read: the others are set to 0 and the mask is added
    as a channel, so that a hidden pixel and an observed 0 differ. Then, finest first,

    .. math:: m_0 = \\phi(\\mathrm{Conv}_{3\\times3}([x \\odot b, b])), \\qquad
              m_s = \\phi(\\mathrm{Conv}_{3\\times3, \\text{stride } 2}(m_{s-1})), \\qquad
              h_c = \\phi(W \\operatorname{flatten}(m_{S-1}))

    with ``b`` the mask and ``phi`` the activation: maps at ``H x W``, ``H/2 x W/2``, ...
    (one per entry of ``channels``) and the vector ``h_c`` of size ``feature_dim``.

    :param data_shape: ``(C, H, W)`` of an image; ``H`` and ``W`` must be divisible by
        ``2^(len(channels) - 1)``.
    :param mask: boolean ``(C, H, W)`` (or ``(H, W)``), True where a pixel is observed.
    :param channels: channels of the maps, finest first.
    :param feature_dim: size of ``h_c``.
    """

    from_data = True

    def __init__(
        self,
        data_shape: Sequence[int],
        mask: torch.Tensor,
        channels: Sequence[int] = (16, 32, 32),
        feature_dim: int = 256,
        *,
        activation: str = "elu",
    ):
        super().__init__()
        data_shape = tuple(check_positive_sizes("data_shape", data_shape))
        channels = check_positive_sizes("context_channels", channels)
        check_positive_sizes("feature_dim", [feature_dim])
        if len(data_shape) != 3:
            raise ValueError(f"data_shape must be (channels, height, width) of an image, got {data_shape}")
        num_channels, height, width = data_shape
        halvings = 2 ** (len(channels) - 1)
        if height % halvings or width % halvings:
            raise ValueError(
                f"context_channels: {len(channels)} maps halve the image {len(channels) - 1} times, which needs "
                f"height and width divisible by {halvings}, got {height}x{width}; give fewer entries"
            )
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise ValueError("mask must be a boolean tensor, True where a pixel is observed")
        if tuple(mask.shape) not in (data_shape, data_shape[1:]):
            raise ValueError(f"mask: expected shape {list(data_shape)} or {list(data_shape[1:])}, got {list(mask.shape)}")
        mask = mask.expand(data_shape)
        if mask.all() or not mask.any():
            raise ValueError("mask must observe some pixels (the border) and hide others (the region to fill)")
        self.register_buffer("mask", mask.clone())
        self.data_shape = data_shape
        act = ACTIVATIONS[activation]
        layers, below = [], num_channels + 1
        for s, c in enumerate(channels):
            stride = 1 if s == 0 else 2
            layers.append(nn.Sequential(nn.Conv2d(below, c, 3, stride=stride, padding=1), act()))
            below = c
        self.down = nn.ModuleList(layers)
        coarse = (height // halvings) * (width // halvings)
        self.to_vector = nn.Sequential(nn.Linear(channels[-1] * coarse, feature_dim), act())
        self.feature_dim = feature_dim
        self.map_channels = tuple(channels)

    @property
    def known(self) -> torch.Tensor:
        """The border: ``mask``."""
        return self.mask

    def border(self, images: torch.Tensor) -> torch.Tensor:
        """``[x * b, b]``: the observed pixels, the hidden ones set to 0, and the mask as a channel."""
        mask = self.mask.to(images.dtype).expand(images.shape)
        return torch.cat([images * mask, mask[:, :1]], dim=1)

    def check_context(self, context: torch.Tensor) -> None:
        if not isinstance(context, torch.Tensor) or tuple(context.shape[1:]) != self.data_shape:
            got = list(context.shape) if isinstance(context, torch.Tensor) else type(context).__name__
            raise ValueError(
                f"context: expected images [N, {', '.join(map(str, self.data_shape))}] whose observed pixels are "
                f"the border, got {got}"
            )

    def encode(self, context: torch.Tensor) -> ContextFeatures:
        m = self.border(context)
        maps = []
        for layer in self.down:
            m = layer(m)
            maps.append(m)
        return ContextFeatures(self.to_vector(m.flatten(1)), tuple(maps))


class LabelEncoder(ContextEncoder):
    """A class label as a learned vector: ``h_c = E[y]``, one row of an embedding per class.

    :param num_classes: number of classes; labels are integers ``0 .. num_classes - 1``.
    :param feature_dim: size of ``h_c``.
    """

    def __init__(self, num_classes: int, feature_dim: int = 32):
        super().__init__()
        check_positive_sizes("num_classes", [num_classes])
        check_positive_sizes("feature_dim", [feature_dim])
        self.embedding = nn.Embedding(num_classes, feature_dim)
        self.num_classes = num_classes
        self.feature_dim = feature_dim

    def check_context(self, context: torch.Tensor) -> None:
        if not isinstance(context, torch.Tensor) or context.dim() != 1 or context.dtype.is_floating_point:
            got = f"{context.dtype} tensor of shape {list(context.shape)}" if isinstance(context, torch.Tensor) else type(context).__name__
            raise ValueError(f"context: expected class labels as an integer tensor [N], got a {got}")
        if len(context) and (int(context.min()) < 0 or int(context.max()) >= self.num_classes):
            raise ValueError(f"context: labels must lie in 0..{self.num_classes - 1}, got {int(context.min())}..{int(context.max())}")

    def encode(self, context: torch.Tensor) -> ContextFeatures:
        return ContextFeatures(self.embedding(context))
