"""Hierarchies as Pyro model/guide pairs."""

from pyro_hvae.models.base import HierarchicalVAE
from pyro_hvae.models.bottom_up import BottomUpGuide, BottomUpVAE
from pyro_hvae.models.ladder import BottomUpPath, LadderGuide, LadderVAE
from pyro_hvae.models.top_down import TopDownModel, latent_site, register_params

__all__ = [
    "BottomUpGuide",
    "BottomUpPath",
    "BottomUpVAE",
    "HierarchicalVAE",
    "LadderGuide",
    "LadderVAE",
    "TopDownModel",
    "latent_site",
    "register_params",
]
