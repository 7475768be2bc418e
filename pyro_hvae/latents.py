"""One stochastic layer: its conditional prior, its posterior, and IAF flows on top.

A layer ``l`` of a top-down hierarchy has

* a **prior** ``p(z_l | z_{l+1}) = N(mu_l, sigma_l)`` from a network of the layer
  above (:class:`ConditionalNormal`), shared by model and guide;
* a **posterior**, either *residual* (:class:`ResidualNormal`), a shift and scaling
  of that same prior by the bottom-up features ``r_l``::

      q(z_l | z_{l+1}, x) = N(mu_l + dmu_l, sigma_l * dsigma_l)

  or *independent* (:class:`IndependentNormal`), with its own location and scale
  from ``[r_l, z_{l+1}]``;
* optionally, ``k`` inverse autoregressive flows (:class:`IAF`) applied to the
  posterior sample, conditioned on a context vector from the encoder.

Every posterior head has the same call signature,
``head(prior, features, z_above) -> (base_distribution, context)``, so a guide can
hold a list of heads of mixed kinds.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyro.distributions as dist
import torch
from pyro.distributions.transforms import ConditionalAffineAutoregressive
from pyro.nn import ConditionalAutoRegressiveNN
from torch import nn

from pyro_hvae.nn import MLP, bounded, cat_features

#: Bounds on a prior's (or independent posterior's) log-scale: sigma in [9e-4, 7.4].
LOG_SCALE_BOUNDS = (-7.0, 2.0)
#: Bounds on the residual log-scale ``log dsigma``: ``log dsigma^2`` in [-7, 2], the bound of the two-level top-down VAE this package starts from.
DELTA_LOG_SCALE_BOUNDS = (-3.5, 1.0)


def diagonal_normal(loc: torch.Tensor, log_scale: torch.Tensor) -> dist.TorchDistribution:
    """``N(loc, diag(exp(log_scale))^2)`` with the last dimension as its event."""
    return dist.Normal(loc, log_scale.exp()).to_event(1)


def residual_normal(
    prior: dist.TorchDistribution, delta_loc: torch.Tensor, delta_log_scale: torch.Tensor
) -> dist.TorchDistribution:
    """The residual-normal posterior of a diagonal normal prior ``N(mu, sigma)``:

    .. math:: q = \\mathcal{N}(\\mu + \\Delta\\mu,\\; \\sigma \\cdot \\Delta\\sigma),
              \\quad \\log(\\sigma \\cdot \\Delta\\sigma) = \\log\\sigma + \\log\\Delta\\sigma

    computed in log space. When the prior moves, the posterior moves with it.
    """
    base = prior.base_dist
    return diagonal_normal(base.loc + delta_loc, base.scale.log() + delta_log_scale)


def residual_normal_kl(
    delta_loc: torch.Tensor, delta_log_scale: torch.Tensor, prior_scale: torch.Tensor
) -> torch.Tensor:
    """``KL(q || p)`` between a residual normal and its prior, summed over the last dim:

    .. math:: \\mathrm{KL} = \\tfrac12 \\sum_d \\Big(\\frac{\\Delta\\mu_d^2}{\\sigma_d^2}
              + \\Delta\\sigma_d^2 - \\log \\Delta\\sigma_d^2 - 1\\Big)

    It depends on the prior only through ``sigma``: ``TraceMeanField_ELBO`` computes
    the same number from ``kl_divergence(q, p)``.
    """
    delta_var = torch.exp(2 * delta_log_scale)
    terms = delta_loc.pow(2) / prior_scale.pow(2) + delta_var - 2 * delta_log_scale - 1
    return 0.5 * terms.sum(-1)


class ConditionalNormal(nn.Module):
    """``N(mu(h), sigma(h))`` with ``h`` the concatenated inputs and ``[mu, log sigma] = MLP(h)``.

    The log-scale is kept smoothly inside ``log_scale_bounds``. Serves as a top-down
    prior ``p(z_l | z_{l+1})``, an independent posterior, or a bottom-up posterior.
    """

    def __init__(
        self,
        in_features: int,
        hidden_dims: Sequence[int],
        latent_dim: int,
        *,
        activation: str = "elu",
        batch_norm: bool = False,
        log_scale_bounds: tuple[float, float] = LOG_SCALE_BOUNDS,
    ):
        super().__init__()
        self.net = MLP(in_features, hidden_dims, 2 * latent_dim, activation=activation, batch_norm=batch_norm)
        self.latent_dim = latent_dim
        self.log_scale_bounds = log_scale_bounds

    def forward(self, *inputs: torch.Tensor) -> dist.TorchDistribution:
        loc, raw_log_scale = self.net(cat_features(*inputs)).chunk(2, dim=-1)
        return diagonal_normal(loc, bounded(raw_log_scale, *self.log_scale_bounds))


class ResidualNormal(nn.Module):
    """Residual posterior head: ``[dmu, log dsigma, context] = Linear(r_l)``, then
    ``q = N(mu + dmu, sigma * dsigma)`` around the prior it is given.

    The head starts at zero, so the posterior starts equal to the prior (zero KL).
    ``log dsigma`` stays smoothly inside ``delta_log_scale_bounds``.
    """

    def __init__(
        self,
        feature_dim: int,
        latent_dim: int,
        *,
        context_dim: int = 0,
        delta_log_scale_bounds: tuple[float, float] = DELTA_LOG_SCALE_BOUNDS,
    ):
        super().__init__()
        self.net = MLP(feature_dim, [], 2 * latent_dim + context_dim, zero_init_output=True)
        self.latent_dim = latent_dim
        self.context_dim = context_dim
        self.delta_log_scale_bounds = delta_log_scale_bounds

    def forward(self, prior, features: torch.Tensor, z_above: torch.Tensor | None = None):
        out = self.net(features)
        delta_loc, raw, context = out.split([self.latent_dim, self.latent_dim, self.context_dim], dim=-1)
        delta_log_scale = bounded(raw, *self.delta_log_scale_bounds)
        return residual_normal(prior, delta_loc, delta_log_scale), context


class IndependentNormal(nn.Module):
    """Independent posterior head (the classic ladder merge): ``q(z_l | r_l, z_{l+1}) =
    N(mu_q, sigma_q)`` from ``[r_l, z_{l+1}]``, with no tie to the prior's parameters."""

    def __init__(
        self,
        feature_dim: int,
        latent_dim: int,
        above_dim: int = 0,
        hidden_dims: Sequence[int] = (),
        *,
        context_dim: int = 0,
        activation: str = "elu",
        batch_norm: bool = False,
    ):
        super().__init__()
        in_features = feature_dim + above_dim
        self.net = MLP(in_features, hidden_dims, 2 * latent_dim + context_dim, activation=activation, batch_norm=batch_norm)
        self.latent_dim = latent_dim
        self.context_dim = context_dim

    def forward(self, prior, features: torch.Tensor, z_above: torch.Tensor | None = None):
        inputs = (features,) if z_above is None else (features, z_above)
        loc, raw, context = self.net(cat_features(*inputs)).split(
            [self.latent_dim, self.latent_dim, self.context_dim], dim=-1
        )
        return diagonal_normal(loc, bounded(raw, *LOG_SCALE_BOUNDS)), context


