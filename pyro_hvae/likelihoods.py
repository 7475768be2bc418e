"""Likelihood heads p(x | z_1): small, swappable objects.

Every likelihood sees images as float tensors in ``[0, 1]`` (what torchvision's
``ToTensor`` gives), so one data pipeline serves all of them and every sample is an
image again. A likelihood turns the decoder's output features into a Pyro
distribution whose event covers the whole image, and rejects data outside its
support with a ``ValueError`` that says what to do.

==========================  =======================================  =====================
likelihood                  data                                     features per value
==========================  =======================================  =====================
:class:`Bernoulli`          binary pixels ``{0, 1}``                 1
:class:`Categorical`        ``num_levels`` grey levels ``k/(L-1)``   ``num_levels``
:class:`LogisticMixture`    8-bit values ``k/255``                   ``3 * num_mixtures``
==========================  =======================================  =====================

:class:`CoupledLogisticMixture` models the channels of a colour pixel jointly, so its
parameters are counted per pixel: ``num_mixtures * (1 + 2C + C(C-1)/2)``, ``10 *
num_mixtures`` for RGB (see :meth:`Likelihood.num_features`).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.distributions.torch_distribution import TorchDistribution
from torch.distributions import constraints


def bits_per_dim(nll_nats: torch.Tensor | float, num_dims: int) -> torch.Tensor | float:
    """Convert a negative log-likelihood in nats per image to bits per dimension:
    ``nll / (D ln 2)``."""
    return nll_nats / (num_dims * math.log(2.0))


def _on_grid(x: torch.Tensor, num_levels: int) -> torch.Tensor:
    """Whether every value of ``x`` is one of ``k / (num_levels - 1)``, k = 0..num_levels-1."""
    scaled = x * (num_levels - 1)
    return bool(((x >= 0) & (x <= 1) & ((scaled - scaled.round()).abs() < 1e-3)).all())


def log_discretized_logistic(
    y: torch.Tensor, loc: torch.Tensor, log_scale: torch.Tensor, num_bins: int
) -> torch.Tensor:
    """``log P(y)`` for a logistic ``(loc, s = exp(log_scale))`` discretized into ``num_bins``
    bins of ``[-1, 1]`` centred at ``y_k = -1 + 2k / (num_bins - 1)``.

    With half-width ``delta = 1 / (num_bins - 1)``, ``a = (y + delta - loc) / s`` and
    ``b = (y - delta - loc) / s``, an interior bin has mass

    .. math:: \\sigma(a) - \\sigma(b) = \\sigma(a)\\,\\sigma(-b)\\,\\big(1 - e^{-2\\delta / s}\\big),

    whose logarithm is a sum of terms that never cancel, so tiny masses (far tails,
    sharp components) stay finite and accurate. The lowest bin takes the left tail,
    ``sigma(a)``, the highest the right tail, ``sigma(-b)``: the masses sum to one.
    """
    delta = 1.0 / (num_bins - 1)
    inv_scale = torch.exp(-log_scale)
    upper = (y + delta - loc) * inv_scale
    lower = (y - delta - loc) * inv_scale
    log_upper_cdf = F.logsigmoid(upper)
    log_lower_survival = F.logsigmoid(-lower)
    interior = log_upper_cdf + log_lower_survival + torch.log(-torch.expm1(-2 * delta * inv_scale))
    return torch.where(y < -1 + delta / 2, log_upper_cdf, torch.where(y > 1 - delta / 2, log_lower_survival, interior))


class Likelihood(ABC):
    """Base class: a map from decoder features to ``p(x | z_1)``.

    ``features_per_value`` is how many decoder outputs each data value needs; the
    decoder's last layer has ``num_features(data_shape)`` units, which is
    ``prod(data_shape) * features_per_value`` unless the likelihood's parameters are
    shared between values (:class:`CoupledLogisticMixture` has them per pixel).
    """

    features_per_value: int = 1

    def num_features(self, data_shape: tuple[int, ...]) -> int:
        """How many decoder outputs one image of shape ``data_shape`` needs:
        ``prod(data_shape) * features_per_value``."""
        return math.prod(data_shape) * self.features_per_value

    def features_from_map(self, feature_map: torch.Tensor, data_shape: tuple[int, ...]) -> torch.Tensor:
        """A conv decoder's output ``[..., num_features / (H W), H, W]`` as the flat features
        :meth:`distribution` reads. Here channel ``c``'s ``k = features_per_value`` maps are
        adjacent (``c * k + j``) and are moved next to each value: ``[..., C, H, W, k]``, flattened."""
        k = self.features_per_value
        c, h, w = data_shape
        per_value = feature_map.reshape(*feature_map.shape[:-3], c, k, h, w).movedim(-3, -1)
        return per_value.flatten(-4)

    def distribution(self, features: torch.Tensor, data_shape: tuple[int, ...]) -> TorchDistribution:
        """``p(x | z_1)`` with batch shape ``features.shape[:-1]`` and event shape ``data_shape``."""
        params = features.reshape(features.shape[:-1] + tuple(data_shape) + (self.features_per_value,))
        return self._per_value(params).to_event(len(data_shape))

    def features_for_mean(self, mean: torch.Tensor) -> torch.Tensor:
        """Flat features whose distribution has mean ``mean`` (shape ``data_shape``): the
        decoder output bias that starts ``p(x | z_1)`` at the data's mean image."""
        raise NotImplementedError(
            f"{self!r} has no features for a given mean image; use the Bernoulli likelihood"
        )

    @abstractmethod
    def _per_value(self, params: torch.Tensor) -> TorchDistribution:
        """The distribution of each data value, from its ``features_per_value`` features."""

    @abstractmethod
    def check_support(self, x: torch.Tensor) -> None:
        """Raise ``ValueError`` if ``x`` lies outside this likelihood's support."""


