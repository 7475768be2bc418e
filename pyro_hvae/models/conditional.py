"""Conditional hierarchies: a top-down VAE whose prior is conditioned on a context ``c``.

.. math::

    p(x, z_{1:L} \\mid c) = p(z_L \\mid c) \\prod_{l=1}^{L-1} p(z_l \\mid z_{l+1}, c)\\; p(x \\mid z_1, c)

The context (a class label, or the observed border of an image) is encoded once by a
:class:`~pyro_hvae.context.ContextEncoder` into a vector ``h_c``, which feeds the top prior,
every conditional prior and every posterior head, and, for a context with spatial layout,
into feature maps that reach the decoder at equal resolution (:class:`SkipDecoder`).

For the **border** of an image (:class:`BorderLadderVAE`), ``x = (x_b, x_c)`` splits into the
observed border ``x_b`` and the hidden centre ``x_c``; the context is ``x_b``, whose pixels
the observation takes as known (:class:`KnownValues`), and the likelihood explains only the
hidden pixels:

.. math:: p(x_c, z \\mid x_b) = p(z \\mid x_b)\\, p(x_c \\mid z, x_b)

so the importance-weighted estimate of ``log p(x)`` of this model is ``log p(x_c | x_b)``,
the log-likelihood of the hidden pixels given the border.

Pyro signatures: ``vae.model(x=None, context=None, *, batch_size=None)`` and
``vae.guide(x, context=None)``. A context read from the data itself (a border:
``ContextEncoder.from_data``) defaults to ``x``: ``model(x)`` and ``guide(x)`` condition on
``x``'s own border, which is all the trainer and the evaluation pass; ``model(context=x_b)``
samples images given the border of ``x_b``. Other contexts (labels) are passed explicitly:
``model(x, y)``, ``guide(x, y)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.distributions.torch_distribution import TorchDistribution
from pyro.poutine.guide import GuideMessenger
from torch import nn
from torch.distributions import constraints

from pyro_hvae.cells import ImageBlock, Upsample, cat_channels, conv
from pyro_hvae.context import BorderEncoder, ContextEncoder, ContextFeatures
from pyro_hvae.inpaint import Inpainting, make_mask
from pyro_hvae.infer.iw import log_likelihood
from pyro_hvae.latents import ConditionalNormal, ResidualNormal
from pyro_hvae.likelihoods import CoupledLogisticMixture, Likelihood
from pyro_hvae.models.base import HierarchicalVAE
from pyro_hvae.models.ladder import BottomUpPath
from pyro_hvae.models.top_down import GenerativeModel, latent_site, register_params
from pyro_hvae.nn import ACTIVATIONS, MLP, cat_features, check_positive_sizes

__all__ = [
    "BorderLadderVAE",
    "ConditionalLadderGuide",
    "ConditionalLadderVAE",
    "ConditionalTopDownModel",
    "KnownValues",
    "SkipDecoder",
    "VectorDecoder",
]

#: Key of a latent site's ``infer`` dict under which the model hands the guide the context
#: vector ``h_c`` its prior was computed from (the guide takes it out again).
CONTEXT_VECTOR = "context_vector"


class KnownValues(TorchDistribution):
    """``p(x | z, c)`` over whole data points when the context fixes some values (a border):
    those are ``known_values`` (a point mass), the others follow ``base``, a distribution per
    value (batch shape ``[..., *event_shape]``). ``log_prob`` sums ``base``'s log-density over
    the unknown values only, so that with ``x`` agreeing with the context it is
    ``log p(x_c | z, x_b)``; ``mean`` and ``sample`` keep the known values in place.
    """

    arg_constraints = {}

    def __init__(self, base: TorchDistribution, known: torch.Tensor, known_values: torch.Tensor, event_dims: int, validate_args=None):
        self.base, self.event_dims = base, event_dims
        shape = base.batch_shape
        self.known, self.known_values = known, known_values.expand(shape)
        super().__init__(shape[: len(shape) - event_dims], shape[len(shape) - event_dims :], validate_args=validate_args)

    @property
    def support(self):
        return constraints.independent(self.base.support, self.event_dims)

    def expand(self, batch_shape, _instance=None):
        shape = torch.Size(batch_shape) + self.event_shape
        return KnownValues(self.base.expand(shape), self.known, self.known_values.expand(shape), self.event_dims)

    @property
    def mean(self) -> torch.Tensor:
        return torch.where(self.known, self.known_values, self.base.mean)

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        draw = self.base.sample(sample_shape)
        return torch.where(self.known, self.known_values.expand(draw.shape), draw)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        log_prob = self.base.log_prob(value).masked_fill(self.known, 0.0)
        return log_prob.flatten(-self.event_dims).sum(-1)


class _Conv(ImageBlock):
    """A 3x3 convolution, then the activation (none when ``activation`` is None)."""

    def __init__(self, in_channels: int, out_channels: int, activation: type[nn.Module] | None):
        super().__init__()
        self.conv = conv(in_channels, out_channels, 3)
        self.act = activation() if activation is not None else nn.Identity()

    def block(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))


class VectorDecoder(nn.Module):
    """``p(x | z_1, c)``'s network for a context without maps: ``MLP([z_1, h_c])``."""

    def __init__(self, latent_dim: int, feature_dim: int, hidden_dims: Sequence[int], num_features: int, **nets):
        super().__init__()
        self.net = MLP(latent_dim + feature_dim, hidden_dims, num_features, **nets)

    @property
    def output_bias(self) -> nn.Parameter:
        return self.net[-1].bias

    def forward(self, z_1: torch.Tensor, context: ContextFeatures) -> torch.Tensor:
        return self.net(cat_features(z_1, context.vector))


