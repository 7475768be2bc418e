"""pyro-hvae: deep hierarchical VAEs as Pyro programs.

The public API: the hierarchies, the building blocks they are made of (for writing
hierarchies of your own), the training objective, the evaluation functions and inpainting
(sampling, encoding and decoding live in :mod:`pyro_hvae.use` and on every hierarchy).
"""

from pyro_hvae.context import BorderEncoder, ContextEncoder, ContextFeatures, LabelEncoder
from pyro_hvae.infer.elbo import HierarchicalELBO, site_kl
from pyro_hvae.infer.iw import get_traces, log_likelihood
from pyro_hvae.inpaint import Inpainting, inpaint, make_mask
from pyro_hvae.latents import (
    DELTA_LOG_SCALE_BOUNDS,
    IAF,
    LOG_SCALE_BOUNDS,
    ConditionalNormal,
    IndependentNormal,
    ResidualNormal,
    diagonal_normal,
    residual_normal,
    residual_normal_kl,
)
from pyro_hvae.likelihoods import (
    Bernoulli,
    Categorical,
    CoupledLogisticMixture,
    Likelihood,
    LogisticMixture,
    bits_per_dim,
)
from pyro_hvae.models import (
    BorderLadderVAE,
    BottomUpGuide,
    BottomUpPath,
    BottomUpVAE,
    ConditionalLadderGuide,
    ConditionalLadderVAE,
    ConditionalTopDownModel,
    ConvLadderGuide,
    ConvLadderVAE,
    GenerativeModel,
    HierarchicalVAE,
    LadderGuide,
    LadderVAE,
    TopDownModel,
    latent_site,
    register_params,
)
from pyro_hvae.nn import MLP, BatchNorm, FeatureNet, bounded, cat_features
from pyro_hvae.spatial_flows import ConditionalSpatialAffineAutoregressive, SpatialIAF
from pyro_hvae.spectral import RegularizationSchedule, SpectralRegularizer

__version__ = "0.1.0"

__all__ = [
    "DELTA_LOG_SCALE_BOUNDS",
    "IAF",
    "Inpainting",
    "LOG_SCALE_BOUNDS",
    "MLP",
    "BatchNorm",
    "Bernoulli",
    "BorderEncoder",
    "BorderLadderVAE",
    "BottomUpGuide",
    "BottomUpPath",
    "BottomUpVAE",
    "Categorical",
    "ConditionalLadderGuide",
    "ConditionalLadderVAE",
    "ConditionalNormal",
    "ConditionalTopDownModel",
    "ContextEncoder",
    "ContextFeatures",
    "ConvLadderGuide",
    "ConvLadderVAE",
    "ConditionalSpatialAffineAutoregressive",
    "CoupledLogisticMixture",
    "FeatureNet",
    "GenerativeModel",
    "HierarchicalELBO",
    "HierarchicalVAE",
    "IndependentNormal",
    "LabelEncoder",
    "LadderGuide",
    "LadderVAE",
    "Likelihood",
    "LogisticMixture",
    "RegularizationSchedule",
    "ResidualNormal",
    "SpatialIAF",
    "SpectralRegularizer",
    "TopDownModel",
    "bits_per_dim",
    "bounded",
    "cat_features",
    "diagonal_normal",
    "get_traces",
    "inpaint",
    "latent_site",
    "log_likelihood",
    "make_mask",
    "register_params",
    "residual_normal",
    "residual_normal_kl",
    "site_kl",
]
