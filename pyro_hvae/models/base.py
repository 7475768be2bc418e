"""What every hierarchy in this package offers besides its ``model`` and ``guide``."""

from __future__ import annotations

import torch
from torch import nn

from pyro_hvae import use
from pyro_hvae.models.top_down import TopDownModel, latent_site


class HierarchicalVAE(nn.Module):
    """Base class: a :class:`TopDownModel` ``self.model`` and a guide ``self.guide``.

    Both are ``nn.Module`` s, so ``Trace_ELBO()(vae.model, vae.guide).parameters()``
    and ``vae.parameters()`` both hold every parameter, and ``vae.to(device)`` moves
    them all.
    """

    model: TopDownModel
    guide: nn.Module

    @property
    def latent_sites(self) -> list[str]:
        """Latent site names, bottom first: ``["z_1", ..., "z_L"]``."""
        return [latent_site(layer) for layer in range(1, self.model.num_layers + 1)]

    @property
    def data_shape(self) -> tuple[int, ...]:
        """Shape of one data point, e.g. ``(1, 28, 28)``."""
        return self.model.data_shape

    def sample(self, num_samples: int, *, temperature=1.0, mean: bool = True, batch_norm=None) -> torch.Tensor:
        """Images from the prior at ``temperature``; see :func:`pyro_hvae.use.sample`."""
        return use.sample(self, num_samples, temperature=temperature, mean=mean, batch_norm=batch_norm)

    def reconstruct(self, x: torch.Tensor, *, mean: bool = True) -> torch.Tensor:
        """``z ~ q(z | x)``, then ``E[x' | z]`` or a sample; see :func:`pyro_hvae.use.reconstruct`."""
        return use.reconstruct(self, x, mean=mean)

    def encode(self, x: torch.Tensor, *, mean: bool = False) -> dict[str, torch.Tensor]:
        """Per-layer codes ``{site: z_l}``; see :func:`pyro_hvae.use.encode`."""
        return use.encode(self, x, mean=mean)

    def decode(self, latents, *, temperature=1.0, mean: bool = True) -> torch.Tensor:
        """Images from (some) latents, the rest from the prior; see :func:`pyro_hvae.use.decode`."""
        return use.decode(self, latents, temperature=temperature, mean=mean)

    def interpolate(self, x_a, x_b, steps: int, *, layers=None, temperature=0.0, mean: bool = True) -> torch.Tensor:
        """Interpolate the chosen layers between two images; see :func:`pyro_hvae.use.interpolate`."""
        return use.interpolate(self, x_a, x_b, steps, layers=layers, temperature=temperature, mean=mean)

    def vary_details(self, x, *, keep_top: int, num_samples: int, temperature=1.0, mean: bool = True) -> torch.Tensor:
        """Keep the top layers of ``x``, redraw the rest; see :func:`pyro_hvae.use.vary_details`."""
        return use.vary_details(self, x, keep_top=keep_top, num_samples=num_samples, temperature=temperature, mean=mean)

    def readjust_batch_norm(self, temperature, **kwargs) -> dict[str, torch.Tensor]:
        """Batch-norm statistics for sampling at ``temperature``; see :func:`pyro_hvae.use.readjust_batch_norm`."""
        return use.readjust_batch_norm(self, temperature, **kwargs)