class SkipDecoder(nn.Module):
    """``p(x | z_1, c)``'s network with the context's feature maps at equal resolution.

    ``[z_1, h_c]`` goes through an MLP to a state at the coarsest map's resolution; then,
    coarse to fine, the context map of that resolution is concatenated to the state (a skip
    connection from the border to the pixels beside it), a 3x3 conv and the activation
    follow, and the state is up-sampled by 2 (nearest neighbour and a 1x1 conv) to the next;
    a last 3x3 conv gives the likelihood's features, plus a learned per-value bias.

    :param map_channels: channels of the context's maps, finest first (the finest at the
        image's resolution, each next one half of it).
    """

    def __init__(
        self,
        latent_dim: int,
        feature_dim: int,
        map_channels: Sequence[int],
        hidden_dims: Sequence[int],
        data_shape: Sequence[int],
        likelihood: Likelihood,
        *,
        activation: str = "elu",
        batch_norm: bool = False,
    ):
        super().__init__()
        channels = list(map_channels)
        _, height, width = data_shape
        factor = 2 ** (len(channels) - 1)
        self.coarse = (channels[-1], height // factor, width // factor)
        self.stem = MLP(latent_dim + feature_dim, hidden_dims, math.prod(self.coarse), activation=activation, batch_norm=batch_norm)
        act = ACTIVATIONS[activation]
        self.merge = nn.ModuleList(_Conv(2 * c, c, act) for c in channels)
        self.up = nn.ModuleList(Upsample(fine_above, fine, 2) for fine, fine_above in zip(channels, channels[1:]))
        self.likelihood, self.data_shape = likelihood, tuple(data_shape)
        num_features = likelihood.num_features(self.data_shape)
        self.out = _Conv(channels[0], num_features // (height * width), None)
        self.output_bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, z_1: torch.Tensor, context: ContextFeatures) -> torch.Tensor:
        state = self.stem(cat_features(z_1, context.vector))
        state = state.reshape(*state.shape[:-1], *self.coarse)
        for s in reversed(range(len(self.merge))):
            state = self.merge[s](cat_channels(state, context.maps[s]))
            if s > 0:
                state = self.up[s - 1](state)
        return self.likelihood.features_from_map(self.out(state), self.data_shape) + self.output_bias


class ConditionalTopDownModel(GenerativeModel):
    """The generative model ``p(x, z_{1:L} | c)`` as a Pyro program: ``model(x, context)``.

    :param context_encoder: the block that encodes the context (its ``feature_dim`` and
        ``map_channels`` size the networks here). Where it fixes values of the data (its
        ``known`` mask: a border), the observation takes them from the context and explains
        the others only (:class:`KnownValues`).

    The other parameters are those of :class:`~pyro_hvae.models.top_down.TopDownModel`.
    Sites ``z_L, ..., z_1`` and ``x`` inside ``pyro.plate("data", N)``; every latent site
    carries ``h_c`` in ``site["infer"][CONTEXT_VECTOR]`` for the guide.
    """

    def __init__(
        self,
        data_shape: Sequence[int],
        latent_dims: Sequence[int],
        hidden_dims: Sequence[int],
        context_encoder: ContextEncoder,
        *,
        likelihood: Likelihood | None = None,
        activation: str = "elu",
        batch_norm: bool = False,
        name: str | None = None,
    ):
        super().__init__(data_shape, likelihood, name)
        if not isinstance(context_encoder, ContextEncoder):
            raise ValueError(f"context_encoder must be a pyro_hvae.context.ContextEncoder, got {type(context_encoder).__name__}")
        self.latent_dims = check_positive_sizes("latent_dims", latent_dims)
        hidden_dims = check_positive_sizes("hidden_dims", hidden_dims)
        self.context_encoder = context_encoder
        nets = dict(activation=activation, batch_norm=batch_norm)
        width, D = hidden_dims[-1], context_encoder.feature_dim
        self.top = ConditionalNormal(D, [width, width], self.latent_dims[-1], **nets)
        self.priors = nn.ModuleList(
            ConditionalNormal(above + D, [width, width], below, **nets)
            for below, above in zip(self.latent_dims[:-1], self.latent_dims[1:])
        )
        if context_encoder.map_channels:
            self.decoder = SkipDecoder(
                self.latent_dims[0], D, context_encoder.map_channels, hidden_dims[::-1], self.data_shape, self.likelihood, **nets
            )
        else:
            num_features = self.likelihood.num_features(self.data_shape)
            self.decoder = VectorDecoder(self.latent_dims[0], D, hidden_dims[::-1], num_features, **nets)
        if context_encoder.known is not None and isinstance(self.likelihood, CoupledLogisticMixture):
            raise ValueError(
                "likelihood: the coupled logistic mixture has one distribution per pixel, not per value, "
                "and cannot leave the context's known values out; use another likelihood"
            )

    @property
    def num_layers(self) -> int:
        return len(self.latent_dims)

    def context_of(self, x: torch.Tensor | None, context):
        """``context``, or ``x`` itself when no context is given and the context is read from
        the data (a border). Raises ``ValueError`` when there is none."""
        if context is None and x is not None and self.context_encoder.from_data:
            context = x
        if context is None:
            raise ValueError(
                f"context: this hierarchy's prior is conditioned on a context ({type(self.context_encoder).__name__}); "
                "pass it: model(x, context) or model(context=..., batch_size=N)"
            )
        return context

    def context_features(self, context, num_data: int) -> ContextFeatures:
        """``context`` encoded; ``ValueError`` for a batch of another size."""
        features = self.context_encoder(context)
        if features.vector.shape[0] != num_data:
            raise ValueError(f"context: {features.vector.shape[0]} contexts for {num_data} data points; give one per data point")
        return features

    def top_prior(self, h: torch.Tensor) -> dist.TorchDistribution:
        """``p(z_L | c)``."""
        return self.top(h)

    def prior(self, layer: int, z_above: torch.Tensor, h: torch.Tensor) -> dist.TorchDistribution:
        """``p(z_l | z_{l+1}, c)`` for 1-based ``layer`` ``l < L``."""
        return self.priors[layer - 1](z_above, h)

    @property
    def known(self) -> torch.Tensor | None:
        """The values of a data point the context fixes (``context_encoder.known``), or None."""
        return self.context_encoder.known

    def observation(self, z_1: torch.Tensor, features: ContextFeatures, context) -> dist.TorchDistribution:
        """``p(x | z_1, c)``; where the context fixes values, those are taken from it and
        the others explained (:class:`KnownValues`)."""
        fn = self.likelihood.distribution(self.decoder(z_1, features), self.data_shape)
        if self.known is None:
            return fn
        return KnownValues(fn.base_dist, self.known, context, len(self.data_shape))

    @torch.no_grad()
    def start_at_data_mean(self, data_mean: torch.Tensor) -> None:
        """Start ``p(x | z_1, c)`` at the data's mean image (as
        :meth:`~pyro_hvae.models.top_down.TopDownModel.start_at_data_mean`)."""
        bias = self.decoder.output_bias
        bias.copy_(self.likelihood.features_for_mean(data_mean.to(bias)))

    def forward(self, x: torch.Tensor | None = None, context=None, *, batch_size: int | None = None) -> torch.Tensor:
        """Run the generative program; returns ``x`` (observed, or sampled when ``x is None``).
        Without ``x`` the batch size is ``batch_size``, else the number of contexts."""
        if x is None and batch_size is None and context is not None:
            batch_size = len(context)
        num_data = self.batch_size_of(x, batch_size)
        register_params(self.pyro_name, self)
        context = self.context_of(x, context)
        features = self.context_features(context, num_data)
        h = features.vector
        L = self.num_layers
        with pyro.plate("data", num_data):
            z = pyro.sample(latent_site(L), self.top_prior(h), infer={CONTEXT_VECTOR: h})
            for layer in reversed(range(1, L)):
                z = pyro.sample(latent_site(layer), self.prior(layer, z, h), infer={CONTEXT_VECTOR: h})
            return pyro.sample("x", self.observation(z, features, context), obs=x)


class ConditionalLadderGuide(GuideMessenger, nn.Module):
    """``q(z_{1:L} | x, c) = q(z_L | x, c) prod_{l<L} q(z_l | z_{l+1}, x, c)`` as a
    :class:`~pyro.poutine.guide.GuideMessenger` over a :class:`ConditionalTopDownModel`:
    at each layer the residual normal around the model's own (context-conditioned) prior,

    .. math:: q = \\mathcal{N}(\\mu_l + \\Delta\\mu_l, \\sigma_l \\cdot \\Delta\\sigma_l), \\qquad
              [\\Delta\\mu_l, \\log\\Delta\\sigma_l] = \\mathrm{Linear}([r_l, h_c])

    with ``r_l`` the bottom-up features of ``x`` and ``h_c`` the context vector the model
    hands over with the site. Call it as ``guide(x, context)`` (``guide(x)`` for a border).
    """

    def __init__(self, model: ConditionalTopDownModel, bottom_up: BottomUpPath, heads: Sequence[nn.Module]):
        nn.Module.__init__(self)
        GuideMessenger.__init__(self, model)
        self.bottom_up = bottom_up
        self.heads = nn.ModuleList(heads)
        self._layer_of = {latent_site(layer): layer for layer in range(1, model.num_layers + 1)}

    def __call__(self, x: torch.Tensor, context=None, *args, **kwargs):
        self.model.check_data(x)
        register_params(self.model.pyro_name + "_guide", self)
        self._features = self.bottom_up(x)
        try:
            return GuideMessenger.__call__(self, x, context, *args, **kwargs)
        finally:
            del self._features

    def _pyro_sample(self, msg) -> None:
        self._context = msg["infer"].pop(CONTEXT_VECTOR, None)
        try:
            super()._pyro_sample(msg)
        finally:
            self._context = None

    def get_posterior(self, name: str, prior):
        layer = self._layer_of[name]
        posterior, _ = self.heads[layer - 1](prior, cat_features(self._features[layer - 1], self._context))
        return posterior


class ConditionalLadderVAE(HierarchicalVAE):
    """A top-down hierarchical VAE conditioned on a context, as a Pyro model/guide pair:
    ``vae.model(x, context)``, ``vae.guide(x, context)`` (module docstring).

    :param data_shape: shape of one data point, e.g. ``(1, 28, 28)``.
    :param latent_dims: sizes of ``z_1 .. z_L``, bottom first.
    :param context_encoder: a :class:`~pyro_hvae.context.ContextEncoder`, e.g.
        :class:`~pyro_hvae.context.LabelEncoder` or :class:`~pyro_hvae.context.BorderEncoder`.
    :param hidden_dims: as for :class:`~pyro_hvae.LadderVAE`.
    :param likelihood, batch_norm, activation, name: as for :class:`~pyro_hvae.LadderVAE`.

    Posteriors are residual normals around the conditioned priors, so the closed-form KL
    per layer is valid (``analytic_kl``).
    """

    analytic_kl = True

    def __init__(
        self,
        data_shape: Sequence[int],
        latent_dims: Sequence[int],
        context_encoder: ContextEncoder,
        hidden_dims: Sequence[int] = (512, 256),
        *,
        likelihood: Likelihood | None = None,
        batch_norm: bool = False,
        activation: str = "elu",
        name: str | None = None,
    ):
        super().__init__()
        hidden_dims = check_positive_sizes("hidden_dims", hidden_dims)
        nets = dict(activation=activation, batch_norm=batch_norm)
        self.model = ConditionalTopDownModel(
            data_shape, latent_dims, hidden_dims, context_encoder, likelihood=likelihood, name=name, **nets
        )
        width, D = hidden_dims[-1], context_encoder.feature_dim
        heads = [ResidualNormal(width + D, d) for d in self.model.latent_dims]
        bottom_up = BottomUpPath(self.model.data_dim, hidden_dims, self.model.num_layers, **nets)
        self.guide = ConditionalLadderGuide(self.model, bottom_up, heads)

    @property
    def context_encoder(self) -> ContextEncoder:
        return self.model.context_encoder

    #: What the model's likelihood (and so an importance-weighted estimate) is of.
    likelihood_of = "log p(x | context)"

    @property
    def observed_dims(self) -> int:
        """How many values of a data point the likelihood explains (for bits per dimension):
        all of them, or those the context does not fix."""
        known = self.model.known
        return self.model.data_dim if known is None else int((~known).sum())


class BorderLadderVAE(ConditionalLadderVAE):
    """A hierarchy that fills a hidden region of images from the observed border:
    ``p(x_c, z | x_b) = p(z | x_b) p(x_c | z, x_b)`` (module docstring).

    ``vae.model(x)`` and ``vae.guide(x)`` condition on the border of ``x`` itself, so
    training, evaluation and every tool of the package that passes only ``x`` work as for an
    unconditional hierarchy; the likelihood explains the hidden pixels only. Fill images
    with :meth:`fill`.

    :param mask: boolean ``data_shape`` (or ``(H, W)``), True where observed (the border);
        default ``make_mask("center", data_shape)``, the centre square of half the size hidden.
    :param context_channels: channels of the border's feature maps, finest first (the
        finest at the image's resolution, each next one half of it).
    :param context_dim: size of the border's feature vector ``h_c`` (default ``hidden_dims[-1]``).

    The other parameters are those of :class:`ConditionalLadderVAE`.
    """

    likelihood_of = "log p(x_missing | x_border): the hidden pixels given the observed border"

    def __init__(
        self,
        data_shape: Sequence[int],
        latent_dims: Sequence[int],
        hidden_dims: Sequence[int] = (512, 256),
        *,
        mask: torch.Tensor | None = None,
        context_channels: Sequence[int] = (16, 32, 32),
        context_dim: int | None = None,
        likelihood: Likelihood | None = None,
        batch_norm: bool = False,
        activation: str = "elu",
        name: str | None = None,
    ):
        hidden_dims = check_positive_sizes("hidden_dims", hidden_dims)
        if mask is None:
            mask = make_mask("center", tuple(data_shape))
        encoder = BorderEncoder(data_shape, mask, context_channels, context_dim or hidden_dims[-1], activation=activation)
        super().__init__(
            data_shape, latent_dims, encoder, hidden_dims, likelihood=likelihood,
            batch_norm=batch_norm, activation=activation, name=name,
        )

    @property
    def mask(self) -> torch.Tensor:
        """Boolean ``data_shape``, True where observed (the border)."""
        return self.context_encoder.mask

    @torch.no_grad()
    def fill(self, x: torch.Tensor, *, num_samples: int = 100, chunk_size: int | None = None) -> Inpainting:
        """Fill the hidden region of ``x`` from its border, with ``K = num_samples`` draws of
        ``z ~ p(z | x_b)``; returns an :class:`~pyro_hvae.inpaint.Inpainting` as
        :func:`~pyro_hvae.inpaint.inpaint` does, so the methods compare directly:

        * ``x``: one draw ``x_c ~ p(x_c | z, x_b)``, the border kept;
        * ``predictive_mean``: ``(1/K) sum_k E[x_c | z_k, x_b]``, the border kept;
        * ``missing_log_prob``: per image, the importance-weighted estimate of
          ``log p(x_c | x_b)`` at the values ``x`` holds in the hidden region, with ``K``
          samples of the guide ``q(z | x)``: pass complete images whose region was hidden.

        Only the border of ``x`` is read for the fill; call ``vae.eval()`` first. The
        importance samples go ``chunk_size`` at a time; by default as many as fit the memory
        budget that ``pyro-hvae evaluate`` uses (:func:`~pyro_hvae.evaluate.fitting_chunk_size`).
        """
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
        self.model.check_data(x)
        total = torch.zeros_like(x)
        for _ in range(num_samples):
            site = poutine.trace(self.model).get_trace(None, x).nodes["x"]
            total += site["fn"].mean
        if chunk_size is None:
            from pyro_hvae.evaluate import default_memory_budget, fitting_chunk_size  # evaluate builds the models

            chunk_size = fitting_chunk_size(self, x, num_samples, default_memory_budget(x.device))
        estimate = log_likelihood(self.model, self.guide, x, num_samples=num_samples, chunk_size=chunk_size)
        return Inpainting(site["value"], None, total / num_samples, estimate)
