"""What every hierarchy in this package offers besides its ``model`` and ``guide``."""

from __future__ import annotations

import pyro.poutine as poutine
import torch
from torch import nn

from pyro_hvae.infer.iw import get_traces
from pyro_hvae.models.top_down import GenerativeModel, latent_site


class HierarchicalVAE(nn.Module):
    """Base class: a :class:`GenerativeModel` ``self.model`` and a guide ``self.guide``.

    Both are ``nn.Module`` s, so ``Trace_ELBO()(vae.model, vae.guide).parameters()``
    and ``vae.parameters()`` both hold every parameter, and ``vae.to(device)`` moves
    them all.
    """

    model: GenerativeModel
    guide: nn.Module

    @property
    def latent_sites(self) -> list[str]:
        """Latent site names, bottom first: ``["z_1", ..., "z_L"]``."""
        return [latent_site(layer) for layer in range(1, self.model.num_layers + 1)]

    @property
    def data_shape(self) -> tuple[int, ...]:
        """Shape of one data point, e.g. ``(1, 28, 28)``."""
        return self.model.data_shape

    @torch.no_grad()
    def sample(self, num_samples: int, *, mean: bool = True) -> torch.Tensor:
        """Images from the prior: ``z ~ p(z)``, then ``E[x | z_1]`` (``mean=True``) or ``x ~ p(x | z_1)``."""
        trace = poutine.trace(self.model).get_trace(batch_size=num_samples)
        site = trace.nodes["x"]
        return site["fn"].mean if mean else site["value"]

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, *, mean: bool = True) -> torch.Tensor:
        """Reconstructions: ``z ~ q(z | x)``, then ``E[x' | z_1]`` (``mean=True``) or a sample."""
        model_trace, _ = get_traces(self.model, self.guide, x)
        observation = model_trace.nodes["x"]["fn"]
        return observation.mean if mean else observation.sample()