class Bernoulli(Likelihood):
    """Independent Bernoulli pixels: ``p(x | z_1) = prod_d Bern(x_d | sigmoid(f_d(z_1)))``."""

    features_per_value = 1

    def _per_value(self, params: torch.Tensor) -> TorchDistribution:
        return dist.Bernoulli(logits=params.squeeze(-1))

    def features_for_mean(self, mean: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
        """``f_d = logit(clamp(mean_d, eps, 1 - eps))``: pixels that are always 0 or 1 in
        the data get a large but finite logit."""
        return torch.logit(mean.clamp(eps, 1 - eps)).flatten()

    def check_support(self, x: torch.Tensor) -> None:
        if not bool(((x == 0) | (x == 1)).all()):
            raise ValueError(
                "x: the Bernoulli likelihood needs binary pixels (0 or 1), got values in "
                f"[{x.min().item():.3g}, {x.max().item():.3g}] that are not all 0 or 1; binarize "
                "the data (data.binarize: dynamic or threshold) or use the categorical or "
                "logistic_mixture likelihood"
            )

    def __repr__(self) -> str:
        return "Bernoulli()"


class QuantizedCategorical(TorchDistribution):
    """A categorical distribution over the ``L`` evenly spaced values ``k / (L - 1)`` of ``[0, 1]``.

    ``P(x = k / (L - 1)) = softmax(logits)_k``. Values are images, not indices.
    """

    arg_constraints = {"logits": constraints.real_vector}
    support = constraints.unit_interval
    has_rsample = False

    def __init__(self, logits: torch.Tensor, validate_args=None):
        self.logits = logits - logits.logsumexp(-1, keepdim=True)
        self.num_levels = logits.shape[-1]
        super().__init__(batch_shape=logits.shape[:-1], validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(QuantizedCategorical, _instance)
        new.logits = self.logits.expand(torch.Size(batch_shape) + (self.num_levels,))
        new.num_levels = self.num_levels
        super(QuantizedCategorical, new).__init__(torch.Size(batch_shape), validate_args=False)
        new._validate_args = self._validate_args
        return new

    def _index(self, value: torch.Tensor) -> torch.Tensor:
        return (value * (self.num_levels - 1)).round().long()

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        shape = torch.broadcast_shapes(value.shape, self.batch_shape)
        index = self._index(value).expand(shape).unsqueeze(-1)
        return self.logits.expand(shape + (self.num_levels,)).gather(-1, index).squeeze(-1)

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        index = dist.Categorical(logits=self.logits).sample(sample_shape)
        return index.to(self.logits.dtype) / (self.num_levels - 1)

    @property
    def mean(self) -> torch.Tensor:
        grid = torch.linspace(0, 1, self.num_levels, dtype=self.logits.dtype, device=self.logits.device)
        return (self.logits.exp() * grid).sum(-1)


class Categorical(Likelihood):
    """A categorical over ``num_levels`` grey levels per pixel (256 for 8-bit images)."""

    def __init__(self, num_levels: int = 256):
        if isinstance(num_levels, bool) or not isinstance(num_levels, int) or num_levels < 2:
            raise ValueError(f"num_levels must be an integer >= 2, got {num_levels!r}")
        self.num_levels = num_levels
        self.features_per_value = num_levels

    def _per_value(self, params: torch.Tensor) -> TorchDistribution:
        return QuantizedCategorical(params)

    def check_support(self, x: torch.Tensor) -> None:
        if not _on_grid(x, self.num_levels):
            raise ValueError(
                f"x: the Categorical({self.num_levels}) likelihood needs pixel values k/{self.num_levels - 1} "
                f"in [0, 1]; got values off that grid in [{x.min().item():.3g}, {x.max().item():.3g}]; "
                "scale images to [0, 1] (data.binarize: none) or set num_levels to the data's levels"
            )

    def __repr__(self) -> str:
        return f"Categorical(num_levels={self.num_levels})"


class DiscretizedLogisticMixture(TorchDistribution):
    """A mixture of ``M`` logistics, discretized to ``num_bins`` values ``k / (num_bins - 1)``.

    With ``y = 2x - 1`` in ``[-1, 1]`` and bin half-width ``delta = 1 / (num_bins - 1)``:

    .. math::

        P(x) = \\sum_m \\pi_m \\big[F_m(y + \\delta) - F_m(y - \\delta)\\big],
        \\quad F_m(t) = \\sigma\\big((t - \\mu_m) / s_m\\big),

    where the lowest bin takes ``F_m(y + delta)`` and the highest ``1 - F_m(y - delta)``,
    so the probabilities of all bins sum to one. The component dimension is last.
    """

    arg_constraints = {
        "logit_weights": constraints.real_vector,
        "locs": constraints.real_vector,
        "log_scales": constraints.real_vector,
    }
    support = constraints.unit_interval
    has_rsample = False

    def __init__(self, logit_weights, locs, log_scales, num_bins: int = 256, validate_args=None):
        self.logit_weights = logit_weights.log_softmax(-1)
        self.locs = locs
        self.log_scales = log_scales.clamp(min=-7.0)
        self.num_bins = num_bins
        super().__init__(batch_shape=locs.shape[:-1], validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        shape = torch.Size(batch_shape) + self.locs.shape[-1:]
        return DiscretizedLogisticMixture(
            self.logit_weights.expand(shape),
            self.locs.expand(shape),
            self.log_scales.expand(shape),
            self.num_bins,
            validate_args=self._validate_args,
        )

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        y = (2 * value - 1).unsqueeze(-1)
        log_bin = log_discretized_logistic(y, self.locs, self.log_scales, self.num_bins)
        return torch.logsumexp(self.logit_weights + log_bin, dim=-1)

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        with torch.no_grad():
            shape = torch.Size(sample_shape) + self.batch_shape
            component = dist.Categorical(logits=self.logit_weights).sample(sample_shape).unsqueeze(-1)
            loc = self.locs.expand(shape + self.locs.shape[-1:]).gather(-1, component).squeeze(-1)
            log_scale = self.log_scales.expand(shape + self.locs.shape[-1:]).gather(-1, component).squeeze(-1)
            u = torch.rand(shape, dtype=loc.dtype, device=loc.device).clamp(1e-5, 1 - 1e-5)
            y = (loc + log_scale.exp() * (u.log() - (-u).log1p())).clamp(-1, 1)
            return ((y + 1) / 2 * (self.num_bins - 1)).round() / (self.num_bins - 1)

    @property
    def mean(self) -> torch.Tensor:
        """The mixture mean of the component locations, clipped to the data range."""
        y = (self.logit_weights.exp() * self.locs.clamp(-1, 1)).sum(-1)
        return (y + 1) / 2


class LogisticMixture(Likelihood):
    """A discretized mixture of ``num_mixtures`` logistics per 8-bit sub-pixel.

    Each value gets its own mixture weights, locations and log-scales; channels are
    modelled independently given ``z_1``.
    """

    def __init__(self, num_mixtures: int = 5, num_bins: int = 256):
        if isinstance(num_mixtures, bool) or not isinstance(num_mixtures, int) or num_mixtures < 1:
            raise ValueError(f"num_mixtures must be a positive integer, got {num_mixtures!r}")
        self.num_mixtures = num_mixtures
        self.num_bins = num_bins
        self.features_per_value = 3 * num_mixtures

    def _per_value(self, params: torch.Tensor) -> TorchDistribution:
        logit_weights, locs, log_scales = params.chunk(3, dim=-1)
        return DiscretizedLogisticMixture(logit_weights, locs, log_scales, self.num_bins)

    def check_support(self, x: torch.Tensor) -> None:
        if not _on_grid(x, self.num_bins):
            raise ValueError(
                f"x: the logistic-mixture likelihood needs 8-bit pixel values k/{self.num_bins - 1} in [0, 1]; "
                f"got values off that grid in [{x.min().item():.3g}, {x.max().item():.3g}]; "
                "feed images as ToTensor gives them (data.binarize: none)"
            )

    def __repr__(self) -> str:
        return f"LogisticMixture(num_mixtures={self.num_mixtures})"


def _num_pairs(num_channels: int) -> int:
    """How many channel pairs ``j < c`` a pixel of ``num_channels`` channels has."""
    return num_channels * (num_channels - 1) // 2


class DiscretizedCoupledLogisticMixture(TorchDistribution):
    """Images ``[C, H, W]`` of ``num_bins`` levels ``k / (num_bins - 1)``, each pixel a
    mixture of ``M`` logistics whose channels are coupled autoregressively (PixelCNN++).

    With ``y = 2x - 1``, one mixture weight ``pi_m`` per pixel and component, and the
    channel means shifted linearly by the channels before them,

    .. math::

        P(x) = \\prod_{h,w} \\sum_m \\pi_m \\prod_{c=0}^{C-1}
               \\mathrm{DLogistic}\\big(y_c \\mid \\mu_{c,m} + \\textstyle\\sum_{j<c} \\tanh(a_{cj,m})\\, y_j,\\; s_{c,m}\\big),

    where ``DLogistic`` is a logistic discretized into ``num_bins`` bins of ``[-1, 1]``, the
    edge bins taking the tails (its log is :func:`log_discretized_logistic`).
    For RGB: ``mu_G + tanh(a) y_R`` and ``mu_B + tanh(b) y_R + tanh(c) y_G``. For each
    component the product over channels is a chain rule, so every pixel's probabilities
    sum to one over all ``num_bins^C`` values.

    Parameters, component dimension ``M`` before ``H, W``: ``logit_weights [..., M, H, W]``,
    ``locs`` and ``log_scales [..., C, M, H, W]``, ``coeffs [..., C(C-1)/2, M, H, W]`` (raw,
    before ``tanh``; pairs ``(c, j)`` ordered ``(1,0), (2,0), (2,1), ...``). The batch shape
    is ``[...]``, the event shape ``[C, H, W]``.
    """

    arg_constraints = {
        "logit_weights": constraints.real,
        "locs": constraints.real,
        "log_scales": constraints.real,
        "coeffs": constraints.real,
    }
    has_rsample = False

    def __init__(self, logit_weights, locs, log_scales, coeffs, num_bins: int = 256, validate_args=None):
        num_channels = locs.shape[-4]
        if coeffs.shape[-4] != _num_pairs(num_channels):
            raise ValueError(
                f"coeffs must hold C(C-1)/2 = {_num_pairs(num_channels)} channel pairs for C = "
                f"{num_channels} channels, got {coeffs.shape[-4]}"
            )
        self.logit_weights = logit_weights.log_softmax(-3)
        self.locs = locs
        self.log_scales = log_scales.clamp(min=-7.0)
        self.coeffs = torch.tanh(coeffs)
        self.num_bins = num_bins
        batch_shape = torch.broadcast_shapes(
            logit_weights.shape[:-3], locs.shape[:-4], log_scales.shape[:-4], coeffs.shape[:-4]
        )
        event_shape = (num_channels,) + tuple(locs.shape[-2:])
        super().__init__(batch_shape, event_shape, validate_args=validate_args)

    @property
    def support(self):
        return constraints.independent(constraints.unit_interval, 3)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(DiscretizedCoupledLogisticMixture, _instance)
        batch_shape = torch.Size(batch_shape)
        new.logit_weights = self.logit_weights.expand(batch_shape + self.logit_weights.shape[-3:])
        new.locs = self.locs.expand(batch_shape + self.locs.shape[-4:])
        new.log_scales = self.log_scales.expand(batch_shape + self.log_scales.shape[-4:])
        new.coeffs = self.coeffs.expand(batch_shape + self.coeffs.shape[-4:])
        new.num_bins = self.num_bins
        super(DiscretizedCoupledLogisticMixture, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def _coupled_locs(self, y: torch.Tensor) -> torch.Tensor:
        """``mu_{c,m} + sum_{j<c} tanh(a_{cj,m}) y_j`` for channel values ``y [..., C, 1, H, W]``."""
        shifted = [self.locs[..., 0, :, :, :]]
        pair = 0
        for c in range(1, self.event_shape[0]):
            shift = self.locs[..., c, :, :, :]
            for j in range(c):
                shift = shift + self.coeffs[..., pair, :, :, :] * y[..., j, :, :, :]
                pair += 1
            shifted.append(shift)
        return torch.stack(torch.broadcast_tensors(*shifted), dim=-4)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        y = (2 * value - 1).unsqueeze(-3)
        log_bins = log_discretized_logistic(y, self._coupled_locs(y), self.log_scales, self.num_bins)
        per_pixel = torch.logsumexp(self.logit_weights + log_bins.sum(-4), dim=-3)
        return per_pixel.sum((-2, -1))

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        """Draw the component, then each channel in order given the channels drawn before it."""
        with torch.no_grad():
            shape = torch.Size(sample_shape) + self.batch_shape
            logits = self.logit_weights.expand(shape + self.logit_weights.shape[-3:]).movedim(-3, -1)
            component = dist.Categorical(logits=logits).sample().unsqueeze(-3)  # [..., 1, H, W]
            locs = self.locs.expand(shape + self.locs.shape[-4:])
            scales = self.log_scales.exp().expand(shape + self.log_scales.shape[-4:])
            coeffs = self.coeffs.expand(shape + self.coeffs.shape[-4:])

            def pick(params: torch.Tensor) -> torch.Tensor:  # [..., K, M, H, W] -> [..., K, H, W]
                index = component.unsqueeze(-4).expand(params.shape[:-3] + (1,) + params.shape[-2:])
                return params.gather(-3, index).squeeze(-3)

            locs, scales, coeffs = pick(locs), pick(scales), pick(coeffs)
            levels = self.num_bins - 1
            channels: list[torch.Tensor] = []
            pair = 0
            for c in range(self.event_shape[0]):
                loc = locs[..., c, :, :]
                for j in range(c):
                    loc = loc + coeffs[..., pair, :, :] * channels[j]
                    pair += 1
                u = torch.rand_like(loc).clamp(1e-6, 1 - 1e-6)
                t = (loc + scales[..., c, :, :] * (u.log() - (-u).log1p())).clamp(-1, 1)
                channels.append(((t + 1) / 2 * levels).round() / levels * 2 - 1)
            return (torch.stack(channels, dim=-3) + 1) / 2

    @property
    def mean(self) -> torch.Tensor:
        """A stand-in for the mean: the mean of the *continuous* coupled mixture (its
        channel means follow the same linear recursion), clipped to the data range.
        The exact mean of the discretized, clipped values has no closed form."""
        means: list[torch.Tensor] = []
        pair = 0
        for c in range(self.event_shape[0]):
            mean = self.locs[..., c, :, :, :]
            for j in range(c):
                mean = mean + self.coeffs[..., pair, :, :, :] * means[j]
                pair += 1
            means.append(mean)
        y = (self.logit_weights.exp().unsqueeze(-4) * torch.stack(means, dim=-4)).sum(-3)
        return (y.clamp(-1, 1) + 1) / 2


class CoupledLogisticMixture(Likelihood):
    """A discretized mixture of ``num_mixtures`` logistics per 8-bit *pixel*, its colour
    channels coupled as in PixelCNN++ (see :class:`DiscretizedCoupledLogisticMixture`).

    Needs ``data_shape = (C, H, W)``. The decoder gives ``F = num_mixtures * (1 + 2C +
    C(C-1)/2)`` features per pixel (``10 * num_mixtures`` for RGB), as a feature map
    ``[F, H, W]`` flattened: a conv decoder's output ``[..., F, H, W]`` with ``flatten(-3)``.
    Along ``F``: ``M`` mixture logits, ``C * M`` locations, ``C * M`` log-scales, then
    ``C(C-1)/2 * M`` raw coupling coefficients, each block channel-major.
    ``features_per_value`` does not apply: size the decoder with :meth:`num_features`.
    """

    def __init__(self, num_mixtures: int = 5, num_bins: int = 256):
        if isinstance(num_mixtures, bool) or not isinstance(num_mixtures, int) or num_mixtures < 1:
            raise ValueError(f"num_mixtures must be a positive integer, got {num_mixtures!r}")
        if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 2:
            raise ValueError(f"num_bins must be an integer >= 2, got {num_bins!r}")
        self.num_mixtures = num_mixtures
        self.num_bins = num_bins

    def features_per_pixel(self, num_channels: int) -> int:
        """``M (1 + 2C + C(C-1)/2)``: one weight, C locations, C log-scales, C(C-1)/2 couplings per component."""
        return self.num_mixtures * (1 + 2 * num_channels + _num_pairs(num_channels))

    def num_features(self, data_shape: tuple[int, ...]) -> int:
        channels, height, width = self._image_shape(data_shape)
        return height * width * self.features_per_pixel(channels)

    def features_from_map(self, feature_map: torch.Tensor, data_shape: tuple[int, ...]) -> torch.Tensor:
        """A conv decoder's ``[..., F, H, W]`` output is already this likelihood's layout: flattened."""
        return feature_map.flatten(-3)

    def distribution(self, features: torch.Tensor, data_shape: tuple[int, ...]) -> TorchDistribution:
        """``p(x | z_1)`` with batch shape ``features.shape[:-1]`` and event shape ``data_shape``."""
        channels, height, width = self._image_shape(data_shape)
        expected = self.num_features(data_shape)
        if features.shape[-1] != expected:
            raise ValueError(
                f"features: {self!r} needs num_features({tuple(data_shape)}) = {expected} decoder outputs "
                f"per image, got {features.shape[-1]}; size the decoder's output with likelihood.num_features"
            )
        params = features.reshape(features.shape[:-1] + (self.features_per_pixel(channels), height, width))
        M, CM = self.num_mixtures, channels * self.num_mixtures
        logits, locs, log_scales, coeffs = params.split([M, CM, CM, _num_pairs(channels) * M], dim=-3)
        batch = features.shape[:-1]
        return DiscretizedCoupledLogisticMixture(
            logits,
            locs.reshape(batch + (channels, M, height, width)),
            log_scales.reshape(batch + (channels, M, height, width)),
            coeffs.reshape(batch + (_num_pairs(channels), M, height, width)),
            self.num_bins,
        )

    def _per_value(self, params: torch.Tensor) -> TorchDistribution:
        raise TypeError("CoupledLogisticMixture has parameters per pixel, not per value; call distribution()")

    @staticmethod
    def _image_shape(data_shape: tuple[int, ...]) -> tuple[int, int, int]:
        if len(data_shape) != 3:
            raise ValueError(
                f"data_shape: the coupled logistic mixture models images [C, H, W], got {tuple(data_shape)}; "
                "use logistic_mixture for data of other shapes"
            )
        return tuple(data_shape)

    def check_support(self, x: torch.Tensor) -> None:
        if not _on_grid(x, self.num_bins):
            raise ValueError(
                f"x: the coupled logistic-mixture likelihood needs pixel values k/{self.num_bins - 1} in [0, 1]; "
                f"got values off that grid in [{x.min().item():.3g}, {x.max().item():.3g}]; "
                "feed images as ToTensor gives them (data.binarize: none)"
            )

    def __repr__(self) -> str:
        return f"CoupledLogisticMixture(num_mixtures={self.num_mixtures}, num_bins={self.num_bins})"
