"""Inverse autoregressive flows on spatial latents ``[C, H, W]``.

Pyro's autoregressive transforms work on dense vectors; a convolutional hierarchy has
latent groups ``z [C, H, W]``. Here a flow is autoregressive over the *channels*: the
shift and log-scale of channel ``c`` come from a network that sees channels ``< c`` of
``z`` (at every position within its receptive field) and a context feature map from the
encoder, never channel ``c`` itself or later ones:

.. math::

    z'_c = \\mu_c(z_{<c}, h) + e^{s_c(z_{<c}, h)}\\, z_c, \\qquad
    \\log\\Big|\\det \\frac{\\partial z'}{\\partial z}\\Big| = \\sum_{c,h,w} s_{c,h,w}.

The Jacobian is triangular in the channel order, with a diagonal block per channel,
hence the log-determinant. The channel order is enforced by masked convolutions whose
masks follow MADE's degree rule, applied to channels instead of vector entries.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.distributions.conditional import ConditionalTransformModule
from torch import nn
from torch.distributions import Transform, constraints

from pyro_hvae.nn import bounded, check_positive_sizes

#: Bounds on a spatial flow's log-scale ``s``: each flow scales a value by [0.018, 7.4].
FLOW_LOG_SCALE_BOUNDS = (-4.0, 2.0)


class ChannelMaskedConv2d(nn.Conv2d):
    """A ``Conv2d`` whose output channel ``o`` sees input channel ``i`` only where
    ``mask[o, i]`` is true, at every kernel position: ``y = conv(x, W * mask)``."""

    def __init__(self, mask: torch.Tensor, kernel_size: int):
        out_channels, in_channels = mask.shape
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        self.register_buffer("mask", mask.to(self.weight.dtype)[:, :, None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.mask, self.bias, padding=self.padding)


class ChannelAutoregressiveNet(nn.Module):
    """``(z [..., C, H, W], h [..., C_h, H, W]) -> (mu, s_raw)``, each ``[..., C, H, W]``,
    where output channel ``c`` depends on ``z`` only through channels before ``c`` in
    ``order``.

    Degrees: input channel ``c`` has degree ``rank(c)``, its place in ``order``; hidden unit
    ``k`` has degree ``(k mod C) - 1`` (degree ``-1`` units see only the context). A hidden
    unit sees units of degree ``<=`` its own; output ``c`` sees hidden units of degree
    ``< rank(c)``. The output layer starts at zero.
    """

    def __init__(
        self,
        channels: int,
        context_channels: int,
        hidden_channels: Sequence[int],
        *,
        order: Sequence[int] | None = None,
        kernel_size: int = 3,
        activation: type[nn.Module] = nn.ELU,
    ):
        super().__init__()
        hidden_channels = check_positive_sizes("hidden_channels", hidden_channels)
        check_positive_sizes("channels", [channels])
        check_positive_sizes("context_channels", [context_channels])
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size!r}")
        order = list(range(channels)) if order is None else list(order)
        if sorted(order) != list(range(channels)):
            raise ValueError(f"order must be a permutation of range({channels}), got {order}")
        rank = torch.empty(channels, dtype=torch.long)
        rank[torch.tensor(order)] = torch.arange(channels)
        self.channels = channels
        self.order = order

        degrees = [rank]
        for width in hidden_channels:
            degrees.append(torch.arange(width) % channels - 1)
        self.hidden = nn.ModuleList(
            ChannelMaskedConv2d(d_out[:, None] >= d_in[None, :], kernel_size)
            for d_in, d_out in zip(degrees[:-1], degrees[1:])
        )
        self.context = nn.Conv2d(context_channels, hidden_channels[0], kernel_size, padding=kernel_size // 2)
        self.output = ChannelMaskedConv2d(rank.repeat(2)[:, None] > degrees[-1][None, :], kernel_size)
        nn.init.zeros_(self.output.weight)
        nn.init.zeros_(self.output.bias)
        self.activation = activation()

    def forward(self, z: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch = torch.broadcast_shapes(z.shape[:-3], context.shape[:-3])
        h = self.hidden[0](z.expand(batch + z.shape[-3:]).reshape((-1,) + z.shape[-3:]))
        h = self.activation(h + self.context(context.expand(batch + context.shape[-3:]).reshape((-1,) + context.shape[-3:])))
        for layer in self.hidden[1:]:
            h = self.activation(layer(h))
        loc, raw_log_scale = self.output(h).reshape(batch + (2 * self.channels,) + z.shape[-2:]).chunk(2, dim=-3)
        return loc, raw_log_scale


class SpatialAffineAutoregressive(Transform):
    """One spatial IAF step bound to a context: ``z' = mu + exp(s) * z`` (see the module
    docstring), ``s`` kept smoothly inside ``log_scale_bounds``. Its event is the whole
    latent group ``[C, H, W]`` (``event_dim = 3``); :meth:`log_abs_det_jacobian` sums over it.
    The inverse takes ``C`` passes of the network, one per channel.
    """

    domain = constraints.independent(constraints.real, 3)
    codomain = constraints.independent(constraints.real, 3)
    bijective = True

    def __init__(
        self,
        net: ChannelAutoregressiveNet,
        context: torch.Tensor,
        log_scale_bounds: tuple[float, float] = FLOW_LOG_SCALE_BOUNDS,
        cache_size: int = 1,
    ):
        super().__init__(cache_size=cache_size)
        self.net = net
        self.context = context
        self.log_scale_bounds = log_scale_bounds
        self._cached_input: torch.Tensor | None = None
        self._cached_log_scale: torch.Tensor | None = None

    def _params(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if z.shape[-2:] != self.context.shape[-2:]:
            raise ValueError(
                f"context: a spatial flow needs a context map of the latent's size {tuple(z.shape[-2:])}, "
                f"got {tuple(self.context.shape[-2:])}; resample the encoder features to that resolution"
            )
        loc, raw_log_scale = self.net(z, self.context)
        return loc, bounded(raw_log_scale, *self.log_scale_bounds)

    def _call(self, z: torch.Tensor) -> torch.Tensor:
        loc, log_scale = self._params(z)
        self._cached_input, self._cached_log_scale = z, log_scale
        return loc + log_scale.exp() * z

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        z = torch.zeros_like(y)
        for _ in range(self.net.channels):  # after pass k the first k channels in the order are exact
            loc, log_scale = self._params(z)
            z = (y - loc) * torch.exp(-log_scale)
        self._cached_input, self._cached_log_scale = z, log_scale
        return z

    def log_abs_det_jacobian(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        log_scale = self._cached_log_scale if z is self._cached_input else self._params(z)[1]
        return log_scale.sum((-3, -2, -1))


class ConditionalSpatialAffineAutoregressive(ConditionalTransformModule):
    """A learnable spatial IAF step: ``condition(context)`` gives the
    :class:`SpatialAffineAutoregressive` transform for that context map.

    It is the identity at initialisation (the network's output layer is zero, so
    ``mu = 0`` and ``s = bounded(0) = 0``). ``order`` is the channel order of the
    autoregression (``reversed(range(C))`` in every other step of a stack).
    """

    domain = constraints.independent(constraints.real, 3)
    codomain = constraints.independent(constraints.real, 3)
    bijective = True

    def __init__(
        self,
        channels: int,
        context_channels: int,
        hidden_channels: Sequence[int] = (),
        *,
        order: Sequence[int] | None = None,
        kernel_size: int = 3,
        log_scale_bounds: tuple[float, float] = FLOW_LOG_SCALE_BOUNDS,
    ):
        super().__init__()
        hidden = list(hidden_channels) or [4 * channels]
        self.net = ChannelAutoregressiveNet(channels, context_channels, hidden, order=order, kernel_size=kernel_size)
        self.log_scale_bounds = log_scale_bounds

    def condition(self, context: torch.Tensor) -> SpatialAffineAutoregressive:
        return SpatialAffineAutoregressive(self.net, context, self.log_scale_bounds)


class SpatialIAF(nn.Module):
    """``num_flows`` spatial IAF steps on a posterior sample ``z [..., C, H, W]``, the channel
    order reversed in every other step so that each channel can depend on all others.

    ``forward(base, context)`` returns ``TransformedDistribution(base, flows)``: ``base``
    must have event shape ``[C, H, W]`` (e.g. ``Normal(loc, scale).to_event(3)``), and
    ``log q(z_K) = log q(z_0) - sum_k log|det dz_k / dz_{k-1}|``. Like :class:`~pyro_hvae.IAF`,
    the flowed posterior has no closed-form KL: use a Monte Carlo KL (``Trace_ELBO``).
    """

    def __init__(
        self,
        channels: int,
        context_channels: int,
        num_flows: int,
        hidden_channels: Sequence[int] = (),
        *,
        kernel_size: int = 3,
        log_scale_bounds: tuple[float, float] = FLOW_LOG_SCALE_BOUNDS,
    ):
        super().__init__()
        if isinstance(num_flows, bool) or not isinstance(num_flows, int) or num_flows < 1:
            raise ValueError(f"num_flows must be a positive integer for a spatial IAF, got {num_flows!r}")
        natural = list(range(channels))
        self.flows = nn.ModuleList(
            ConditionalSpatialAffineAutoregressive(
                channels,
                context_channels,
                hidden_channels,
                order=natural if k % 2 == 0 else natural[::-1],
                kernel_size=kernel_size,
                log_scale_bounds=log_scale_bounds,
            )
            for k in range(num_flows)
        )

    def forward(self, base: dist.TorchDistribution, context: torch.Tensor) -> dist.TransformedDistribution:
        return dist.TransformedDistribution(base, [flow.condition(context) for flow in self.flows])
