"""What every hierarchy offers besides its ``model`` and ``guide``: the protocol's defaults.

The trainer and ``pyro-hvae evaluate`` use a hierarchy, built-in or your own, only
through this small protocol (checked by :func:`~pyro_hvae.models.protocol.inspect_hierarchy`):

* ``vae.model(x)`` and ``vae.guide(x)``: Pyro programs over a batch ``x`` of shape
  ``[N, *data_shape]``; the guide a plain callable or a ``GuideMessenger``;
* ``vae`` is an ``nn.Module`` holding every parameter (they are trained with
  ``torch.optim`` over ``vae.parameters()`` under ``module_local_params``);
* ``data_plate``: the plate over data points that every sample site lies in (``"data"``);
* ``observed_site``: the site that observes ``x`` (``"x"``);
* ``latent_sites``: the per-layer latent sites, bottom first, whose KL is logged and
  whose active units are counted (None: every latent site of the model, found from a trace);
* ``analytic_kl``: whether a closed-form KL per site is valid for the guide (None:
  valid when the guide samples the latents in the model's order, found from a trace).

:class:`HierarchicalVAE` gives these defaults; a plain ``nn.Module`` with ``model``
and ``guide`` gets the same ones.
"""

from __future__ import annotations

import torch
from torch import nn

from pyro_hvae import use
from pyro_hvae.models.top_down import GenerativeModel, latent_site


class HierarchicalVAE(nn.Module):
    """Base class: a :class:`GenerativeModel` ``self.model`` and a guide ``self.guide``,
    with the protocol's defaults (see the module docstring).

    Built-in hierarchies hold a :class:`TopDownModel` as ``self.model`` and a guide
    module as ``self.guide``; both are ``nn.Module`` s, so ``vae.parameters()`` holds
    every parameter and ``vae.to(device)`` moves them all. A subclass of your own may
    instead define ``model`` and ``guide`` as methods.
    """

    model: GenerativeModel
    guide: nn.Module

    #: Name of the plate over data points that every sample site lies in.
    data_plate: str = "data"
    #: Name of the sample site that observes ``x``.
    observed_site: str = "x"
    #: Whether the closed-form KL of each latent site is valid for this guide; None
    #: decides from a trace (valid when the guide samples in the model's order).
    analytic_kl: bool | None = None

    @property
    def latent_sites(self) -> list[str] | None:
        """Latent site names, bottom first: ``["z_1", ..., "z_L"]`` for a
        :class:`GenerativeModel`; None elsewhere (every latent site, found from a trace)."""
        if not isinstance(self.model, GenerativeModel):
            return None
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
