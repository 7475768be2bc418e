"""One spatial latent group ``z_l`` with a ``[C, H, W]`` event: its prior from the
top-down state, its residual-normal posterior, and the KL between them.

In a conv hierarchy (:class:`~pyro_hvae.models.conv_ladder.ConvLadderVAE`) group ``l``
sees a deterministic top-down state ``h_l`` that accumulates every group above it:

.. math::

    p(z_l \\mid z_{>l}) = \\mathcal{N}(\\mu_p(h_l), \\sigma_p(h_l)), \\qquad
    q(z_l \\mid z_{>l}, x) = \\mathcal{N}(\\mu_p + \\Delta\\mu(h_l, r),\\; \\sigma_p \\cdot \\Delta\\sigma(h_l, r))

with ``r`` the encoder features at the group's resolution.

**Stabilizers (NVAE).** Raw network outputs pass through the soft clamp
``b(x) = SOFT_BOUND * tanh(x / SOFT_BOUND)`` (identity near 0, bounded by ``+-5``):

=========================  =========================================================
quantity                   parametrization
=========================  =========================================================
prior mean                 ``mu_p = b(raw)``, so ``|mu_p| < 5``
prior scale                ``sigma_p = SCALE_FLOOR + exp(b(raw))``, in ``(0.0167, 148.4)``
posterior mean shift       ``dmu = b(raw)``, so ``|dmu| < 5``
posterior scale ratio      ``dsigma = exp(b(raw))``, in ``(0.0067, 148.4)``
=========================  =========================================================

so every posterior scale is at least ``(SCALE_FLOOR + exp(-5)) * exp(-5) ~ 1.1e-4`` and the KL per
dimension is at most ``0.5 * (25 / 0.0167^2 + 148.4^2 + 10)``: a single group cannot
produce an infinite or NaN loss.

**The KL in residual form.** Because ``q`` is defined relative to ``p``,

.. math::

    \\mathrm{KL}(q \\,\\|\\, p) = \\tfrac12 \\sum_{c,h,w}\\Big(\\frac{\\Delta\\mu^2}{\\sigma_p^2}
        + \\Delta\\sigma^2 - \\log\\Delta\\sigma^2 - 1\\Big),

computed from ``dmu`` and ``log dsigma`` directly: no ratio ``sigma_q / sigma_p`` of two
rounded numbers, no difference ``mu_q - mu_p`` of two large ones, and ``expm1`` for
``dsigma^2 - 1``. The posterior is a
:class:`ResidualNormalDistribution` (a ``Normal`` that remembers its prior), and
``kl_divergence(q, p)`` is registered to use this form whenever ``p`` is that prior, so
``TraceMeanField_ELBO`` and :class:`~pyro_hvae.infer.elbo.HierarchicalELBO` both get it;
against any other normal it is the usual closed form.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch import nn
from torch.distributions import Normal, register_kl

from pyro_hvae.cells import BottleneckBlock, cat_channels

#: Soft bound of every raw mean and log-scale: ``b(x) = 5 tanh(x / 5)`` (NVAE).
SOFT_BOUND = 5.0
#: Added to every prior scale: ``sigma_p >= SCALE_FLOOR``.
SCALE_FLOOR = 1e-2


def soft_clamp(x: torch.Tensor, bound: float = SOFT_BOUND) -> torch.Tensor:
    """``bound * tanh(x / bound)``: the identity near zero, smoothly bounded by ``+-bound``,
    with gradients everywhere (a hard clamp would stop them at the bounds)."""
    return bound * torch.tanh(x / bound)


class ResidualNormalDistribution(dist.Normal):
    """Elementwise ``N(mu_p + dmu, sigma_p * exp(log dsigma))`` around a normal ``prior``.

    It is a ``Normal`` in every respect (sampling, ``log_prob``, ``rsample``); it also keeps
    ``prior``, ``delta_loc`` and ``delta_log_scale`` so that ``kl_divergence(self, prior)``
    is computed in the residual form (see the module docstring).
    """

    def __init__(self, prior: Normal, delta_loc: torch.Tensor, delta_log_scale: torch.Tensor, validate_args=None):
        self.prior = prior
        self.delta_loc = delta_loc
        self.delta_log_scale = delta_log_scale
        super().__init__(prior.loc + delta_loc, prior.scale * delta_log_scale.exp(), validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        """The same residual normal over ``batch_shape``: prior and deltas expanded alike."""
        batch_shape = torch.Size(batch_shape)
        return ResidualNormalDistribution(
            self.prior.expand(batch_shape),
            self.delta_loc.expand(batch_shape),
            self.delta_log_scale.expand(batch_shape),
            validate_args=self._validate_args,
        )


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` view the same memory the same way (so hold equal values)."""
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()


