"""The convolutional ladder VAE: spatial latent groups over several scales, one
deterministic top-down state shared by model and guide (NVAE / Very Deep VAE).

The model, for ``L`` groups (sites ``z_L .. z_1``, coarsest first, ``z_1`` next to ``x``):

.. math::

    h_L &= \\mathrm{up}(h^{top}) \\quad\\text{(a learned top input)}\\\\
    p(z_l \\mid z_{>l}) &= \\mathcal{N}(\\mu_p(h_l), \\sigma_p(h_l)), \\qquad
        [\\mu_p, \\sigma_p, h^p_l] = \\mathrm{Prior}_l(h_l)\\\\
    h_{l-1} &= \\mathrm{Cell}_l\\big(h_l + h^p_l + W_l z_l\\big)
        \\quad(\\text{and } \\mathrm{up}(\\cdot)\\text{ where the resolution changes})\\\\
    p(x \\mid z_{1:L}) &= \\mathrm{Likelihood}(\\mathrm{Head}(h_0))

so the state ``h_l`` is a deterministic function of **every** group above ``l``. The guide
encodes ``x`` bottom-up once (features ``r_s`` at every scale ``s``), then runs the model:
at each site it replaces the prior by the residual normal

.. math:: q(z_l \\mid z_{>l}, x) = \\mathcal{N}\\big(\\mu_p + \\Delta\\mu(h_l, r_{s(l)}),\\;
          \\sigma_p \\cdot \\Delta\\sigma(h_l, r_{s(l)})\\big),

reading ``h_l`` from the site (the model hands it over in the site's ``infer`` dict under
:data:`TOP_DOWN_STATE`, and the guide takes it out again). The top-down state is therefore computed once per step, for
model and guide together; the guide never re-runs the decoder.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import pyro
import torch
from pyro.poutine.guide import GuideMessenger
from torch import nn
from torch.utils.checkpoint import checkpoint

from pyro_hvae.cells import (
    BOTTLENECK_RATIO,
    BottleneckBlock,
    DecoderCell,
    Downsample,
    EncoderCell,
    ImageBlock,
    PointwiseConv,
    Upsample,
    conv,
)
from pyro_hvae.likelihoods import Likelihood
from pyro_hvae.models.base import HierarchicalVAE
from pyro_hvae.models.top_down import GenerativeModel, latent_site, register_params
from pyro_hvae.spatial_latents import SpatialPrior, SpatialResidualPosterior

#: Key of a latent site's ``infer`` dict under which the model hands the guide the
#: top-down state ``h_l`` the site's prior was computed from.
TOP_DOWN_STATE = "top_down_state"


def _per_scale(name: str, value: int | Sequence[int], num_scales: int, fix: str) -> list[int]:
    """One positive int per scale from an int or a list, or a ``ValueError`` naming ``name``."""
    values = [value] * num_scales if isinstance(value, int) and not isinstance(value, bool) else list(value)
    if len(values) != num_scales:
        raise ValueError(
            f"{name} has {len(values)} entries but there are {num_scales} scales; "
            "give one per scale (finest first, like scales) or a single integer"
        )
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be positive integers, got {value!r}; {fix}")
    return values


@contextmanager
def _buffers_kept(module: nn.Module):
    """Leave ``module``'s buffers as they were on entry: the recomputation of a checkpointed
    cell in the backward pass must not update the batch-norm running statistics twice."""
    saved = [b.detach().clone() for b in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in zip(module.buffers(), saved):
                buffer.copy_(value)


def run_cell(cell: nn.Module, x: torch.Tensor, checkpointed: bool) -> torch.Tensor:
    """``cell(x)``; with ``checkpointed`` (and gradients on) its activations are not kept
    but recomputed in the backward pass (``torch.utils.checkpoint``), which gives the same
    values and gradients: the cells are deterministic and batch norm normalises by the
    batch, whose running statistics the recomputation leaves untouched."""
    if not (checkpointed and torch.is_grad_enabled()):
        return cell(x)
    return checkpoint(cell, x, use_reentrant=False, context_fn=lambda: (nullcontext(), _buffers_kept(cell)))


def _halvings(size: int) -> list[int]:
    """``[size / 2, size / 4]`` while even: an example of valid scales in error messages."""
    out = []
    while size % 2 == 0 and len(out) < 2:
        size //= 2
        out.append(size)
    return out or [size]


@dataclass(frozen=True)
class ConvLayout:
    """The checked geometry of a conv hierarchy, every list **finest scale first**.

    :ivar grids: ``(height, width)`` of the latents and state at each scale.
    :ivar factors: down-sampling factor from the resolution below: ``factors[0]`` from
        the image to the finest scale, ``factors[s]`` from scale ``s - 1`` to ``s``.
    """

    data_shape: tuple[int, int, int]
    scales: list[int]
    groups: list[int]
    latent_channels: list[int]
    widths: list[int]
    grids: list[tuple[int, int]]
    factors: list[int]

    @classmethod
    def build(
        cls,
        data_shape: Sequence[int],
        scales: Sequence[int],
        groups_per_scale: int | Sequence[int],
        latent_channels: int | Sequence[int],
        widths: int | Sequence[int],
    ) -> ConvLayout:
        data_shape = tuple(data_shape)
        if len(data_shape) != 3 or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in data_shape):
            raise ValueError(f"data_shape must be (channels, height, width) of an image, got {data_shape}; e.g. (1, 28, 28)")
        _, height, width = data_shape
        example = _halvings(height)
        scales = list(scales) if not isinstance(scales, int) else [scales]
        if not scales or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in scales):
            raise ValueError(f"scales must be a non-empty list of latent resolutions, got {scales}; e.g. {example}")
        if any(fine <= coarse for fine, coarse in zip(scales, scales[1:])):
            raise ValueError(f"scales must be strictly decreasing (finest first, like z_1 .. z_L), got {scales}; e.g. {example}")
        grids, factors, below = [], [], height
        for s in scales:
            if below % s:
                what = f"the image height {height}" if below == height else f"the scale below it, {below}"
                raise ValueError(f"scales: {s} does not divide {what}; use resolutions that divide each other, e.g. {example}")
            factor = below // s
            down = height // s
            if width % down:
                raise ValueError(
                    f"scales: the image width {width} is not divisible by the down-sampling factor {down} of scale {s}; "
                    "use scales that divide both height and width"
                )
            grids.append((s, width // down))
            factors.append(factor)
            below = s
        n = len(scales)
        groups = _per_scale("groups_per_scale", groups_per_scale, n, "give every scale at least one latent group")
        channels = _per_scale("latent_channels", latent_channels, n, "give every group at least one channel")
        widths = _per_scale("widths", widths, n, f"use multiples of {BOTTLENECK_RATIO}, e.g. 32")
        for w in widths:
            if w % BOTTLENECK_RATIO:
                raise ValueError(
                    f"widths: {w} is not divisible by {BOTTLENECK_RATIO} (the bottleneck blocks use width // "
                    f"{BOTTLENECK_RATIO} middle channels); use multiples of {BOTTLENECK_RATIO}, "
                    f"e.g. {BOTTLENECK_RATIO * max(1, round(w / BOTTLENECK_RATIO))}"
                )
        return cls(data_shape, scales, groups, channels, widths, grids, factors)

    @property
    def num_groups(self) -> int:
        return sum(self.groups)

    def scale_of_layers(self) -> list[int]:
        """The scale index of every layer ``1 .. L``, bottom first."""
        return [s for s, count in enumerate(self.groups) for _ in range(count)]


class LatentGroup(nn.Module):
    """One group of the top-down path, model side, read like Very Deep VAE's decoder block:
    prior from the state, sample (the guide's posterior when guided), project into the
    state, a residual cell:

    .. math:: [\\mu_p, \\sigma_p, h^p] = \\mathrm{Prior}(h), \\quad z \\sim \\mathcal{N}(\\mu_p, \\sigma_p),
              \\quad h \\leftarrow \\mathrm{DecoderCell}(h + h^p + W z)

    ``W`` (a 1x1 conv) starts scaled by ``sqrt(1 / num_groups)`` and the cell's residual
    branch is multiplied by ``1 / sqrt(num_groups)``, so the state stays of order one
    through many groups.
    """

    def __init__(self, width: int, latent_channels: int, num_groups: int):
        super().__init__()
        depth_scale = 1 / math.sqrt(num_groups)
        self.prior = SpatialPrior(width, latent_channels)
        self.project = PointwiseConv(latent_channels, width, output_scale=depth_scale)
        self.cell = DecoderCell(width, residual_scale=depth_scale)
        self.checkpointed = False  # recompute the cell in the backward pass (run_cell)

    def forward(self, state: torch.Tensor, name: str) -> torch.Tensor:
        prior, state_from_prior = self.prior(state)
        z = pyro.sample(name, prior, infer={TOP_DOWN_STATE: state})
        return run_cell(self.cell, state + state_from_prior + self.project(z), self.checkpointed)


class TopDownScale(nn.Module):
    """The groups at one resolution, after ``enter``: up-sampling from the scale above
    (nearest neighbour, a 1x1 conv, then a Very Deep VAE bottleneck residual block whose
    output layer starts scaled by ``sqrt(1 / num_groups)``), or nothing at the top."""

    def __init__(self, enter: nn.Module, groups: Sequence[LatentGroup]):
        super().__init__()
        self.enter = enter
        self.groups = nn.ModuleList(groups)


class OutputHead(ImageBlock):
    """``[width, h, w] -> [F, H, W]``: up-sampling to the image, ELU, a 3x3 conv, with
    ``F H W = likelihood.num_features(data_shape)``; the likelihood's
    :meth:`~pyro_hvae.likelihoods.Likelihood.features_from_map` lays the maps out."""

    def __init__(self, width: int, out_channels: int, factor: int):
        super().__init__()
        self.up = Upsample(width, width, factor) if factor > 1 else nn.Identity()
        self.out = nn.Sequential(nn.ELU(), conv(width, out_channels, 3))

    def block(self, state: torch.Tensor) -> torch.Tensor:
        return self.out(self.up(state))


class ConvTopDownModel(GenerativeModel):
    """The generative model of :class:`ConvLadderVAE` as a Pyro program: ``model(x)``.

    Sites ``z_L, ..., z_1`` (``[C_l, h_l, w_l]`` events, coarsest first) and the observed
    ``x``, all inside ``pyro.plate("data", N)``. Every latent site carries the top-down
    state its prior came from in ``site["infer"][TOP_DOWN_STATE]``.
    """

    def __init__(self, layout: ConvLayout, *, likelihood: Likelihood | None = None, name: str | None = None):
        super().__init__(layout.data_shape, likelihood, name)
        self.layout = layout
        L = layout.num_groups
        top = len(layout.scales) - 1
        self.top_input = nn.Parameter(torch.zeros(layout.widths[top], *layout.grids[top]))
        scales = []
        for s in reversed(range(len(layout.scales))):  # the coarsest first
            width = layout.widths[s]
            if s == top:
                enter = nn.Identity()
            else:
                enter = nn.Sequential(
                    Upsample(layout.widths[s + 1], width, layout.factors[s + 1]),
                    BottleneckBlock(width, width, residual=True, output_scale=1 / math.sqrt(L)),
                )
            groups = [LatentGroup(width, layout.latent_channels[s], L) for _ in range(layout.groups[s])]
            scales.append(TopDownScale(enter, groups))
        self.scales = nn.ModuleList(scales)
        height, width = layout.data_shape[1:]
        channels = self.likelihood.num_features(layout.data_shape) // (height * width)
        self.head = OutputHead(layout.widths[0], channels, layout.factors[0])

    @property
    def num_layers(self) -> int:
        return self.layout.num_groups

    def observation(self, state: torch.Tensor):
        """``p(x | z_{1:L})`` from the final state ``h_0``."""
        features = self.likelihood.features_from_map(self.head(state), self.data_shape)
        return self.likelihood.distribution(features, self.data_shape)

    def forward(self, x: torch.Tensor | None = None, *, batch_size: int | None = None) -> torch.Tensor:
        """Run the generative program; returns ``x`` (observed, or sampled when ``x is None``)."""
        num_data = self.batch_size_of(x, batch_size)
        register_params(self.pyro_name, self)
        layer = self.num_layers
        with pyro.plate("data", num_data):
            state = self.top_input.expand(num_data, *self.top_input.shape)
            for scale in self.scales:
                state = scale.enter(state)
                for group in scale.groups:
                    state = group(state, latent_site(layer))
                    layer -= 1
            return pyro.sample("x", self.observation(state), obs=x)


class ConvEncoder(nn.Module):
    """The bottom-up path: ``r_s`` at every scale ``s``, finest first. A 3x3 stem on
    ``2x - 1``, then per scale a down-sampling (average pooling and a 1x1 conv) and
    ``cells_per_scale`` NVAE encoder cells, each branch scaled by ``1 / sqrt(total cells)``."""

    def __init__(self, layout: ConvLayout, cells_per_scale: int):
        super().__init__()
        channels = layout.data_shape[0]
        self.stem = conv(channels, layout.widths[0], 3)
        residual_scale = 1 / math.sqrt(cells_per_scale * len(layout.scales))
        below = [layout.widths[0], *layout.widths[:-1]]
        self.scales = nn.ModuleList(
            nn.Sequential(
                Downsample(w_in, w, factor),
                *(EncoderCell(w, residual_scale=residual_scale) for _ in range(cells_per_scale)),
            )
            for w_in, w, factor in zip(below, layout.widths, layout.factors)
        )
        self.checkpointed = False  # recompute each scale's cells in the backward pass (run_cell)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        r = self.stem(2 * x - 1)
        features = []
        for scale in self.scales:
            r = run_cell(scale, r, self.checkpointed)
            features.append(r)
        return features


class ConvLadderGuide(GuideMessenger, nn.Module):
    """The guide ``q(z_{1:L} | x) = prod_l q(z_l | z_{>l}, x)`` as a
    :class:`~pyro.poutine.guide.GuideMessenger` over a :class:`ConvTopDownModel`.

    ``guide(x)`` encodes ``x`` once, then runs the model; at each latent site it takes the
    model's prior and the top-down state ``h_l`` handed over with the site, and returns
    the posterior ``posteriors[l - 1](prior, h_l, r_{s(l)})`` (optionally passed through
    ``flows[l - 1](posterior, context)``, a hook for spatial flows; ``context`` is the
    ``[h_l, r]`` tensor the posterior head saw).

    :param posteriors: one head per layer, **bottom first** (``posteriors[0]`` for ``z_1``).
    :param flows: optional flow module per layer, bottom first.
    """

    def __init__(
        self,
        model: ConvTopDownModel,
        encoder: ConvEncoder,
        posteriors: Sequence[nn.Module],
        flows: Sequence[nn.Module] | None = None,
    ):
        nn.Module.__init__(self)
        GuideMessenger.__init__(self, model)
        self.encoder = encoder
        self.posteriors = nn.ModuleList(posteriors)
        self.flows = nn.ModuleList(flows) if flows else None
        self._layer_of = {latent_site(layer): layer for layer in range(1, model.num_layers + 1)}
        self._scale_of = model.layout.scale_of_layers()

    def __call__(self, x: torch.Tensor, *args, **kwargs):
        self.model.check_data(x)
        register_params(self.model.pyro_name + "_guide", self)
        self._features = self.encoder(x)
        try:
            return GuideMessenger.__call__(self, x, *args, **kwargs)
        finally:
            del self._features

    def _pyro_sample(self, msg) -> None:
        # The model hands over the state h_l with the site; get_posterior reads it. Taking
        # it out of the site keeps the traces from holding every group's state until the
        # loss is computed (the memory of an importance-weighted chunk).
        self._state = msg["infer"].pop(TOP_DOWN_STATE, None)
        try:
            super()._pyro_sample(msg)
        finally:
            self._state = None

    def get_posterior(self, name: str, prior):
        layer = self._layer_of[name]
        features = self._features[self._scale_of[layer - 1]]
        posterior, context = self.posteriors[layer - 1](prior, self._state, features)
        if self.flows is not None:
            posterior = self.flows[layer - 1](posterior, context)
        return posterior


class ConvLadderVAE(HierarchicalVAE):
    """A convolutional top-down hierarchical VAE (NVAE / Very Deep VAE style) as a Pyro
    model/guide pair: ``vae.model(x)``, ``vae.guide(x)``.

    :param data_shape: ``(channels, height, width)`` of an image, e.g. ``(1, 28, 28)``.
    :param scales: resolutions (heights) of the latent groups, **finest first**: each
        divides the one before it and the first divides the image height, e.g.
        ``[14, 7]`` for 28x28 images, ``[32, 16, 8]`` for 32x32. Widths follow the image's
        aspect ratio.
    :param groups_per_scale: latent groups at each scale (an int for all, or one per scale,
        finest first); ``L`` is their sum.
    :param latent_channels: channels ``C`` of each group's ``[C, h, w]`` latent, per scale.
    :param widths: channels of the top-down state and encoder features at each scale;
        multiples of 4 (the bottleneck blocks' ratio).
    :param encoder_cells: NVAE encoder cells per scale on the bottom-up path.
    :param likelihood: ``p(x | z)``; :class:`~pyro_hvae.likelihoods.Bernoulli` by default.

    Sites ``z_L .. z_1`` (``z_1`` at the finest scale, next to ``x``) and ``x``, inside the
    plate ``"data"``. The posteriors are residual normals with NVAE's soft bounds
    (:mod:`pyro_hvae.spatial_latents`), so ``TraceMeanField_ELBO`` and
    :class:`~pyro_hvae.infer.elbo.HierarchicalELBO` use the analytic KL in residual form.
    The networks use batch norm: call ``vae.eval()`` before evaluation.
    """

    def __init__(
        self,
        data_shape: Sequence[int],
        scales: Sequence[int],
        *,
        groups_per_scale: int | Sequence[int] = 2,
        latent_channels: int | Sequence[int] = 8,
        widths: int | Sequence[int] = 64,
        encoder_cells: int = 1,
        likelihood: Likelihood | None = None,
        name: str | None = None,
    ):
        super().__init__()
        if isinstance(encoder_cells, bool) or not isinstance(encoder_cells, int) or encoder_cells < 1:
            raise ValueError(f"encoder_cells must be a positive integer (cells per scale), got {encoder_cells!r}")
        layout = ConvLayout.build(data_shape, scales, groups_per_scale, latent_channels, widths)
        self.model = ConvTopDownModel(layout, likelihood=likelihood, name=name)
        heads = [
            SpatialResidualPosterior(layout.widths[s], layout.widths[s], layout.latent_channels[s])
            for s in layout.scale_of_layers()
        ]
        self.guide = ConvLadderGuide(self.model, ConvEncoder(layout, encoder_cells), heads)

    @property
    def layout(self) -> ConvLayout:
        return self.model.layout

    @property
    def gradient_checkpointing(self) -> bool:
        """Whether the decoder cell of every group and the encoder cells of every scale are
        recomputed in the backward pass instead of keeping their activations (less memory,
        about one more forward pass of the cells per step; same loss and gradients). Acts
        only while autograd records (training), not under ``torch.no_grad()``."""
        return self.guide.encoder.checkpointed

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, on: bool) -> None:
        self.guide.encoder.checkpointed = on
        for module in self.model.modules():
            if isinstance(module, LatentGroup):
                module.checkpointed = on

    def conv_layers(self) -> list[nn.Conv2d]:
        """Every convolution of model and guide (a hook for spectral regularization)."""
        return [m for m in self.modules() if isinstance(m, nn.Conv2d)]