class BoundedAutoRegressiveNN(ConditionalAutoRegressiveNN):
    """Pyro's masked autoregressive network ``(z, context) -> (m, log s)`` with the
    log-scale kept smoothly inside ``log_scale_bounds`` and the output layer at zero,
    so that it starts at ``m = 0, log s = 0``. Output ``d`` depends on ``z`` only
    through the inputs before ``d`` in its (random, buffered) ``permutation``."""

    def __init__(
        self,
        latent_dim: int,
        context_dim: int,
        hidden_dims: Sequence[int],
        log_scale_bounds: tuple[float, float] = DELTA_LOG_SCALE_BOUNDS,
    ):
        super().__init__(latent_dim, context_dim, list(hidden_dims))
        nn.init.zeros_(self.layers[-1].weight)
        nn.init.zeros_(self.layers[-1].bias)
        self.log_scale_bounds = log_scale_bounds

    def forward(self, z: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loc, raw_log_scale = super().forward(z, context)
        return loc, bounded(raw_log_scale, *self.log_scale_bounds)


class IAF(nn.Module):
    """``num_flows`` inverse autoregressive (affine) flows on a posterior sample.

    Each flow is ``z <- m + s * z`` with ``[m, log s]`` from a masked autoregressive
    network of ``(z, context)`` (:class:`BoundedAutoRegressiveNN`), ``log s`` bounded
    like the residual ``log dsigma`` (``s`` in ``[0.03, 2.7]``). The networks' output
    layers start at zero: every flow starts as the identity with log-determinant 0, so
    the flowed posterior starts equal to its base (and a residual posterior to the
    prior). The output layers get gradients from the first step, the hidden layers
    once those have moved. The density of a flowed sample is
    ``log q(z_K) = log q(z_0) - sum_k sum_d log s_{k,d}``.
    No closed-form KL exists for the flowed posterior: use a Monte Carlo KL
    (``Trace_ELBO``; ``TraceMeanField_ELBO`` falls back to it at these sites).
    """

    def __init__(self, latent_dim: int, context_dim: int, num_flows: int, hidden_dims: Sequence[int] | None = None):
        super().__init__()
        if isinstance(num_flows, bool) or not isinstance(num_flows, int) or num_flows < 1:
            raise ValueError(f"flows must be a positive integer for IAF, got {num_flows!r}")
        hidden = list(hidden_dims) if hidden_dims else [max(2 * latent_dim, 16)]
        low, high = DELTA_LOG_SCALE_BOUNDS  # the clip is a no-op on the bounded log-scale
        self.flows = nn.ModuleList(
            ConditionalAffineAutoregressive(
                BoundedAutoRegressiveNN(latent_dim, context_dim, hidden, (low, high)),
                log_scale_min_clip=low,
                log_scale_max_clip=high,
            )
            for _ in range(num_flows)
        )

    def forward(self, base: dist.TorchDistribution, context: torch.Tensor) -> dist.TorchDistribution:
        return dist.TransformedDistribution(base, [flow.condition(context) for flow in self.flows])