@register_kl(ResidualNormalDistribution, Normal)
def _kl_residual_normal(q: ResidualNormalDistribution, p: Normal) -> torch.Tensor:
    if _same_values(p.loc, q.prior.loc) and _same_values(p.scale, q.prior.scale):
        return spatial_residual_normal_kl(q.delta_loc, q.delta_log_scale, p.scale, event_dims=0)
    variance_ratio = (q.scale / p.scale).pow(2)
    return 0.5 * (variance_ratio + ((q.loc - p.loc) / p.scale).pow(2) - 1 - variance_ratio.log())


def spatial_residual_normal_kl(
    delta_loc: torch.Tensor, delta_log_scale: torch.Tensor, prior_scale: torch.Tensor, event_dims: int = 3
) -> torch.Tensor:
    """``KL(q || p)`` of a residual normal, summed over the rightmost ``event_dims`` dims
    (``[C, H, W]`` by default):

    .. math:: \\tfrac12 \\sum \\Big(\\frac{\\Delta\\mu^2}{\\sigma_p^2} + \\Delta\\sigma^2 - \\log\\Delta\\sigma^2 - 1\\Big)

    with ``dsigma^2 - log dsigma^2 - 1`` evaluated as ``expm1(2 t) - 2 t`` for
    ``t = log dsigma``, which stays accurate when the posterior scale is close to the
    prior's (where ``exp(2t) - 1`` would cancel to a few digits).
    """
    two_t = 2 * delta_log_scale
    kl = 0.5 * ((delta_loc / prior_scale).pow(2) + torch.expm1(two_t) - two_t)
    return kl.sum(tuple(range(-event_dims, 0))) if event_dims else kl


class SpatialPrior(nn.Module):
    """``p(z_l | h_l)`` and the state update it proposes, from one Very Deep VAE
    bottleneck block on the top-down state ``h_l`` (``[..., width, H, W]``):

    ``[raw mu, raw log sigma, h_p] = Block(h_l)``; ``mu_p = b(raw mu)``,
    ``sigma_p = SCALE_FLOOR + exp(b(raw log sigma))``.

    The block's output starts at zero: every prior starts as ``N(0, 1 + SCALE_FLOOR)``
    and proposes no change of the state.
    """

    def __init__(self, width: int, latent_channels: int):
        super().__init__()
        self.net = BottleneckBlock(width, 2 * latent_channels + width, zero_output=True)
        self.latent_channels = latent_channels

    def forward(self, state: torch.Tensor) -> tuple[dist.TorchDistribution, torch.Tensor]:
        """Returns ``(p(z_l | h_l)`` with a ``[C, H, W]`` event, ``h_p)``."""
        c = self.latent_channels
        raw_loc, raw_log_scale, state_update = self.net(state).split([c, c, state.shape[-3]], dim=-3)
        prior = dist.Normal(soft_clamp(raw_loc), SCALE_FLOOR + soft_clamp(raw_log_scale).exp())
        return prior.to_event(3), state_update


class SpatialResidualPosterior(nn.Module):
    """``q(z_l | h_l, r)``: ``[raw dmu, raw log dsigma] = Block([h_l, r])``, then
    ``q = N(mu_p + b(raw dmu), sigma_p * exp(b(raw log dsigma)))`` around the prior it is given.

    The block's output starts at zero, so the posterior starts equal to the prior (zero KL).
    Returns ``(q, context)`` with ``context = [h_l, r]``, the input a flow on ``q`` can condition on.
    """

    def __init__(self, width: int, feature_channels: int, latent_channels: int):
        super().__init__()
        self.net = BottleneckBlock(width + feature_channels, 2 * latent_channels, zero_output=True)

    def forward(
        self, prior: dist.TorchDistribution, state: torch.Tensor, features: torch.Tensor
    ) -> tuple[dist.TorchDistribution, torch.Tensor]:
        context = cat_channels(state, features)
        raw_delta_loc, raw_delta_log_scale = self.net(context).chunk(2, dim=-3)
        posterior = ResidualNormalDistribution(prior.base_dist, soft_clamp(raw_delta_loc), soft_clamp(raw_delta_log_scale))
        return posterior.to_event(3), context
