"""Hierarchies as Pyro model/guide pairs."""

from pyro_hvae.models.base import HierarchicalVAE
from pyro_hvae.models.bottom_up import BottomUpGuide, BottomUpVAE
from pyro_hvae.models.conditional import (
    BorderLadderVAE,
    ConditionalLadderGuide,
    ConditionalLadderVAE,
    ConditionalTopDownModel,
)
from pyro_hvae.models.conv_ladder import (
    ConvEncoder,
    ConvLadderGuide,
    ConvLadderVAE,
    ConvLayout,
    ConvTopDownModel,
    LatentGroup,
)
from pyro_hvae.models.ladder import BottomUpPath, LadderGuide, LadderVAE
from pyro_hvae.models.top_down import GenerativeModel, TopDownModel, latent_site, register_params

__all__ = [
    "BorderLadderVAE",
    "BottomUpGuide",
    "BottomUpPath",
    "BottomUpVAE",
    "ConditionalLadderGuide",
    "ConditionalLadderVAE",
    "ConditionalTopDownModel",
    "ConvEncoder",
    "ConvLadderGuide",
    "ConvLadderVAE",
    "ConvLayout",
    "ConvTopDownModel",
    "GenerativeModel",
    "HierarchicalVAE",
    "LadderGuide",
    "LadderVAE",
    "LatentGroup",
    "TopDownModel",
    "latent_site",
    "register_params",
]
