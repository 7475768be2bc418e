"""The ladder (top-down) VAE: a bottom-up deterministic pass, then one top-down loop
shared by model and guide.

With a residual posterior, the guide follows the top-down VAE's recipe step by step:

1. bottom-up: ``r_1 = f_1(x)``, ``r_l = f_l(r_{l-1})``;
2. ``[dmu_l, log dsigma_l] = NN_dl(r_l)`` for every layer;
3. top-down, for ``l = L .. 1``: the **model's own** prior ``p(z_l | z_{l+1}) = N(mu_l, sigma_l)``
   is computed from the posterior sample ``z_{l+1}``, and the guide samples
   ``z_l ~ N(mu_l + dmu_l, sigma_l * dsigma_l)`` (for ``l = L``: ``mu = 0, sigma = 1``).

The guide is a :class:`~pyro.poutine.guide.GuideMessenger`: it runs the model and, at
each latent site, replaces the prior it receives by the posterior. The prior
networks therefore run once per step, for model and guide together.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from pyro.poutine.guide import GuideMessenger
from torch import nn

from pyro_hvae.latents import IAF, IndependentNormal, ResidualNormal
from pyro_hvae.likelihoods import Likelihood
from pyro_hvae.models.base import HierarchicalVAE
from pyro_hvae.models.top_down import TopDownModel, latent_site, register_params
from pyro_hvae.nn import FeatureNet, check_positive_sizes


class BottomUpPath(nn.Module):
    """The deterministic path ``r_1 = f_1(x)``, ``r_l = f_l(r_{l-1})``; returns ``[r_1, ..., r_L]``."""

    def __init__(
        self,
        data_dim: int,
        hidden_dims: Sequence[int],
        num_layers: int,
        *,
        activation: str = "elu",
        batch_norm: bool = False,
    ):
        super().__init__()
        width = hidden_dims[-1]
        first = FeatureNet(data_dim, hidden_dims, activation=activation, batch_norm=batch_norm)
        rest = (FeatureNet(width, [width], activation=activation, batch_norm=batch_norm) for _ in range(num_layers - 1))
        self.blocks = nn.ModuleList([first, *rest])
        self.feature_dim = width

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        r = x.flatten(start_dim=1)
        features = []
        for f in self.blocks:
            r = f(r)
            features.append(r)
        return features


class LadderGuide(GuideMessenger, nn.Module):
    """The guide ``q(z_{1:L} | x) = q(z_L | x) prod_{l<L} q(z_l | z_{l+1}, x)`` as a
    :class:`~pyro.poutine.guide.GuideMessenger` over a :class:`TopDownModel`.

    :param model: the generative model whose top-down path the guide shares.
    :param bottom_up: the deterministic path giving ``r_1..r_L`` from ``x``.
    :param heads: one posterior head per layer, bottom first (``heads[0]`` for ``z_1``),
        each ``head(prior, r_l, z_{l+1}) -> (base posterior, context)``.
    :param flows: optional :class:`~pyro_hvae.latents.IAF` per layer, bottom first.

    Calling ``guide(x)`` runs the model with posterior samples at every latent site
    and returns all site values. After a call, ``guide.get_traces()`` gives the
    ``(model_trace, guide_trace)`` pair of that run (used for per-layer KL).
    """

    def __init__(
        self,
        model: TopDownModel,
        bottom_up: BottomUpPath,
        heads: Sequence[nn.Module],
        flows: Sequence[IAF] | None = None,
    ):
        nn.Module.__init__(self)
        GuideMessenger.__init__(self, model)
        self.bottom_up = bottom_up
        self.heads = nn.ModuleList(heads)
        self.flows = nn.ModuleList(flows) if flows else None
        self._layer_of = {latent_site(layer): layer for layer in range(1, model.num_layers + 1)}

    def __call__(self, x: torch.Tensor, *args, **kwargs):
        self.model.check_data(x)
        register_params(self.model.pyro_name + "_guide", self)
        self._features = self.bottom_up(x)
        try:
            return GuideMessenger.__call__(self, x, *args, **kwargs)
        finally:
            del self._features

    def get_posterior(self, name: str, prior):
        layer = self._layer_of[name]
        z_above = self.upstream_value(latent_site(layer + 1)) if layer < self.model.num_layers else None
        posterior, context = self.heads[layer - 1](prior, self._features[layer - 1], z_above)
        if self.flows is not None:
            posterior = self.flows[layer - 1](posterior, context)
        return posterior


class LadderVAE(HierarchicalVAE):
    """A top-down hierarchical VAE with MLP blocks, as a Pyro model/guide pair.

    ``vae.model(x)`` and ``vae.guide(x)`` are Pyro programs: use them with
    ``SVI``, ``Trace_ELBO()(vae.model, vae.guide)``, ``Predictive`` and poutine handlers.

    :param data_shape: shape of one data point, e.g. ``(1, 28, 28)``.
    :param latent_dims: sizes of ``z_1 .. z_L``, **bottom first** (``latent_dims[0]`` is
        ``z_1``, next to the data; ``latent_dims[-1]`` is the top layer ``z_L``).
    :param hidden_dims: widths of the encoder ``x -> r_1`` and, reversed, the decoder
        ``z_1 -> x``; ``hidden_dims[-1]`` is the width of every ``r_l`` and of the
        two hidden layers in each prior network.
    :param likelihood: ``p(x | z_1)``; :class:`~pyro_hvae.likelihoods.Bernoulli` by default.
    :param posterior: ``"residual"`` (default), ``q = N(mu_l + dmu_l, sigma_l * dsigma_l)``
        with ``log dsigma`` bounded to ``[-3.5, 1]`` (``log dsigma^2`` in ``[-7, 2]``
        as in the two-level top-down VAE, through a smooth map that keeps gradients at the bounds); or
        ``"independent"``, ``q = N(mu_q, sigma_q)`` from ``[r_l, z_{l+1}]``.
    :param flows: number of IAF flows on every layer's posterior (0: none).
    :param batch_norm: batch norm in every deterministic network.
    :param activation: ``"elu"``, ``"relu"``, ``"tanh"`` or ``"silu"``.

    Which ELBO applies: ``TraceMeanField_ELBO`` gives the analytic per-layer KL of
    the residual and independent posteriors (the guide visits sites in the model's
    order, so it is unbiased); with ``flows > 0`` the KL has no closed form and both
    it and ``Trace_ELBO`` use a Monte Carlo KL.
    """

    analytic_kl = True  # the guide samples the latents in the model's order

    def __init__(
        self,
        data_shape: Sequence[int],
        latent_dims: Sequence[int],
        hidden_dims: Sequence[int] = (512, 256),
        *,
        likelihood: Likelihood | None = None,
        posterior: Literal["residual", "independent"] = "residual",
        flows: int = 0,
        batch_norm: bool = False,
        activation: str = "elu",
        name: str | None = None,
    ):
        super().__init__()
        if posterior not in ("residual", "independent"):
            raise ValueError(f"posterior must be 'residual' or 'independent', got {posterior!r}")
        if isinstance(flows, bool) or not isinstance(flows, int) or flows < 0:
            raise ValueError(f"flows must be a non-negative integer, got {flows!r}")
        hidden_dims = check_positive_sizes("hidden_dims", hidden_dims)
        nets = dict(activation=activation, batch_norm=batch_norm)
        self.model = TopDownModel(data_shape, latent_dims, hidden_dims, likelihood=likelihood, name=name, **nets)
        dims = self.model.latent_dims
        width = hidden_dims[-1]
        context_dim = width if flows else 0
        if posterior == "residual":
            heads = [ResidualNormal(width, d, context_dim=context_dim) for d in dims]
        else:
            above = dims[1:] + [0]
            heads = [IndependentNormal(width, d, a, [width], context_dim=context_dim, **nets) for d, a in zip(dims, above)]
        iafs = [IAF(d, context_dim, flows) for d in dims] if flows else None
        bottom_up = BottomUpPath(self.model.data_dim, hidden_dims, len(dims), **nets)
        self.guide = LadderGuide(self.model, bottom_up, heads, iafs)
        self.posterior = posterior
        self.flows = flows
